"""What every lavis_ext task adds to LAVIS's BaseTask: device-agnostic training and evaluation loops.

LAVIS 1.0.2's loops assume CUDA (`prepare_sample(cuda_enabled=True)` moves every batch to the GPU,
amp is CUDA-only, `SmoothedValue` syncs through a GPU tensor) and do not divide the loss by
`accum_grad_iters`.
The loops here move batches to the model's device, autocast as `lavis_ext.precision` says, show
a progress bar on the main process and log loss/lr to the run tracker. Models, data and metrics stay
LAVIS's.
"""
from __future__ import annotations

import json
import logging
import math
import os

import torch
import torch.distributed as dist
from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry
from lavis.datasets.data_utils import apply_to_sample
from tqdm.auto import tqdm

from lavis_ext.precision import run_autocast

logger = logging.getLogger(__name__)


def move_to_device(sample, device: torch.device):
    """Tensors (nested in dicts/lists) to `device`, through LAVIS's own walker; everything else untouched."""
    return apply_to_sample(lambda tensor: tensor.to(device, non_blocking=True), sample)


def write_metrics(split_name: str, epoch, record: dict, metrics: dict) -> None:
    """`<split>_epoch<e>_metrics.json` (the full record) and a line in LAVIS's `evaluate.txt`."""
    output_dir = registry.get_path("output_dir")
    with open(os.path.join(output_dir, f"{split_name}_epoch{epoch}_metrics.json"), "w") as f:
        json.dump({"split": split_name, "epoch": epoch, **record, "metrics": metrics}, f, indent=2)
    with open(os.path.join(output_dir, "evaluate.txt"), "a") as f:
        f.write(json.dumps({split_name: metrics}) + "\n")


def apply_lr_scales(optimizer) -> None:
    """Scale each param group's LR by its ``lr_scale`` (layer-wise decay, see the runner's optimizer).
    LAVIS's schedulers set one LR on every group at every step, so the scale is re-applied after them."""
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] *= group["lr_scale"]


