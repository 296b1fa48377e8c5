"""The webdataset split: exactly once across ranks x workers, skip-and-count, shuffle per epoch, builders."""
from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import pytest
import torch
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor, BlipQuestionProcessor
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_ext.datasets.synthetic import generate_dataset
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset, collate, expand_shards, read_sizes, split_length

# train: 8 shards (divides 4 readers -> shard split); val: 4 shards; test: 2 shards (< 4 readers -> sample split)
SIZES = {"train": 32, "val": 16, "test": 8}
VIS = BlipImageEvalProcessor(image_size=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    generate_dataset(root, seed=0, num_images=SIZES, images_per_shard=4)
    return root


def _meta(root: Path, split: str) -> list[dict]:
    pattern = read_sizes(root / "sizes.json")["splits"][split]["shards"]
    metas = []
    for shard in braceexpand.braceexpand(pattern):
        with tarfile.open(root / shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def _expected(root: Path, split: str, mode: str) -> Counter:
    metas = _meta(root, split)
    if mode == "caption_train":
        return Counter((m["image_id"], c) for m in metas for c in m["captions"])
    if mode == "caption_eval":
        return Counter(m["image_id"] for m in metas)
    return Counter(q["question_id"] for m in metas for q in m["questions"])


def _ids(batch: dict, mode: str) -> list:
    if mode == "caption_train":
        return list(zip(batch["image_id"], batch["text_input"]))
    return list(batch["image_id"] if mode == "caption_eval" else batch["question_id"])


def _dataset(root, split, mode, **kw) -> WdsSplitDataset:
    sizes = read_sizes(root / "sizes.json")
    kw.setdefault("vis_processor", VIS)
    return WdsSplitDataset(
        sizes["splits"][split]["shards"], mode, root=root, length=split_length(sizes, split, mode), **kw
    )


@pytest.mark.parametrize(
    "split, mode",
    [("train", "caption_train"), ("val", "caption_eval"), ("test", "vqa_eval"), ("train", "vqa_train")],
)
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(root, split, mode):
    seen = Counter()
    for rank in (0, 1):
        ds = _dataset(root, split, mode, rank=rank, world_size=2, shuffle_buffer=16 if "train" in mode else 0)
        loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=ds.collater)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 64, 64)
            seen.update(_ids(batch, mode))
    expected = _expected(root, split, mode)
    assert seen == expected
    assert sum(expected.values()) == len(ds)


@pytest.mark.parametrize("world", [3, 5])
def test_uneven_shards_fall_back_to_sample_split_without_duplicates(root, world):
    seen = Counter()
    for rank in range(world):
        ds = _dataset(root, "val", "caption_eval", rank=rank, world_size=world)
        seen.update(s["image_id"] for s in ds)
    assert seen == _expected(root, "val", "caption_eval")


def test_explicit_shard_split_with_too_few_shards_fails_clearly(root):
    ds = _dataset(root, "test", "caption_eval", rank=0, world_size=4, split_by="shard")
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 4 rank\(s\) x 1 worker\(s\)"):
        next(iter(ds))


def test_output_fields_per_mode(root):
    cap = next(iter(_dataset(root, "val", "caption_train", text_processor=BlipCaptionProcessor(prompt="a photo of "))))
    assert set(cap) == {"image", "text_input", "image_id"} and cap["text_input"].startswith("a photo of ")
    ev = next(iter(_dataset(root, "val", "caption_eval")))
    assert set(ev) == {"image", "image_id", "captions"} and ev["captions"] == _meta(root, "val")[0]["captions"]
    vt = next(iter(_dataset(root, "val", "vqa_train", text_processor=BlipQuestionProcessor())))
    q = _meta(root, "val")[0]["questions"][0]
    assert vt["text_input"] == f"Question: {BlipQuestionProcessor()(q['question'])} Short answer:"
    assert vt["text_output"] == Counter(q["answers"]).most_common(1)[0][0]
    assert sorted(vt["answers"]) == sorted(set(q["answers"])) and abs(sum(vt["weights"]) - 1) < 1e-6
    ve = next(iter(_dataset(root, "val", "vqa_eval", prompt=None)))
    assert ve["answers"] == q["answers"] and ve["text_input"] == q["question"]
    assert (ve["question_type"], ve["answer_type"], ve["image_id"]) == (q["question_type"], q["answer_type"], "val-000000")


