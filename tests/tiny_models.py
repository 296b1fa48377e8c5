"""Tiny BLIP-2 models and inputs shared by the unit tests (needs the `synthetic_root` fixture first:
the tiny configs read their tokenizers from $LAVIS_EXT_DATA)."""
from __future__ import annotations

import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf


# `--options` for a short train+eval through the real entry points, any task: 1 epoch, greedy decoding.
# (Task-specific options such as captioning's run.constant_baseline go beside it: the config check refuses
# them for other tasks.)
QUICK = [
    "run.max_epoch=1",
    "run.batch_size_train=16",
    "run.batch_size_eval=16",
    "run.num_workers=0",
    "run.num_beams=1",
    "run.max_len=8",
    "run.warmup_steps=5",
    "run.log_freq=5",
]


def tiny_config(arch: str, **overrides):
    cls = registry.get_model_class(arch)
    return OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, overrides)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """The tiny model of ``arch`` with config ``overrides``, initialised from ``seed``."""
    cls = registry.get_model_class(arch)
    torch.manual_seed(seed)
    return cls.from_config(tiny_config(arch, **overrides))


def images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


class SometimesNaN(torch.nn.Module):
    """A one-weight model, loss = (w x)^2, NaN on the batches flagged ``bad`` (the non-finite guard's tests)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, samples):
        loss = (self.weight * samples["x"]).pow(2).sum()
        return {"loss": loss * float("nan") if samples["bad"] else loss}


def train_sometimes_nan(flags, check=None, *, device="cpu", max_in_row=5, max_grad_norm=1.0, log_freq=100):
    """One epoch of the task loop over :class:`SometimesNaN` with fused AdamW, batch ``i`` NaN where ``flags[i]``;
    ``check``: ``run.nonfinite_check``. Returns (model, optimizer, loop, epoch stats)."""
    from lavis.common.optims import LinearWarmupCosineLRScheduler

    from lavis_ext.runners.loop import TrainLoop
    from lavis_ext.tasks.captioning import CaptionTaskExt

    model = SometimesNaN().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=0.1, init_lr=0.1)
    task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
    loop = TrainLoop(OmegaConf.create({"max_nonfinite_in_row": max_in_row, "max_grad_norm": max_grad_norm,
                                       "nonfinite_check": check}))
    loader = iter([{"x": torch.full((1,), 1.0 + 0.1 * i), "bad": bad} for i, bad in enumerate(flags)])
    stats = loop.run_epoch(task, 0, len(flags), model, loader, optimizer, scheduler, log_freq=log_freq)
    return model, optimizer, loop, stats


def retask(project, task: str, out_dir) -> "Path":
    """``project`` (a YAML path) written to ``out_dir`` as a project of ``task``: the task swapped and the run
    options only the old task reads dropped (the config check refuses them for ``task``)."""
    from pathlib import Path

    from lavis_ext.config import run_keys_for
    from lavis_ext.project_files import load_project_yaml

    cfg = load_project_yaml(project)
    cfg.run.task = task
    for key in [k for k in cfg.run if k not in run_keys_for(task)]:
        cfg.run.pop(key)
    path = Path(out_dir) / f"{Path(project).stem}_as_{task}.yaml"
    OmegaConf.save(cfg, path)
    return path
