"""The demo's metrics band (issue 17, item 4): `make demo`'s recipe, as shipped, still learns with margin.

The golden losses catch a numerics change in seconds; this slow test catches one that keeps the first 20 steps
but costs caption quality over a whole run (a schedule, decoding, metric or data-pipeline change).

Band, from the recipe's three seeds on `make data`'s set (4000 train images, 9 epochs; test CIDEr-D of the best
val checkpoint, greedy): 42 -> 3.683, 43 -> 3.762, 44 -> 3.849 (mean 3.765 +- 0.083). The floor sits 0.28 below
the lowest seed:
another CPU's kernels change the trajectory as much as another seed does, and neighbouring checkpoints of one
run differ by up to 0.35, so a tighter floor would fail on healthy machines. The issue's own bar, >= 3x the best
constant caption (1.016 on this test split), is checked as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavis_ext import cli

REPO = Path(__file__).resolve().parents[2]
SEED_CIDER = {42: 3.683, 43: 3.762, 44: 3.849}
DEMO_FLOOR = 3.4


@pytest.fixture(scope="module")
def full_synthetic_root(tmp_path_factory) -> Path:
    """The synthetic set at `make data`'s size (4000/200/200 images, the same bytes) with its own tokenizers:
    the band is measured on it, not on the session's small set."""
    from lavis_ext.datasets.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic_full")
    generate_dataset(root, seed=0, tokenizers=True)
    return root


@pytest.mark.slow
def test_demo_recipe_clears_its_band(full_synthetic_root, tmp_path, monkeypatch):
    """Seed 42 of projects/tiny/caption_opt.yaml (about 9 min on 2 idle cores)."""
    monkeypatch.setenv("LAVIS_EXT_DATA", str(full_synthetic_root))  # the model's tokenizers come from this set
    runner = cli.train([
        "--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", "run.seed=42",
        f"run.output_dir={tmp_path}", f"datasets.wds_caption.build_info.root={full_synthetic_root}",
    ])
    metrics = json.loads((Path(runner.output_dir) / "test_epochbest_metrics.json").read_text())["metrics"]
    assert metrics["CIDEr"] >= DEMO_FLOOR, (
        f"test CIDEr-D {metrics['CIDEr']:.3f} fell below the demo band's floor {DEMO_FLOOR} "
        f"(seeds scored {SEED_CIDER}); metrics: {metrics}"
    )
    assert metrics["CIDEr"] >= 3.0 * metrics["constant_baseline_CIDEr"], metrics
