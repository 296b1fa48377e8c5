"""The training loop: the one owner of how an epoch's steps run and what they count.

LAVIS 1.0.2 puts the step loop in the task (``BaseTask._train_inner_loop``): it moves every batch to CUDA,
autocasts in fp16 only, syncs the loss to the host every step, does not divide the loss by
``accum_grad_iters`` and has no guard against non-finite losses. Here the runner owns the loop: a
:class:`TrainLoop` runs one epoch's steps for any task (it asks the task for ``train_step`` only, so a plain LAVIS
task trains too), and :class:`LoopState` holds everything the loop counts, which checkpoints save and a resume
restores. Tasks keep what LAVIS tasks own (``train_step``, ``valid_step``, ``evaluation``, ``after_evaluation``).

One step::

    samples = move_to_device(next(loader)); lr_scheduler.step(); apply_lr_scales(optimizer)
    with precision.run_autocast(run_cfg, device, model): loss = task.train_step(model, samples)
    backward(loss / accum_grad_iters)   (through the GradScaler for fp16 on a GPU)
    end of an accumulation window: one host sync decides (every rank alike): clip and step, or skip and count
        (``run.nonfinite_check: deferred``, the default on a GPU: no sync; the fused optimizer skips on the device)
    hooks (empty in production; tests and LAVIS_EXT_FAULT_INJECT install them), then on_step (the runner's
    step checkpoints)

The loss stays on the device: the host reads it once per optimizer step (where the update must be decided) and
once per log line, not once per micro-step.

Non-finite check (``run.nonfinite_check``): ``step`` decides each skip on the host, one sync per optimizer step,
and names each skipped step's loss or gradient norm in the log. ``deferred`` makes no sync at all: the skip flag
goes to torch's fused Adam/AdamW kernel as its ``found_inf`` (the path GradScaler uses, which leaves weights,
moments and step count untouched on a skip), and the counts are read at each log line, step checkpoint and epoch
end, where the run stops if ``max_nonfinite_in_row`` was reached (so a run may go on up to ``log_freq`` steps
past it, none of them updating). Why: on a GPU the sync drains the launch queue once per step. Unset means
``deferred`` on a GPU when the optimizer is fused and no fp16 GradScaler runs, else ``step`` (on a CPU the sync
costs nothing). Both give the same weights (tests/unit/test_hot_paths.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from lavis.common.dist_utils import is_main_process
from tqdm.auto import tqdm

from lavis_ext.precision import run_autocast
from lavis_ext.tasks.base import model_device, move_to_device

logger = logging.getLogger(__name__)

NONFINITE_CHECKS = ("step", "deferred")


def deferred_unsupported(optimizer, scaler) -> str | None:
    """Why ``run.nonfinite_check: deferred`` cannot run with this optimizer and scaler (None when it can)."""
    if scaler is not None:
        return "an fp16 GradScaler decides its own skips (use run.amp_dtype: bf16, or run.nonfinite_check: step)"
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or not all(
            g.get("fused") for g in optimizer.param_groups):
        return (f"{type(optimizer).__name__} is not torch's fused Adam/AdamW, the only step that takes a skip flag on "
                "the device (leave run.optimizer_impl unset or set it to fused, or use run.nonfinite_check: step)")
    return None


def apply_lr_scales(optimizer) -> None:
    """Scale each param group's LR by its ``lr_scale`` (layer-wise decay, see the runner's optimizer).
    LAVIS's schedulers set one LR on every group at every step, so the scale is re-applied after them."""
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] *= group["lr_scale"]


def peak_lr(optimizer) -> float:
    """The schedule's LR (the largest group LR: unscaled groups have scale 1)."""
    return max(group["lr"] for group in optimizer.param_groups)


