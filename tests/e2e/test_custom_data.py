"""A user's own images + JSONL captions train and evaluate through train.py's path with no code (json_caption)."""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

from lavis_ext import cli
from tiny_models import QUICK

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "projects/tiny/caption_custom_jsonl.yaml"


def _custom_dataset(synthetic_root: Path, out: Path) -> dict:
    """48 synthetic images copied out of the shards into folders, with JSONL annotations as a user would write
    them: train in Karpathy style (one record per caption, two per image), val/test with a captions list.
    One train image and one val image are damaged, so skipping is exercised in both modes."""
    images = []
    for shard in sorted((synthetic_root / "train").glob("shard-*.tar"))[:6]:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                key = name[: -len(".json")]
                images.append((key, tar.extractfile(members[f"{key}.jpg"]).read(), json.load(tar.extractfile(members[name]))))
    assert len(images) == 48
    splits = {"train": images[:32], "val": images[32:40], "test": images[40:]}
    for split, items in splits.items():
        folder = out / "images" / split
        folder.mkdir(parents=True)
        lines = []
        for key, jpg, meta in items:
            (folder / f"{key}.jpg").write_bytes(jpg)
            rel = f"{split}/{key}.jpg"
            if split == "train":
                lines += [{"image": rel, "caption": c} for c in meta["captions"][:2]]  # 64 pairs: 4 steps of 16
            else:
                lines.append({"image": rel, "captions": meta["captions"], "image_id": key})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "images" / "train" / f"{splits['train'][3][0]}.jpg").write_bytes(b"not an image")
    (out / "images" / "val" / f"{splits['val'][0][0]}.jpg").unlink()
    return splits


def test_custom_jsonl_captions_train_and_evaluate(synthetic_root, tmp_path):
    _custom_dataset(synthetic_root, tmp_path / "mine")
    runner = cli.train(
        ["--cfg-path", str(PROJECT), "--options", *QUICK, f"run.output_dir={tmp_path / 'runs'}",
         f"datasets.json_caption.build_info.root={tmp_path / 'mine'}", "run.test_splits=[]"]  # scoring costs ~15 s a split
    )
    run_dir = Path(runner.output_dir)
    train_stats = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if "train_loss" in line]
    assert train_stats and math.isfinite(float(train_stats[-1]["train_loss"]))
    val = json.loads((run_dir / "val_epoch0_metrics.json").read_text())
    assert val["num_images"] == 7  # the missing val image is skipped, not scored
    assert math.isfinite(val["metrics"]["CIDEr"])
    results = json.loads((run_dir / "result" / "val_epoch0.json").read_text())
    assert len(results) == 7 and set(results[0]) == {"image_id", "caption"}
    assert len(runner.datasets["test"]) == 8  # built from test.jsonl (the project's third split), not run here
    assert runner.datasets["train"].datasets[0].skipped["corrupt_image"] == 1
