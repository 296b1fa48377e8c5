"""Print the test-split caption metrics of the newest run under a folder, next to the constant baseline.

Used by `make demo` after training: `python -m lavis_ext.summary runs/demo`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def newest_run(root: Path) -> Path:
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not runs:
        raise FileNotFoundError(f"no run folders under {root}; train first (make demo)")
    return runs[-1]


def summarise(root: str | Path, split: str = "test") -> dict:
    run = newest_run(Path(root))
    files = sorted(run.glob(f"{split}_epoch*_metrics.json"))
    if not files:
        raise FileNotFoundError(f"no {split} metrics in {run}; did the run finish its test phase?")
    record = json.loads(files[-1].read_text())
    metrics = record["metrics"]
    print(f"\n== {split} split, {record.get('num_images', '?')} images, run {run} ==")
    for key in KEYS:
        print(f"  {key:8s} {metrics[key]:.4f}")
    for name, reason in record.get("skipped", {}).items():
        print(f"  {name:8s} skipped ({reason.split(';')[0]})")
    if "constant_baseline_CIDEr" in metrics:
        base = metrics["constant_baseline_CIDEr"]
        ratio = metrics["CIDEr"] / base if base else float("inf")
        print(f"  best constant caption {metrics['constant_baseline_caption']!r}: CIDEr {base:.4f}")
        print(f"  trained model / constant baseline: {ratio:.2f}x")
    return record


if __name__ == "__main__":
    summarise(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