@dataclass
class LoopState:
    """Where training is and what the loop has counted: what a checkpoint records for a bitwise resume.

    The field names are the keys of a checkpoint's ``train_state`` (and of each rank's ``loop`` entry), as
    checkpoints have written them since full-state resume began, so :meth:`from_dict` reads old checkpoints too.
    ``loss_sum`` is this rank's sum of the running epoch's losses (a resumed epoch reports the same mean; 0 once
    the epoch is done; during an epoch :meth:`TrainLoop.snapshot` reads it from the device).
    """

    epoch: int = 0
    step: int = 0  # micro-steps done in ``epoch``
    iters_per_epoch: int = 0  # 0: not known yet (no epoch run)
    global_step: int = 0  # micro-steps done in the run
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, whole run
    nonfinite_in_row: int = 0
    loss_sum: float = 0.0

    @property
    def epoch_done(self) -> bool:
        return self.iters_per_epoch > 0 and self.step >= self.iters_per_epoch

    def to_dict(self) -> dict:
        """JSON-able, with ``epoch_done`` for readers of the checkpoint."""
        return {**dataclasses.asdict(self), "epoch_done": self.epoch_done}

    @classmethod
    def from_dict(cls, state: dict) -> LoopState:
        """From a checkpoint's ``train_state`` (merged with this rank's ``loop`` entry); other keys are ignored,
        missing ones take their defaults (an epoch checkpoint carries no ``loss_sum``)."""
        kinds = {f.name: (float if f.name == "loss_sum" else int) for f in dataclasses.fields(cls)}
        return cls(**{name: kind(state[name]) for name, kind in kinds.items() if state.get(name) is not None})

    @classmethod
    def from_checkpoint(cls, train_state: dict, rank_entry: dict | None = None) -> LoopState:
        """A checkpoint's ``train_state`` (rank 0's) with this rank's ``ranks`` entry's ``loop`` over it: its own
        loss sum. Entries written before LoopState hold only the counters and the loss sum; they read the same."""
        return cls.from_dict({**train_state, **((rank_entry or {}).get("loop") or {})})


