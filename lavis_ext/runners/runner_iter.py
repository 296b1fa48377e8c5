"""`runner_iter`: training counted in iterations (``run.max_iters``), for endless webdataset streams.

After `lavis_ext.register()` the registry name ``runner_iter`` resolves to :class:`RunnerIterExt`
(LAVIS's class stays reachable as ``runner_iter_lavis``). LAVIS's RunnerIter treats every
``iters_per_inner_epoch`` iterations as an *inner epoch*: the LR schedule counts inner epochs
(``max_epoch = max_iters / iters_per_inner_epoch``, warm-up in the first), and each inner epoch ends with
validation and a checkpoint. That is runner_base's loop with an epoch of a fixed number of steps, so
this class is :class:`~lavis_ext.runners.runner_base.RunnerBaseExt` (CPU/DDP/FSDP model wrapping, no CUDA
prefetch stream, safetensors checkpoints with exact resume, best/latest, validation frequency, mixing by
sample ratio) with only these differences:

* an epoch is ``iters_per_inner_epoch`` steps whatever the data's length; a training split needs no
  length (an endless resampled stream, :mod:`lavis_ext.datasets.wds_stream`, ends a pass every inner
  epoch; a finite one starts its next pass when it runs out, where LAVIS's ``iter(DataLoader)`` stops
  with StopIteration);
* the loop (:class:`~lavis_ext.runners.loop.TrainLoop`, where LAVIS calls the task's ``train_iters``) runs
  with ``start_iters`` of the inner epoch, and the checkpoint at the end of an inner epoch is named by its last iteration,
  ``checkpoint_<iters>.safetensors``, as LAVIS names its ``.pth``; step checkpoints are
  ``checkpoint_step<iters>``.

What LAVIS 1.0.2's RunnerIter does instead, and why not: it saves the **whole** state dict (all of a
frozen OPT/Flan-T5, :mod:`lavis_ext.checkpoints` keeps the trainable tensors) by ``torch.save``; it
resumes at ``iters + 1`` (one iteration skipped, inner epochs misaligned) with no data position, scheduler
or RNG state; ``run.train_dataset_ratios`` fails (UnboundLocalError, runner_iter.py:250); a finite
webdataset split ends training with StopIteration; validation ``cur_epoch`` is the string
``"<epoch>_iters=<n>"`` (here the inner epoch, so ``run.val_freq`` counts inner epochs). Testing after
the last inner epoch uses the best checkpoint when there are validation splits (runner_base's rule; LAVIS's
RunnerIter tests the last weights).
"""
from __future__ import annotations

import logging
from pathlib import Path

from lavis.common.registry import registry
from lavis.runners.runner_iter import RunnerIter

from lavis_ext.runners.runner_base import RunnerBaseExt

logger = logging.getLogger(__name__)


def _positive_iters(run_cfg, key: str) -> int:
    value = run_cfg.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number != int(number):
        raise ValueError(
            f"run.{key}={value!r}: runner_iter needs a positive whole number of iterations "
            f"(e.g. run.max_iters=250000 run.iters_per_inner_epoch=5000)"
        )
    return int(number)


@registry.register_runner("runner_iter_ext")
class RunnerIterExt(RunnerBaseExt):
    """Args: as RunnerBaseExt; reads ``run.max_iters`` and ``run.iters_per_inner_epoch``.

    Raises:
        ValueError: a missing or non-positive count, or ``max_iters`` not a multiple of
            ``iters_per_inner_epoch`` (the scheduler counts whole inner epochs).
    """

    def __init__(self, cfg, task, model, datasets, job_id, resume_path: str | None = None):
        run = cfg.run_cfg
        self.max_iters = _positive_iters(run, "max_iters")
        self.iters_per_inner_epoch = _positive_iters(run, "iters_per_inner_epoch")
        if self.max_iters % self.iters_per_inner_epoch:
            whole = -(-self.max_iters // self.iters_per_inner_epoch) * self.iters_per_inner_epoch
            raise ValueError(
                f"run.max_iters={self.max_iters} is not a multiple of run.iters_per_inner_epoch="
                f"{self.iters_per_inner_epoch}; the LR schedule counts whole inner epochs: use e.g. "
                f"run.max_iters={whole}"
            )
        if run.get("max_epoch") is not None:
            logger.info("runner_iter: run.max_epoch=%s is ignored; %d iterations = %d inner epochs of %d",
                        run.get("max_epoch"), self.max_iters, self.max_epoch, self.iters_per_inner_epoch)
        super().__init__(cfg, task, model, datasets, job_id, resume_path=resume_path)

    @property
    def max_epoch(self) -> int:
        """Inner epochs: what the LR scheduler, validation frequency and the loop count."""
        return self.max_iters // self.iters_per_inner_epoch

    def _epoch_steps(self, natural, what) -> int:
        return self.iters_per_inner_epoch

    def _pass_steps(self, natural):
        return self.iters_per_inner_epoch

    def checkpoint_path(self, tag) -> Path:
        """Inner-epoch checkpoints are named by their last iteration, as LAVIS's runner_iter does."""
        if isinstance(tag, int):
            tag = (tag + 1) * self.iters_per_inner_epoch
        return super().checkpoint_path(tag)

    def train_epoch(self, epoch):
        """Inner epoch ``epoch``: iterations ``epoch x iters_per_inner_epoch`` + [0, iters_per_inner_epoch)."""
        start = epoch * self.iters_per_inner_epoch
        logger.info("training iterations %d-%d of %d (inner epoch %d of %d)",
                    start + 1, start + self.iters_per_inner_epoch, self.max_iters, epoch + 1, self.max_epoch)
        self.model.train()
        return self.loop.run_epoch(
            self.task,
            epoch=epoch,
            start_iters=start,
            iters_per_epoch=self.iters_per_inner_epoch,
            model=self.model,
            data_loader=self.train_loader,
            optimizer=self.optimizer,
            scaler=self.scaler,
            lr_scheduler=self.lr_scheduler,
            log_freq=self.log_freq,
            accum_grad_iters=self.accum_grad_iters,
        )
