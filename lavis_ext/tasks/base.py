"""What every lavis_ext task adds to LAVIS's BaseTask: a device-agnostic evaluation loop and CPU-safe models.

LAVIS 1.0.2's evaluation assumes CUDA (`prepare_sample(cuda_enabled=True)` moves every batch to the GPU,
amp is CUDA-only, `SmoothedValue` syncs through a GPU tensor). The loop here moves batches to the model's
device, autocasts as `lavis_ext.precision` says and shows a progress bar on the main process. Models, data and
metrics stay LAVIS's. The training loop is the runner's (:mod:`lavis_ext.runners.loop`).
"""
from __future__ import annotations

import json
import logging
import os
from types import MappingProxyType
from typing import Any, Mapping

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


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class TaskExtMixin:
    """Mix in before the LAVIS task class: CPU-safe model building and a device-agnostic evaluation loop.

    The training loop is not here: the runner drives it (:mod:`lavis_ext.runners.loop`) and asks the task only
    for ``train_step``, as it would a plain LAVIS task."""

    run_cfg = None  # the run config (evaluation's autocast, seeds); kept by build_model
    # the run.* options this task reads beyond the ones every run has (lavis_ext.config.RUN_KEYS), with their
    # defaults, stated once here: the config check accepts them for this task only (`run.k_test` in a captioning
    # project fails as a typo would), setup_task and lavis_ext.inference read them through `options`
    run_options: Mapping[str, Any] = MappingProxyType({})

    @classmethod
    def options(cls, run_cfg=None) -> dict:
        """This task's ``run_options``: the run's values over the defaults."""
        return {key: (run_cfg.get(key, default) if run_cfg is not None else default)
                for key, default in cls.run_options.items()}

    def _run_get(self, key, default=None):
        return self.run_cfg.get(key, default) if self.run_cfg is not None else default

    def build_model(self, cfg):
        """On CPU everything runs in fp32: LAVIS loads the LLM and ViT in half precision, which fails on
        CPU (RuntimeError: Input type (float) and bias type (c10::Half) should be the same).
        Also keeps ``cfg.run_cfg``: LAVIS hands the config to a task only here, in ``build_datasets`` and in
        ``setup_task`` (which each task overrides), and evaluation's autocast reads it."""
        self.run_cfg = cfg.run_cfg
        model = super().build_model(cfg)
        if str(cfg.run_cfg.get("device", "cpu")).startswith("cpu"):
            model = model.float()
        return model

    def _autocast(self, device: torch.device, model=None):
        return run_autocast(self.run_cfg, device, model)

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
