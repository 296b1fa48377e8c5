"""The synthetic shapes world: deterministic bytes, varied text that states the content, consistent sizes."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import numpy as np
import pytest
from PIL import Image

from lavis_ext.datasets.synthetic import COLORS, generate_dataset, main, make_example

SIZES = {"train": 24, "val": 8, "test": 8}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with tarfile (independent of webdataset)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn_a")
    generate_dataset(root, seed=0, num_images=SIZES, images_per_shard=8)
    return root


def _all_meta(root: Path) -> list[tuple[dict, bytes]]:
    sizes = json.loads((root / "sizes.json").read_text())
    out = []
    for info in sizes["splits"].values():
        for shard in braceexpand.braceexpand(info["shards"]):
            for sample in _samples(root / shard).values():
                out.append((json.loads(sample["json"]), sample["jpg"]))
    return out


def test_same_seed_gives_identical_bytes_and_other_seed_differs(generated, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, seed=0, num_images=SIZES, images_per_shard=8)
    first, second = _files(generated), _files(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []

    other = tmp_path / "other"
    generate_dataset(other, seed=1, num_images=SIZES, images_per_shard=8)
    third = _files(other)
    shards = [name for name in first if name.endswith(".tar")]
    assert all(first[name] != third[name] for name in shards)


def test_an_image_does_not_depend_on_how_many_were_asked_for(generated):
    example = make_example(0, "train", 3)
    stored = _samples(generated / "train" / "shard-000000.tar")["train-000003"]
    assert stored["jpg"] == example["jpg"]
    assert json.loads(stored["json"]) == example["json"]


def test_sizes_json_matches_the_tar_contents(generated):
    sizes = json.loads((generated / "sizes.json").read_text())
    assert sizes["seed"] == 0 and sizes["image_size"] == 64
    assert set(sizes["splits"]) == {"train", "val", "test"}
    for split, info in sizes["splits"].items():
        shards = list(braceexpand.braceexpand(info["shards"]))
        assert len(shards) == info["num_shards"] == -(-SIZES[split] // 8)
        assert sorted(p.name for p in (generated / split).iterdir()) == sorted(Path(s).name for s in shards)
        keys, captions, questions = [], 0, 0
        for shard in shards:
            for key, sample in _samples(generated / shard).items():
                assert set(sample) == {"jpg", "json"}
                meta = json.loads(sample["json"])
                assert meta["image_id"] == key
                keys.append(key)
                captions += len(meta["captions"])
                questions += len(meta["questions"])
        assert keys == [f"{split}-{i:06d}" for i in range(SIZES[split])]
        assert (info["images"], info["captions"], info["questions"]) == (SIZES[split], captions, questions)


def test_every_image_has_distinct_captions_and_ten_answer_questions(generated):
    metas = _all_meta(generated)
    qtypes, atypes, qids = Counter(), Counter(), set()
    for meta, jpg in metas:
        assert Image.open(io.BytesIO(jpg)).size == (64, 64)
        caps = meta["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert cap == cap.lower() and not cap.endswith(".") and cap.strip() == cap
        assert 3 <= len(meta["questions"]) <= 5
        for q in meta["questions"]:
            assert q["question_id"].startswith(meta["image_id"] + "-q") and q["question_id"] not in qids
            qids.add(q["question_id"])
            assert len(q["answers"]) == 10
            top, count = Counter(q["answers"]).most_common(1)[0]
            assert count >= 7, q  # noise never outvotes the truth
            qtypes[q["question_type"]] += 1
            atypes[q["answer_type"]] += 1
            if q["answer_type"] == "number":
                assert top.isdigit()
            if q["answer_type"] == "yes/no":
                assert top in ("yes", "no")
    assert set(qtypes) == {"color", "shape", "count", "relation"}
    assert set(atypes) == {"other", "number", "yes/no"}
    noisy = sum(len(set(q["answers"])) > 1 for m, _ in metas for q in m["questions"])
    assert noisy > 0  # leave-one-out VQA accuracy must have something to average over


def _centroid(pixels: np.ndarray, rgb) -> np.ndarray | None:
    dist = np.abs(pixels.astype(int) - np.array(rgb)).sum(-1)
    ys, xs = np.nonzero(dist < 90)
    return None if len(xs) < 20 else np.array([xs.mean(), ys.mean()])


def test_answers_describe_the_pixels(generated):
    """Colour answers are present in the image; 'where' answers match the shapes' centroids."""
    checked = {"color": 0, "where": 0}
    where_re = re.compile(r"where is the (\w+) (\w+) relative to the (\w+) (\w+)\?")
    for meta, jpg in _all_meta(generated):
        pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
        for q in meta["questions"]:
            top = Counter(q["answers"]).most_common(1)[0][0]
            if q["question"].startswith("what color"):
                assert _centroid(pixels, COLORS[top]) is not None, (meta["image_id"], q)
                checked["color"] += 1
            match = where_re.match(q["question"])
            if match:
                a, b = _centroid(pixels, COLORS[match[1]]), _centroid(pixels, COLORS[match[3]])
                dx, dy = a - b
                expected = {"left": dx < -8, "right": dx > 8, "above": dy < -8, "below": dy > 8}[top]
                assert expected, (meta["image_id"], q, dx, dy)
                checked["where"] += 1
    assert checked["color"] > 10 and checked["where"] > 3


def test_cli_writes_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--train", "8", "--val", "4", "--test", "4", "--images-per-shard", "4", "--no-tokenizers"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "train 8 images/40 captions" in line and "2 shards" in line
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["splits"]["train"]["shards"] == "train/shard-{000000..000001}.tar"
    assert not (out / "tokenizers").exists()


def test_bad_arguments_fail_with_the_value(tmp_path):
    with pytest.raises(ValueError, match="'dev'"):
        generate_dataset(tmp_path, num_images={"dev": 3})
    with pytest.raises(ValueError, match="images_per_shard"):
        generate_dataset(tmp_path, num_images={"train": 3}, images_per_shard=0)


def test_tokenizers_are_built_from_the_dataset_text(synthetic_root):
    for name in ("bert", "opt", "t5"):
        assert any((synthetic_root / "tokenizers" / name).iterdir()), name