def peak_lr(optimizer) -> float:
    """The schedule's LR (the largest group LR: unscaled groups have scale 1)."""
    return max(group["lr"] for group in optimizer.param_groups)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class TaskExtMixin:
    """Mix in before the LAVIS task class."""

    run_cfg = None
    tracker = None
    global_step = 0
    nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, whole run
    nonfinite_in_row = 0
    step_hook = None  # runner callback after each optimizer step: (epoch, step, iters_per_epoch, loop_state_fn)
    _resume_state = None  # loop counters of a mid-epoch checkpoint, consumed by the next epoch's loop
    _loop = None  # the running epoch's counters (what a checkpoint taken now must record)

    def attach_run(self, run_cfg, tracker) -> None:
        """Called by the runner: the run config (precision, clipping) and where to log."""
        self.run_cfg = run_cfg
        self.tracker = tracker

    def attach_step_hook(self, hook) -> None:
        """Called by the runner: ``hook(epoch, step, iters_per_epoch, loop_state_fn)`` runs on every rank
        after each optimizer step (end of an accumulation window), where checkpoints are consistent."""
        self.step_hook = hook

    def loop_state(self) -> dict:
        """The loop counters a checkpoint must carry for a bitwise resume (JSON-able)."""
        state = {"nonfinite_steps": self.nonfinite_steps, "nonfinite_in_row": self.nonfinite_in_row}
        if self._loop is not None:
            state["loss_sum"] = float(self._loop["loss_sum"].item())
        return state

    def restore_loop_state(self, state: dict) -> None:
        """From a checkpoint's ``train_state``: counters now, the step position at the next epoch loop."""
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.global_step = int(state.get("global_step", 0))
        self._resume_state = None if state.get("epoch_done") else dict(state)

    def _run_get(self, key, default=None):
        return self.run_cfg.get(key, default) if self.run_cfg is not None else default

    def build_model(self, cfg):
        """On CPU everything runs in fp32: LAVIS loads the LLM and ViT in half precision, which fails on
        CPU (RuntimeError: Input type (float) and bias type (c10::Half) should be the same)."""
        model = super().build_model(cfg)
        if str(cfg.run_cfg.get("device", "cpu")).startswith("cpu"):
            model = model.float()
        return model

    def _autocast(self, device: torch.device, model=None):
        return run_autocast(self.run_cfg, device, model)

    # ---- training -----------------------------------------------------------------------------
    def _count_nonfinite(self, what: str, step: int) -> None:
        """Skip this step's update, count it, and stop after ``run.max_nonfinite_in_row`` in a row."""
        self.nonfinite_steps += 1
        self.nonfinite_in_row += 1
        limit = int(self._run_get("max_nonfinite_in_row", 20))
        logger.warning("step %d: non-finite %s, update skipped (%d in a row, %d in this run)",
                       step, what, self.nonfinite_in_row, self.nonfinite_steps)
        if self.tracker is not None:
            self.tracker.scalar("train/nonfinite_steps", self.nonfinite_steps, step)
        if self.nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_row} non-finite losses/gradients in a row (step {step}, run.max_nonfinite_in_row="
                f"{limit}); lower run.init_lr, set run.max_grad_norm, use run.amp_dtype: bf16 instead of fp16, "
                "or check the data"
            )

    def _finish_window(self, model, optimizer, scaler, max_norm, window_bad, loss, step, device) -> None:
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
        if bool(bad.item()):  # the one host sync per optimizer step
            if not bool(window_bad.item()):
                what = "loss on another rank" if norm is None or bool(torch.isfinite(norm).item()) else f"gradient norm {norm.item()}"
            else:
                what = f"loss {loss.item()}" if not bool(torch.isfinite(loss.detach()).item()) else "loss earlier in the window"
            if scaler is not None and norm is not None:
                scaler.update()  # unscale_ ran: close the scaler's step (it lowers the scale on the inf it saw)
            self._count_nonfinite(what, step)
        else:
            self.nonfinite_in_row = 0
            if scaler is not None:
                scaler.step(optimizer)  # GradScaler skips inf/nan fp16 steps on its own
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _train_inner_loop(
        self,
        epoch,
        iters_per_epoch,
        model,
        data_loader,
        optimizer,
        lr_scheduler,
        scaler=None,
        start_iters=None,
        log_freq=50,
        cuda_enabled=False,
        accum_grad_iters=1,
    ):
        device = model_device(model)
        if not hasattr(data_loader, "__next__"):
            data_loader = iter(data_loader)
        inner_epoch = epoch if start_iters is None else start_iters // iters_per_epoch
        base_step = (start_iters if start_iters is not None else epoch * iters_per_epoch)
        max_norm = self._run_get("max_grad_norm", None)
        loss_sum = torch.zeros((), device=device)
        first = 0
        resume, self._resume_state = self._resume_state, None
        if resume is not None and resume.get("epoch") == epoch:
            # mid-epoch resume: the runner restored weights, optimizer, data position and RNG states
            if int(resume.get("iters_per_epoch", iters_per_epoch)) != iters_per_epoch:
                raise ValueError(
                    f"the checkpoint's epoch has {resume['iters_per_epoch']} steps, this run's {iters_per_epoch}; "
                    "resume with the same data, batch size and number of processes"
                )
            first = int(resume["step"])
            loss_sum += float(resume.get("loss_sum", 0.0))
            logger.info("epoch %d: continuing at step %d of %d", epoch, first, iters_per_epoch)
        self._loop = {"loss_sum": loss_sum}
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
            with self._autocast(device, model):
                loss = self.train_step(model=model, samples=samples)
            scaled = loss / accum_grad_iters
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            window_bad |= ~torch.isfinite(loss.detach()).all()
            if (i + 1) % accum_grad_iters == 0:
                self._finish_window(model, optimizer, scaler, max_norm, window_bad, loss, base_step + i + 1, device)
                window_bad = torch.zeros((), dtype=torch.bool, device=device)
            loss_sum += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            self.global_step = base_step + i + 1
            if self.step_hook is not None and (i + 1) % accum_grad_iters == 0:
                # between optimizer steps: no gradient is pending, so the state on disk is complete
                self.step_hook(epoch, i + 1, iters_per_epoch, self.loop_state)
            if (i + 1) % log_freq == 0 or i + 1 == iters_per_epoch:
                # One host sync per log interval, not per step.
                shown_loss = loss.item()
                lr = peak_lr(optimizer)
                progress.set_postfix(loss=f"{shown_loss:.4f}", lr=f"{lr:.2e}")
                if self.tracker is not None:
                    self.tracker.scalar("train/loss", shown_loss, self.global_step)
                    self.tracker.scalar("train/lr", lr, self.global_step)
        progress.close()
        self._loop = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= dist.get_world_size()
        mean_loss = (loss_sum / max(iters_per_epoch, 1)).item()
        if not math.isfinite(mean_loss):
            logger.warning("epoch %d mean training loss is %s", epoch, mean_loss)
        logger.info("epoch %d: mean loss %.4f, last lr %.3e", epoch, mean_loss, peak_lr(optimizer))
        if self.tracker is not None:
            self.tracker.scalar("train/epoch_loss", mean_loss, self.global_step)
        return {
            "loss": f"{mean_loss:.3f}",
            "lr": f"{optimizer.param_groups[0]['lr']:.6f}",
            "nonfinite_steps": self.nonfinite_steps,
        }

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=None):
        """`cuda_enabled` is ignored: batches go to the model's device (LAVIS defaults it to True)."""
        device = model_device(model)
        results = []
        for samples in tqdm(data_loader, desc="evaluate", disable=not is_main_process(), dynamic_ncols=True, mininterval=1.0):
            samples = move_to_device(samples, device)
            with self._autocast(device, model):
                results.extend(self.valid_step(model=model, samples=samples))
        if dist.is_initialized():
            dist.barrier()
        return results
