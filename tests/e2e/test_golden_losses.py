"""Golden losses: the first 20 training losses of a seeded tiny OPT caption run and a tiny Flan-T5 VQA run.

A safety net for every change to the loop, precision, models, data pipeline or config defaults: any change
of numerics shows up here in seconds, long before a demo's CIDEr moves.

Tolerance, rtol = 2e-5 per step, on one torch thread. Why (measured on the 2-core dev machine, fp32 CPU,
with the demo recipe of 2026-12-05: ViT 96 wide x 4, 16-px patches):
- the same job on one thread gives the same losses run after run; 2 threads instead of 1 move the OPT losses by
  up to 6.3e-5 (relative, growing with the step: reduction order), as much as a real change, so the test pins
  one thread (the ``one_thread`` fixture) rather than loosening the tolerance;
- small real changes are caught: ``run.weight_decay`` 0.05 -> 0.049 moves the OPT losses by 6.5e-5 (3x the
  tolerance), ``run.warmup_lr`` +10% by 4e-3.
Another CPU's kernels may differ by more than 2e-5 even on one thread: re-pin there if the failure message
shows a small, smooth drift and no code changed.
If a change is meant to alter numerics, re-pin with the command in the failure message and say why in
the commit.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lavis_ext import cli
from tiny_models import QUICK

REPO = Path(__file__).resolve().parents[2]
RTOL = 2e-5
STEPS = 20  # x batch 16 = the first 320 training units of the session's synthetic data

GOLDEN = {
    ("projects/tiny/caption_opt.yaml", "wds_caption"): [
        6.620553, 6.472683, 6.172862, 5.848763, 5.772137,
        5.347548, 5.265781, 5.143837, 4.935215, 4.890548,
        4.731931, 4.486481, 4.451651, 4.448728, 4.210195,
        3.992049, 4.059390, 3.708275, 3.606745, 3.387082,
    ],
    ("projects/tiny/vqa_t5.yaml", "wds_vqa"): [
        6.379489, 6.487702, 6.077720, 5.550130, 5.052905,
        4.728147, 4.329264, 3.981507, 3.613603, 3.622113,
        3.423079, 3.620821, 3.229750, 3.318109, 3.009385,
        3.104299, 2.930889, 3.183582, 2.943747, 2.824139,
    ],
}


@pytest.mark.parametrize("project,dataset", list(GOLDEN), ids=["opt_caption", "t5_vqa"])
def test_first_20_losses_are_pinned(synthetic_root, tmp_path, one_thread, project, dataset):
    runner = cli.train([
        "--cfg-path", str(REPO / project), "--options", *QUICK, "run.log_freq=1",
        f"run.output_dir={tmp_path}", "run.valid_splits=[]", "run.test_splits=[]",
        f"datasets.{dataset}.build_info.lengths.train={STEPS * 16}",
    ])
    losses = [value for _, value in runner.tracker.history["train/loss"]]
    assert len(losses) == STEPS
    golden = GOLDEN[(project, dataset)]
    worst = max(abs(got - want) / abs(want) for got, want in zip(losses, golden))
    assert worst <= RTOL, (
        f"{project}: losses moved by up to {worst:.2e} (relative; tolerance {RTOL:.0e}).\n"
        f"got:    {[round(v, 6) for v in losses]}\nwanted: {golden}\n"
        "If the change is meant to alter numerics, re-pin GOLDEN with the 'got' line and say why."
    )