class TrainLoop:
    """Runs epochs of training steps and keeps their :class:`LoopState`.

    Args:
        run_cfg: the run config: ``amp``/``amp_dtype`` (through :mod:`lavis_ext.precision`), ``max_grad_norm``,
            ``max_nonfinite_in_row`` (default 20).
        tracker: where loss, LR and skipped steps are logged (:class:`~lavis_ext.runners.tracking.RunTracker`), or None.
        on_step: ``on_step(loop)`` after each optimizer step, on every rank, where no gradient is pending (the
            runner writes step checkpoints there).

    ``hooks``: callables ``hook(loop)`` run after each optimizer step, before ``on_step``; empty in production
    (tests install them to interrupt a run at a step, the runner installs ``LAVIS_EXT_FAULT_INJECT``'s).
    """

    def __init__(self, run_cfg=None, tracker=None, on_step: Callable[[TrainLoop], None] | None = None):
        self.run_cfg = run_cfg if run_cfg is not None else {}
        self.tracker = tracker
        self.on_step = on_step
        self.hooks: list[Callable[[TrainLoop], None]] = []
        self.state = LoopState()
        self._resume: LoopState | None = None  # a mid-epoch position, consumed by the next epoch's run
        self._loss_sum: torch.Tensor | None = None  # the running epoch's loss sum, on the device
        check = self.run_cfg.get("nonfinite_check", None)
        if check is not None and check not in NONFINITE_CHECKS:
            raise ValueError(f"run.nonfinite_check {check!r}: use one of {', '.join(NONFINITE_CHECKS)} (or leave it "
                             "unset: deferred on a GPU with a fused optimizer, else step)")
        self.nonfinite_check = check
        # run.nonfinite_check: deferred: skips since the last read, the current and the longest run of them
        self._deferred: dict[str, torch.Tensor] | None = None

    # ---- state -------------------------------------------------------------------------------
    def snapshot(self) -> LoopState:
        """A copy of the state with the running epoch's loss sum read from the device (one host read: call it
        when a checkpoint is written, not every step)."""
        self._read_deferred()
        state = dataclasses.replace(self.state)
        if self._loss_sum is not None:
            state.loss_sum = float(self._loss_sum.item())
        return state

    def restore(self, state: LoopState) -> None:
        """Counters now; a mid-epoch position is continued by the next :meth:`run_epoch` of that epoch."""
        self.state = dataclasses.replace(state)
        self._resume = None if state.epoch_done else dataclasses.replace(state)

    # ---- the non-finite guard ----------------------------------------------------------------
    def _count_nonfinite(self, what: str, step: int) -> None:
        """Skip this step's update, count it, and stop after ``run.max_nonfinite_in_row`` in a row."""
        state = self.state
        state.nonfinite_steps += 1
        state.nonfinite_in_row += 1
        logger.warning("step %d: non-finite %s, update skipped (%d in a row, %d in this run)",
                       step, what, state.nonfinite_in_row, state.nonfinite_steps)
        if self.tracker is not None:
            self.tracker.scalar("train/nonfinite_steps", state.nonfinite_steps, step)
        self._stop_if_too_many(state.nonfinite_in_row, step)

    def _stop_if_too_many(self, in_row: int, step: int) -> None:
        limit = int(self.run_cfg.get("max_nonfinite_in_row", 20))
        if in_row >= limit:
            raise FloatingPointError(
                f"{in_row} non-finite losses/gradients in a row (step {step}, run.max_nonfinite_in_row="
                f"{limit}); lower run.init_lr, set run.max_grad_norm, use run.amp_dtype: bf16 instead of fp16, "
                "or check the data"
            )

    def _start_deferred(self, optimizer, scaler, device) -> None:
        """Resolve ``run.nonfinite_check`` for this epoch; for ``deferred``, the counters on the device."""
        why = deferred_unsupported(optimizer, scaler)
        if self.nonfinite_check == "deferred" and why:
            raise ValueError(f"run.nonfinite_check deferred: {why}")
        deferred = self.nonfinite_check == "deferred" or (self.nonfinite_check is None and device.type == "cuda"
                                                          and why is None)
        if not deferred:
            self._deferred = None
            return
        in_row = torch.full((), self.state.nonfinite_in_row, dtype=torch.long, device=device)
        self._deferred = {"skipped": torch.zeros((), dtype=torch.long, device=device), "in_row": in_row,
                          "longest": in_row.clone()}

    def _read_deferred(self) -> None:
        """``deferred``: bring the device's skip counts into the state (one read), log them, stop the run if
        ``max_nonfinite_in_row`` was reached since the last read."""
        if self._deferred is None:
            return
        counts = self._deferred
        skipped, in_row, longest = torch.stack([counts["skipped"], counts["in_row"], counts["longest"]]).tolist()
        counts["skipped"].zero_()
        counts["longest"].copy_(counts["in_row"])
        state = self.state
        state.nonfinite_in_row = in_row
        if not skipped:
            return
        state.nonfinite_steps += skipped
        logger.warning("steps up to %d: %d optimizer step(s) skipped for a non-finite loss or gradient norm (%d in a "
                       "row at most, %d in this run)", state.global_step, skipped, longest, state.nonfinite_steps)
        if self.tracker is not None:
            self.tracker.scalar("train/nonfinite_steps", state.nonfinite_steps, state.global_step)
        self._stop_if_too_many(longest, state.global_step)

    def _finish_window(self, model, optimizer, scaler, max_norm, window_bad, loss, step) -> None:
        """End of an accumulation window: clip, then step unless a loss (on any rank) or the gradient norm is
        non-finite. The fast path reads one boolean from the device; the messages are built only on a skip."""
        bad = window_bad
        if dist.is_initialized() and dist.get_world_size() > 1:
            # all ranks skip together: one rank stepping past a NaN another skipped would split the replicas
            flag = bad.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag > 0
        norm = None
        if max_norm:
            if scaler is not None:
                scaler.unscale_(optimizer)
            # clipping NaN gradients is harmless: the step is skipped below
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_norm))
            if scaler is None:
                bad = bad | ~torch.isfinite(norm)
        if self._deferred is not None:  # the fused kernel skips on the device: no host sync (module docstring)
            optimizer.found_inf = bad.to(torch.float32)
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            counts = self._deferred
            counts["skipped"] += bad
            counts["in_row"].add_(1).mul_(bad)
            torch.maximum(counts["longest"], counts["in_row"], out=counts["longest"])
            optimizer.zero_grad(set_to_none=True)
            return
        if bool(bad.item()):  # the one host sync per optimizer step
            if not bool(window_bad.item()):
                what = "loss on another rank" if norm is None or bool(torch.isfinite(norm).item()) else f"gradient norm {norm.item()}"
            else:
                what = f"loss {loss.item()}" if not bool(torch.isfinite(loss.detach()).item()) else "loss earlier in the window"
            if scaler is not None and norm is not None:
                scaler.update()  # unscale_ ran: close the scaler's step (it lowers the scale on the inf it saw)
            self._count_nonfinite(what, step)
        else:
            self.state.nonfinite_in_row = 0
            if scaler is not None:
                scaler.step(optimizer)  # GradScaler skips inf/nan fp16 steps on its own
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ---- one epoch ---------------------------------------------------------------------------
    def run_epoch(
        self,
        task,
        epoch: int,
        iters_per_epoch: int,
        model,
        data_loader,
        optimizer,
        lr_scheduler,
        scaler=None,
        start_iters: int | None = None,
        log_freq: int = 50,
        accum_grad_iters: int = 1,
    ) -> dict:
        """Train ``iters_per_epoch`` steps of ``epoch`` (continuing a restored mid-epoch position), calling
        ``task.train_step(model=..., samples=...)`` for each batch. ``start_iters``: the first iteration of an
        inner epoch (runner_iter), whose scheduler counts inner epochs. Returns LAVIS's train stats
        (``loss``, ``lr``, ``nonfinite_steps``).

        Raises:
            ValueError: the restored position is from an epoch of another length (other data, batch size or
                number of processes).
            FloatingPointError: ``run.max_nonfinite_in_row`` non-finite steps in a row.
        """
        device = model_device(model)
        if not hasattr(data_loader, "__next__"):
            data_loader = iter(data_loader)
        inner_epoch = epoch if start_iters is None else start_iters // iters_per_epoch
        base_step = start_iters if start_iters is not None else epoch * iters_per_epoch
        max_norm = self.run_cfg.get("max_grad_norm", None)
        state = self.state
        loss_sum = torch.zeros((), device=device)
        first = 0
        resume, self._resume = self._resume, None
        if resume is not None and resume.epoch == epoch:
            # mid-epoch resume: the runner restored weights, optimizer, data position and RNG states
            if resume.iters_per_epoch and resume.iters_per_epoch != iters_per_epoch:
                raise ValueError(
                    f"the checkpoint's epoch has {resume.iters_per_epoch} steps, this run's {iters_per_epoch}; "
                    "resume with the same data, batch size and number of processes"
                )
            first = resume.step
            loss_sum += resume.loss_sum
            logger.info("epoch %d: continuing at step %d of %d", epoch, first, iters_per_epoch)
        state.epoch, state.step, state.iters_per_epoch = epoch, first, iters_per_epoch
        self._loss_sum = loss_sum
        self._start_deferred(optimizer, scaler, device)
        # Non-finite losses of the accumulation window, kept on the device: the host learns about them once per
        # optimizer step (one sync, where the update must be decided), not once per micro-step.
        window_bad = torch.zeros((), dtype=torch.bool, device=device)
        progress = tqdm(
            range(first, iters_per_epoch),
            desc=f"train epoch {epoch}",
            disable=not is_main_process(),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for i in progress:
            samples = move_to_device(next(data_loader), device)
            samples.update({"epoch": inner_epoch, "num_iters_per_epoch": iters_per_epoch, "iters": i})
            lr_scheduler.step(cur_epoch=inner_epoch, cur_step=i)
            apply_lr_scales(optimizer)
            with run_autocast(self.run_cfg, device, model):
                loss = task.train_step(model=model, samples=samples)
            scaled = loss / accum_grad_iters
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            window_bad |= ~torch.isfinite(loss.detach()).all()
            window_end = (i + 1) % accum_grad_iters == 0
            if window_end:
                self._finish_window(model, optimizer, scaler, max_norm, window_bad, loss, base_step + i + 1)
                window_bad = torch.zeros((), dtype=torch.bool, device=device)
            loss_sum += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            state.step, state.global_step = i + 1, base_step + i + 1
            if window_end:
                # between optimizer steps: no gradient is pending, so the state on disk is complete
                for hook in self.hooks:
                    hook(self)
                if self.on_step is not None:
                    self.on_step(self)
            if (i + 1) % log_freq == 0 or i + 1 == iters_per_epoch:
                # One host sync per log interval, not per step.
                self._read_deferred()
                shown_loss = loss.item()
                lr = peak_lr(optimizer)
                progress.set_postfix(loss=f"{shown_loss:.4f}", lr=f"{lr:.2e}")
                if self.tracker is not None:
                    self.tracker.scalar("train/loss", shown_loss, state.global_step)
                    self.tracker.scalar("train/lr", lr, state.global_step)
        progress.close()
        self._read_deferred()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= dist.get_world_size()
        mean_loss = (loss_sum / max(iters_per_epoch, 1)).item()
        self._loss_sum, state.loss_sum = None, 0.0  # the epoch is done: nothing to continue
        if not math.isfinite(mean_loss):
            logger.warning("epoch %d mean training loss is %s", epoch, mean_loss)
        logger.info("epoch %d: mean loss %.4f, last lr %.3e", epoch, mean_loss, peak_lr(optimizer))
        if self.tracker is not None:
            self.tracker.scalar("train/epoch_loss", mean_loss, state.global_step)
        return {
            "loss": f"{mean_loss:.3f}",
            "lr": f"{optimizer.param_groups[0]['lr']:.6f}",
            "nonfinite_steps": state.nonfinite_steps,
        }
