"""Golden losses: the first 20 training losses of a seeded tiny OPT caption run and a tiny Flan-T5 VQA run.

A safety net for every change to the loop, precision, models, data pipeline or config defaults: any change
of numerics shows up here in seconds, long before a demo's CIDEr moves.

Tolerance, rtol = 5e-5 per step. Why that number (measured on the 2-core dev machine, fp32 CPU):
- kernel reduction order is the only noise a numerics-preserving change may add; running the same job with
  1 instead of 2 threads moves these losses by at most 1.6e-7 (relative), so 5e-5 leaves a ~300x margin
  for other CPUs' kernels;
- small real changes are caught: ``run.weight_decay`` 0.05 -> 0.049 moves step 20 by 1.2e-4, and
  ``run.warmup_lr`` +10% moves steps 2-20 by 1e-4 to 9e-4.
If a change is meant to alter numerics, re-pin with the command in the failure message and say why in
the commit.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lavis_ext import cli
from tiny_models import QUICK

REPO = Path(__file__).resolve().parents[2]
RTOL = 5e-5
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
def test_first_20_losses_are_pinned(synthetic_root, tmp_path, project, dataset):
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