def test_collater_stacks_images_and_keeps_lists_of_lists():
    samples = [{"image": torch.zeros(3, 2, 2), "answers": ["a", "b"], "weights": [0.5, 0.5]},
               {"image": torch.ones(3, 2, 2), "answers": ["c"], "weights": [1.0]}]
    batch = collate(samples)
    assert batch["image"].shape == (2, 3, 2, 2)
    assert batch["answers"] == [["a", "b"], ["c"]] and batch["weights"] == [[0.5, 0.5], [1.0]]
    assert collate([]) == {}


def test_shuffle_differs_per_epoch_and_repeats_for_the_same_epoch(root):
    def order(epoch, seed=0):
        ds = _dataset(root, "train", "caption_train", shuffle_buffer=64, seed=seed, vis_processor=None)
        ds.set_epoch(epoch)
        return [(s["image_id"], s["text_input"]) for s in ds]

    e0, e0_again, e1 = order(0), order(0), order(1)
    assert e0 == e0_again
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert order(0, seed=1) != e0
    unshuffled = [(s["image_id"], s["text_input"]) for s in _dataset(root, "train", "caption_train", vis_processor=None)]
    assert e0 != unshuffled and sorted(e0) == sorted(unshuffled)


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _caption_json(key, captions=("a red square", "a square that is red")) -> bytes:
    return json.dumps({"image_id": key, "captions": list(captions), "questions": [
        {"question_id": f"{key}-q0", "question": "what color is the square?",
         "answers": ["b", "a", "a", "b", "c", "a", "b", "x", "y", "z"], "question_type": "color", "answer_type": "other"},
    ]}).encode()


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = _jpeg()
    entries = []
    for key in ("s0", "s1"):
        entries += [(f"{key}.jpg", good), (f"{key}.json", _caption_json(key))]
    entries += [("bad_img.jpg", b"\xff\xd8 not really a jpeg"), ("bad_img.json", _caption_json("bad_img"))]
    entries += [("no_json.jpg", good)]
    entries += [("no_jpg.json", _caption_json("no_jpg"))]
    entries += [("bad_json.jpg", good), ("bad_json.json", b"{not json")]
    entries += [("no_text.jpg", good), ("no_text.json", _caption_json("no_text", captions=()))]
    entries += [("s2.jpg", good), ("s2.json", _caption_json("s2"))]
    _write_tar(tmp_path / "mixed-0.tar", entries)
    # a shard cut inside a member's data: a read error (counted once), the samples before the cut arrive
    _write_tar(tmp_path / "full.tar", [("t0.jpg", good), ("t0.json", _caption_json("t0")),
                                       ("t1.jpg", good), ("t1.json", _caption_json("t1"))])
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("t1.jpg").offset_data + 100
    (tmp_path / "mixed-1.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut])
    (tmp_path / "mixed-2.tar").write_bytes(b"this is not a tar file" * 100)  # unreadable: a tar error

    ds = WdsSplitDataset("mixed-{0..2}.tar", "caption_train", vis_processor=VIS, root=tmp_path, max_warnings=20)
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.wds_pipeline"):
        out = list(ds)
    assert Counter(s["image_id"] for s in out) == {"s0": 2, "s1": 2, "s2": 2, "t0": 2}
    assert dict(ds.skipped) == {"corrupt_image": 1, "missing_json": 1, "missing_image": 1, "bad_json": 1,
                                "missing_text": 1, "tar_error": 2}
    text = caplog.text
    for key in ("bad_img", "no_json", "no_jpg", "bad_json", "no_text"):
        assert f"'{key}'" in text, key
    for shard in ("mixed-0.tar", "mixed-1.tar", "mixed-2.tar"):
        assert str(tmp_path / shard) in text, shard
    assert "pass done" in text  # the end-of-pass summary

    vqa = list(WdsSplitDataset(str(tmp_path / "mixed-0.tar"), "vqa_train", vis_processor=VIS))
    assert [s["text_output"] for s in vqa] == ["b"] * 4  # 3-3 tie between b and a: the first seen wins


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    entries = []
    for i in range(30):
        entries += [(f"k{i}.jpg", b"garbage"), (f"k{i}.json", _caption_json(f"k{i}"))]
    _write_tar(tmp_path / "bad.tar", entries)
    ds = WdsSplitDataset(str(tmp_path / "bad.tar"), "caption_eval", vis_processor=VIS, max_warnings=5)
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.wds_pipeline"):
        assert list(ds) == []
    assert ds.skipped == {"corrupt_image": 30}
    assert len(caplog.records) == 5 + 1 + 1  # five samples, "only counting", the pass summary


def test_missing_shards_fail_in_the_constructor_naming_the_pattern(tmp_path, root):
    with pytest.raises(FileNotFoundError, match=r"nope/shard-\{000000..000003\}.tar"):
        WdsSplitDataset("nope/shard-{000000..000003}.tar", "caption_eval", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="1 of 3 shards are missing"):
        expand_shards("val/shard-{000002..000004}.tar", root)
    assert expand_shards(["https://example.com/a-{0..1}.tar", "pipe:cat x.tar"]) == [
        "https://example.com/a-0.tar", "https://example.com/a-1.tar", "pipe:cat x.tar"]


def test_constructor_rejects_bad_values(root):
    with pytest.raises(ValueError, match="'caption_tran'.*'caption_train'"):
        WdsSplitDataset(str(root / "val" / "shard-000000.tar"), "caption_tran")
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        _dataset(root, "val", "vqa_eval", prompt="Answer:")
    with pytest.raises(TypeError, match="length unknown"):
        len(WdsSplitDataset(str(root / "val" / "shard-000000.tar"), "caption_eval"))
    with pytest.raises(KeyError, match="'dev'"):
        split_length(read_sizes(root / "sizes.json"), "dev", "caption_eval")


def test_dataset_pickles_for_spawned_workers(root):
    ds = pickle.loads(pickle.dumps(_dataset(root, "test", "caption_eval")))
    assert sum(1 for _ in ds) == SIZES["test"]


def _builder_cfg(name: str, **build_info):
    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    return cls, cfg


def test_caption_builder_through_the_registry(root):
    cls, cfg = _builder_cfg("wds_caption", root=str(root))
    datasets = cls(cfg).build_datasets()
    assert set(datasets) == {"train", "val", "test"}
    assert (len(datasets["train"]), len(datasets["val"])) == (SIZES["train"] * 5, SIZES["val"])
    assert (datasets["train"].mode, datasets["train"].shuffle_buffer, datasets["val"].mode) == ("caption_train", 1000, "caption_eval")
    batch = next(iter(DataLoader(datasets["train"], batch_size=4, collate_fn=datasets["train"].collater)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert len(batch["text_input"]) == 4 and all(isinstance(t, str) for t in batch["text_input"])
    batch = next(iter(DataLoader(datasets["val"], batch_size=3, collate_fn=datasets["val"].collater)))
    assert batch["image"].shape == (3, 3, 64, 64) and len(batch["captions"][0]) == 5


def test_vqa_builder_through_the_registry(root):
    cls, cfg = _builder_cfg("wds_vqa", root=str(root), shards={"val": "val/shard-{000000..000003}.tar"})
    datasets = cls(cfg).build_datasets()
    assert set(datasets) == {"val"} and len(datasets["val"]) == sum(_expected(root, "val", "vqa_eval").values())
    batch = next(iter(DataLoader(datasets["val"], batch_size=4, collate_fn=datasets["val"].collater)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["text_input"][0].startswith("Question: ") and batch["text_input"][0].endswith(" Short answer:")
    assert all(len(a) == 10 for a in batch["answers"])


def test_builder_errors_name_the_fix(root, tmp_path):
    cls, cfg = _builder_cfg("wds_caption", root=str(root), sizes=None, shards={"val": "val/shard-{000000..000003}.tar"})
    with pytest.raises(ValueError, match=r"split 'val' has no length.*build_info.lengths.val"):
        cls(cfg).build_datasets()
    cls, cfg = _builder_cfg("wds_caption", root=str(root), sizes=None, shards={"val": "val/shard-{000000..000003}.tar"},
                            lengths={"val": 16})
    assert len(cls(cfg).build_datasets()["val"]) == 16
    cls, cfg = _builder_cfg("wds_caption", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        cls(cfg).build_datasets()
    cls, cfg = _builder_cfg("wds_caption", root=str(root))
    cfg.build_info.shard = "x"
    with pytest.raises(ValueError, match="'shard'.*did you mean 'shards'"):
        cls(cfg).build_datasets()


class _DrawsOnItsInput:
    """A processor that changes its input image in place, then draws a random crop (torch's RNG)."""

    def __init__(self):
        from lavis.processors.blip_processors import Blip2ImageTrainProcessor

        self.train = Blip2ImageTrainProcessor(image_size=32, min_scale=0.3)

    def __call__(self, image):
        from PIL import ImageDraw

        ImageDraw.Draw(image).rectangle((0, 0, 20, 20), fill=(255, 0, 0))
        return self.train(image)


@pytest.mark.parametrize("mode", ["caption_train", "vqa_train"])
def test_each_image_is_decoded_once_per_pass_and_the_samples_are_identical(root, monkeypatch, mode):
    from lavis_ext.datasets import wds_pipeline

    decoded = Counter()
    real = wds_pipeline.decode_image

    def counting(data):
        decoded["calls"] += 1
        return real(data)

    monkeypatch.setattr(wds_pipeline, "decode_image", counting)
    images = sum(1 for _ in _dataset(root, "train", "caption_eval", vis_processor=None))
    decoded.clear()
    passes = {}
    for cache_mb in (128, 0.02, 0):  # on; a budget of ~6 decoded 64 px images; off (the old behaviour)
        torch.manual_seed(0)
        passes[cache_mb] = list(_dataset(root, "train", mode, shuffle_buffer=40, seed=1, decode_cache_mb=cache_mb,
                                         vis_processor=_DrawsOnItsInput()))
        passes[cache_mb, "decoded"] = decoded.pop("calls")
    units = len(passes[0])
    assert units > 2 * images  # several captions / questions per image
    assert passes[128, "decoded"] == images and passes[0, "decoded"] == units
    assert images < passes[0.02, "decoded"] < units  # over the budget: decoded again, never wrong
    for cache_mb in (128, 0.02):
        for a, b in zip(passes[cache_mb], passes[0], strict=True):
            assert a.keys() == b.keys() and torch.equal(a["image"], b["image"])
            assert all(a[k] == b[k] for k in a if k != "image")


def test_a_corrupt_image_is_decoded_once_and_skipped_for_every_unit(tmp_path):
    entries = [("bad.jpg", b"garbage"), ("bad.json", _caption_json("bad")), ("ok.jpg", _jpeg()),
               ("ok.json", _caption_json("ok"))]
    _write_tar(tmp_path / "s.tar", entries)
    ds = WdsSplitDataset(str(tmp_path / "s.tar"), "caption_train", vis_processor=VIS)
    assert [s["image_id"] for s in ds] == ["ok", "ok"] and dict(ds.skipped) == {"corrupt_image": 1}
    with pytest.raises(ValueError, match="decode_cache_mb=-1 must be >= 0"):
        WdsSplitDataset(str(tmp_path / "s.tar"), "caption_train", decode_cache_mb=-1)
