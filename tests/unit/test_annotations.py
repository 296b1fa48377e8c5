"""Annotation-file builders and the shard converter: same samples as the pipeline, paths kept inside the root."""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import ConcatDataset
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from lavis_ext import cli
from lavis_ext.datasets.annotations import AnnotationDataset, load_annotations
from lavis_ext.datasets.bad_records import BadRecordError
from lavis_ext.datasets.to_shards import write_shards
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset

NUM_IMAGES = 6


def _write_images(folder: Path, n: int = NUM_IMAGES) -> list[str]:
    """Tiny JPEGs and PNGs in a subfolder; returns their paths relative to ``folder``."""
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        rel = f"pics/img{i}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (24 + i, 20), (40 * i, 255 - 40 * i, 90)).save(folder / rel)
        rels.append(rel)
    return rels


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def data(tmp_path) -> dict:
    """Images plus caption (Karpathy style: records repeat per image) and VQA annotation files."""
    rels = _write_images(tmp_path / "images")
    cap_train = [{"image": rel, "caption": f"A shape number {i}, version {v}."} for v in range(2) for i, rel in enumerate(rels)]
    cap_val = [{"image": rel, "captions": [f"ref one {i}", f"ref two {i}"], "image_id": f"val-{i}"}
               for i, rel in enumerate(rels[:4])]
    vqa = []
    for i, rel in enumerate(rels):
        vqa.append({"image": rel, "question": f"What colour is shape {i}?", "answers": ["red", "red", "dark red"],
                    "question_id": f"q{i}a", "question_type": "color", "answer_type": "other"})
        vqa.append({"image": rel, "question": "How many shapes?", "answer": "1"})  # single answer, no ids or types
    ann = tmp_path / "ann"
    ann.mkdir()
    return {
        "root": tmp_path,
        "rels": rels,
        "cap_train": _jsonl(ann / "cap_train.jsonl", cap_train),
        "cap_val": _write_json(ann / "cap_val.json", cap_val),
        "vqa": _jsonl(ann / "vqa.jsonl", vqa),
        "records": {"cap_train": cap_train, "cap_val": cap_val, "vqa": vqa},
    }


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _builder(name: str, **build_info):
    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    return cls(cfg)


def _build(name: str, **build_info) -> dict:
    return _builder(name, **build_info).build_datasets()


def _caption_sets(data) -> dict:
    return _build("json_caption", root=str(data["root"]), image_root="images",
                  annotations={"train": "ann/cap_train.jsonl", "val": "ann/cap_val.json"})


def _vqa_sets(data) -> dict:
    return _build("json_vqa", root=str(data["root"]), image_root="images",
                  annotations={"train": "ann/vqa.jsonl", "val": "ann/vqa.jsonl"})


# ---- samples ----------------------------------------------------------------------------------


def test_caption_builder_gives_pairs_for_train_and_images_with_all_references_for_eval(data):
    sets = _caption_sets(data)
    train, val = sets["train"], sets["val"]
    assert (train.mode, val.mode) == ("caption_train", "caption_eval")
    assert len(train) == 2 * NUM_IMAGES and len(val) == 4
    sample = train[0]
    assert set(sample) == {"image", "text_input", "image_id"}
    assert sample["image"].shape == (3, 64, 64) and sample["text_input"] == "a shape number 0, version 0"
    assert sample["image_id"] == "pics/img0.jpg"  # default: path relative to the image root
    assert Counter(train[i]["image_id"] for i in range(len(train))) == Counter({rel: 2 for rel in data["rels"]})
    ev = val[1]
    assert set(ev) == {"image", "image_id", "captions"}
    assert (ev["image_id"], ev["captions"]) == ("val-1", ["ref one 1", "ref two 1"])  # references stay raw, as in the pipeline


def test_vqa_builder_samples(data):
    sets = _vqa_sets(data)
    train, val = sets["train"], sets["val"]
    assert len(train) == len(val) == 2 * NUM_IMAGES
    t = train[0]
    assert set(t) == {"image", "text_input", "text_output", "answers", "weights", "question_id", "image_id", "question"}
    assert t["text_input"] == "Question: what colour is shape 0? Short answer:" and t["question"] == "what colour is shape 0?"
    assert (t["text_output"], t["answers"], t["weights"]) == ("red", ["red", "dark red"], [2 / 3, 1 / 3])
    assert (t["question_id"], t["image_id"]) == ("q0a", "pics/img0.jpg")
    e = val[1]
    assert set(e) == {"image", "text_input", "question", "question_id", "answers", "question_type", "answer_type", "image_id"}
    assert e["answers"] == ["1"] and e["question_id"] == "pics/img0.jpg-q1"  # the pipeline's <image_id>-q<j>
    assert (e["question_type"], e["answer_type"]) == ("unknown", "other")  # the pipeline's defaults
    assert (val[0]["question_type"], val[0]["answer_type"]) == ("color", "other")


def test_coco_caption_file_is_parsed(data):
    rels = data["rels"]
    coco = {
        "images": [{"id": 100 + i, "file_name": rel} for i, rel in enumerate(rels)],
        "annotations": [{"image_id": 100 + i % 3, "id": i, "caption": f"caption {i}"} for i in range(6)],
    }
    _write_json(data["root"] / "ann" / "coco.json", coco)
    sets = _build("coco_caption_file", root=str(data["root"]), image_root="images",
                  annotations={"train": "ann/coco.json", "test": "ann/coco.json"})
    assert len(sets["train"]) == 6 and len(sets["test"]) == 3  # images without captions are left out
    assert sets["test"][0]["image_id"] == "100" and sets["test"][0]["captions"] == ["caption 0", "caption 3"]
    _write_json(data["root"] / "ann" / "bad.json", {"images": coco["images"], "annotations": [{"image_id": 7, "caption": "x"}]})
    with pytest.raises(ValueError, match=r"bad.json annotations\[0\]: image_id 7 is not in 'images'"):
        _build("coco_caption_file", root=str(data["root"]), image_root="images", annotations={"val": "ann/bad.json"})


# ---- the same keys and values as the webdataset pipeline ---------------------------------------


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_keys_match_the_pipeline_on_shards_from_the_converter(data, tmp_path, kind):
    out = tmp_path / "shards"
    files = {"caption": ("cap_train", "cap_val"), "vqa": ("vqa", "vqa")}[kind]
    for split, key in zip(("train", "val"), files):
        write_shards(kind, data[key], data["root"] / "images", out, split, shard_size=4)
    ours = _caption_sets(data) if kind == "caption" else _vqa_sets(data)
    wds_sets = _build(f"wds_{kind}", root=str(out), sizes="sizes.json")
    for split in ("train", "val"):
        assert len(wds_sets[split]) == len(ours[split])
        theirs = next(iter(wds_sets[split]))
        mine = ours[split][0]
        assert set(mine) == set(theirs), split
        if split == "val":  # the pipeline shuffles train; eval comes in file order on both sides
            for key in set(mine) & set(theirs):
                same = torch.equal(mine[key], theirs[key]) if key == "image" else mine[key] == theirs[key]
                assert same, key  # the converter keeps the image bytes, so even the pixels agree


def test_converter_round_trip_keeps_every_caption_and_answer(data, tmp_path):
    out = tmp_path / "shards"
    info = write_shards("caption", data["cap_train"], data["root"] / "images", out, "train", shard_size=4)
    assert (info["images"], info["captions"], info["num_shards"]) == (NUM_IMAGES, 2 * NUM_IMAGES, 2)
    write_shards("caption", data["cap_val"], data["root"] / "images", out, "val", shard_size=4)
    write_shards("vqa", data["vqa"], data["root"] / "images", out, "test", shard_size=5)
    sizes = json.loads((out / "sizes.json").read_text())
    assert set(sizes["splits"]) == {"train", "val", "test"}  # each run adds its split
    assert sizes["splits"]["test"] == {"shards": "test/shard-{000000..000001}.tar", "num_shards": 2, "images": 6, "questions": 12}

    shards = {split: sizes["splits"][split]["shards"] for split in ("train", "val")}
    caps = _build("wds_caption", root=str(out), sizes="sizes.json", shards=shards)
    assert len(caps["train"]) == 2 * NUM_IMAGES
    # the raw captions (eval mode: no text processor) of every image, grouped like the JSONL
    train_eval = WdsSplitDataset(caps["train"].urls, "caption_eval", length=NUM_IMAGES)
    got = {s["image_id"]: s["captions"] for s in train_eval}
    expected = {}
    for r in data["records"]["cap_train"]:
        expected.setdefault(r["image"], []).append(r["caption"])
    assert got == expected
    expected = {r["image_id"]: r["captions"] for r in data["records"]["cap_val"]}
    assert {s["image_id"]: s["captions"] for s in caps["val"]} == expected

    vqa = _build("wds_vqa", root=str(out), sizes="sizes.json", shards={"test": sizes["splits"]["test"]["shards"]})
    got = {s["question_id"]: (s["answers"], s["image_id"]) for s in vqa["test"]}
    ours = {s["question_id"]: (s["answers"], s["image_id"]) for s in (_vqa_sets(data)["val"][i] for i in range(12))}
    assert got == ours and len(got) == 12


def test_converter_cli_and_lavis_ext_shards(data, tmp_path, capsys):
    args = ["--kind", "caption", "--annotations", str(data["cap_train"]), "--image-root", str(data["root"] / "images"),
            "--out", str(tmp_path / "out"), "--split", "train", "--shard-size", "4", "--prefix", "part"]
    assert cli.main(["shards", *args]) == 0
    assert "6 images, 12 captions in 2 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["part-000000.tar", "part-000001.tar"]
    from lavis_ext.datasets.to_shards import main

    assert main([*args[:-4], "--shard-size", "100", "--prefix", "part"]) == 0  # a rewrite leaves no stale shard
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["part-000000.tar"]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes["splits"]["train"]["shards"] == "train/part-{000000..000000}.tar"


# ---- path escapes and bad files ----------------------------------------------------------------


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_paths_outside_the_image_root_are_refused(data, tmp_path, escape):
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    if escape == "dotdot":
        path = "../secret.jpg"
    elif escape == "absolute":
        path = str(outside)
    else:
        os.symlink(outside, data["root"] / "images" / "pics" / "link.jpg")
        path = "pics/link.jpg"
    records = [{"image": data["rels"][0], "caption": "fine"}, {"image": path, "caption": "x"}]
    ann = _jsonl(data["root"] / "ann" / "evil.jsonl", records)
    root = os.path.realpath(data["root"] / "images")
    pattern = rf"evil.jsonl line 2: image path {re.escape(repr(path))}.*outside the image root {re.escape(repr(root))}"
    with pytest.raises(ValueError, match=pattern):
        _build("json_caption", root=str(data["root"]), image_root="images", annotations={"train": "ann/evil.jsonl"})
    with pytest.raises(ValueError, match=pattern):
        write_shards("caption", ann, data["root"] / "images", tmp_path / "out", "train")
    assert not (tmp_path / "out" / "sizes.json").exists()


def test_an_absolute_path_inside_the_root_is_fine(data):
    entries = load_annotations("caption", _jsonl(data["root"] / "a.jsonl", [
        {"image": str(data["root"] / "images" / data["rels"][0]), "caption": "x"},
        {"image": "./pics/../" + data["rels"][0], "caption": "y"},
    ]), data["root"] / "images")
    assert len(entries) == 1 and entries[0].captions == ["x", "y"] and entries[0].image_id == data["rels"][0]


def test_missing_files_malformed_records_and_unknown_keys_name_the_fix(data):
    base = {"root": str(data["root"]), "image_root": "images"}
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl.*datasets.json_caption.build_info.annotations.val"):
        _build("json_caption", **base, annotations={"val": "ann/nope.jsonl"})
    bad = _jsonl(data["root"] / "ann" / "bad.jsonl", [{"image": data["rels"][0], "caption": "ok"}, {"caption": "no image"}])
    with pytest.raises(BadRecordError, match=r"bad.jsonl line 2: bad record \(no_image: record has no 'image'"):
        _policy_build("json_caption", "error", **base, annotations={"train": str(bad)})
    _jsonl(bad, [{"image": data["rels"][0]}])
    with pytest.raises(BadRecordError, match=r"bad.jsonl line 1: bad record \(no_caption: record has no 'caption' or 'captions'"):
        _policy_build("json_caption", "error", **base, annotations={"train": str(bad)})
    _jsonl(bad, [{"image": data["rels"][0], "question": "what?"}])
    with pytest.raises(BadRecordError, match=r"bad.jsonl line 1: bad record \(no_answers: record has no 'answers'"):
        _policy_build("json_vqa", "error", **base, annotations={"train": str(bad)})
    bad.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": \n')
    with pytest.raises(BadRecordError, match=r"bad.jsonl line 2: bad record \(not_json: not valid JSON"):
        _policy_build("json_caption", "error", **base, annotations={"train": str(bad)})
    bad.write_text('[{"image": "a.jpg", "caption": "x"},\n {"image": ]\n')  # a JSON list is one document
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        _build("json_caption", **base, annotations={"train": str(bad)})
    with pytest.raises(ValueError, match=r"'annotation'.*did you mean 'annotations'.*valid: root, image_root, annotations"):
        _build("json_caption", **base, annotation={"train": str(bad)})
    with pytest.raises(FileNotFoundError, match=r"image_root .*nowhere"):
        _build("json_caption", root=str(data["root"]), image_root="nowhere", annotations={"train": "ann/cap_train.jsonl"})


# ---- unreadable images at load time ------------------------------------------------------------


def _damage(data) -> None:
    (data["root"] / "images" / data["rels"][1]).write_bytes(b"\xff\xd8 not really a jpeg")
    (data["root"] / "images" / data["rels"][2]).unlink()


def test_unreadable_images_are_skipped_counted_and_logged_in_eval(data, caplog):
    val = _caption_sets(data)["val"]
    _damage(data)
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.annotations"):
        batches = list(DataLoader(val, batch_size=3, collate_fn=val.collater))
    assert [b["image_id"] for b in batches] == [["val-0"], ["val-3"]]
    assert batches[0]["image"].shape == (1, 3, 64, 64)
    assert val.skipped == Counter({"corrupt_image": 1, "missing_image": 1})
    assert "pics/img1.png" in caplog.text and "corrupt_image" in caplog.text and "cap_val.json record 1" in caplog.text
    # a batch whose every image failed still gives the loops a sample (evaluation merges the repeat)
    assert val.collater([None, None])["image_id"] == ["val-0"]


def test_training_replaces_unreadable_images_through_lavis_concat_and_a_distributed_sampler(data):
    train = _caption_sets(data)["train"]
    _damage(data)
    concat = ConcatDataset([train])  # what LAVIS wraps every map-style train split in
    sampler = DistributedSampler(concat, num_replicas=2, rank=0, shuffle=True)
    loader = DataLoader(concat, batch_size=2, sampler=sampler, collate_fn=concat.collater, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(train) // 2 // 2
    assert all(b["image"].shape == (2, 3, 64, 64) for b in batches)
    ids = {i for b in batches for i in b["image_id"]}
    assert not ids & {data["rels"][1], data["rels"][2]}
    full = [train[i]["image_id"] for i in range(len(train))]
    assert data["rels"][1] not in full and len(full) == len(train)
    assert train.skipped == Counter({"corrupt_image": 1, "missing_image": 1})


def test_dataset_refuses_a_prompt_without_a_slot(data):
    entries = load_annotations("vqa", data["vqa"], data["root"] / "images")
    with pytest.raises(ValueError, match="has no '{}'"):
        AnnotationDataset(entries, "vqa_eval", prompt="Question:")
    assert AnnotationDataset(entries, "vqa_eval", prompt=None)[0]["text_input"] == "What colour is shape 0?"
    assert isinstance(AnnotationDataset(entries, "vqa_eval")[0]["image"], Image.Image)  # no processor: PIL
    assert torch.is_tensor(_vqa_sets(data)["val"][0]["image"])


def test_dataset_pickles_for_loader_workers(data):
    import pickle

    val = _vqa_sets(data)["val"]
    clone = pickle.loads(pickle.dumps(val))
    assert len(clone) == len(val) and clone[3]["question_id"] == val[3]["question_id"]


# ---- bad data: one policy (datasets.<name>.on_bad_record), never used silently ----------------------


def _policy_build(name: str, on_bad_record: str | None, **build_info) -> dict:
    builder = _builder(name, **build_info)
    if on_bad_record is not None:
        builder.config.on_bad_record = on_bad_record
    return builder.build_datasets()


def test_a_truncated_image_is_skipped_and_counted_although_lavis_loads_truncated_images(data, caplog):
    import lavis_ext
    lavis_ext.register()  # imports LAVIS, which sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES = True
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    path = data["root"] / "images" / data["rels"][0]  # pics/img0.jpg
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, quality=95)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    val = _caption_sets(data)["val"]
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.annotations"):
        assert val[0] is None  # half a JPEG is not an image, even with LAVIS's global flag set
    assert val.skipped == Counter({"corrupt_image": 1})
    assert "pics/img0.jpg" in caplog.text and "truncated" in caplog.text
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # LAVIS's value is put back


def test_sixteen_bit_images_are_scaled_not_clipped_to_white(data):
    import numpy as np

    grey = np.full((20, 24), 128 * 257, dtype=np.uint16)  # mid grey in 16 bits; PIL's convert clips it to 255
    grey[0, :] = 65535
    Image.fromarray(grey).save(data["root"] / "images" / data["rels"][1])  # pics/img1.png
    entries = load_annotations("caption", data["cap_val"], data["root"] / "images")
    pixels = np.asarray(AnnotationDataset(entries, "caption_eval")[1]["image"])
    assert pixels.shape == (20, 24, 3)
    assert (pixels[1:] == 128).all() and (pixels[0] == 255).all()


def test_a_non_utf8_jsonl_line_is_named_by_file_and_line(data, caplog):
    lines = [json.dumps({"image": rel, "caption": f"caption {i}"}).encode() for i, rel in enumerate(data["rels"])]
    lines[2] = json.dumps({"image": data["rels"][2], "caption": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    bad = data["root"] / "ann" / "latin.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.annotations"):
        train = _policy_build("json_caption", None, root=str(data["root"]), image_root="images",
                              annotations={"train": "ann/latin.jsonl"})["train"]
    assert len(train) == NUM_IMAGES - 1
    assert train.skipped == Counter({"not_utf8": 1})
    [example] = train.bad_records
    assert (example["where"], example["reason"]) == (f"{bad} line 3", "not_utf8")
    assert "0xe9" in example["detail"] and "file offset" in example["detail"]
    assert f"{bad} line 3" in caplog.text and "not_utf8" in caplog.text
    with pytest.raises(BadRecordError, match=rf"{re.escape(str(bad))} line 3: bad record \(not_utf8: byte 0xe9"):
        _policy_build("json_caption", "error", root=str(data["root"]), image_root="images",
                      annotations={"train": "ann/latin.jsonl"})


def test_a_non_utf8_json_list_names_the_file_line_and_byte_offset(data):
    records = [{"image": rel, "caption": "ok"} for rel in data["rels"][:2]] + [{"image": data["rels"][2], "caption": "na\u00efve"}]
    text = json.dumps(records, indent=1, ensure_ascii=False)
    bad = data["root"] / "ann" / "latin.json"
    bad.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xef")
    line = text[: text.index("\u00ef")].count("\n") + 1
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))} line {line}.*byte offset {offset}.*not UTF-8"):
        load_annotations("caption", bad, data["root"] / "images")


def test_skip_counts_bad_records_by_reason_and_error_stops_at_the_first(data, caplog):
    good = data["records"]["cap_train"]
    rows = [json.dumps(r) for r in good[:3]] + [
        json.dumps({"image": data["rels"][3], "caption": "   "}),  # 4: empty caption
        "{not json",  # 5
        json.dumps({"caption": "no image"}),  # 6
        json.dumps(["a", "list"]),  # 7
        json.dumps({"image": data["rels"][4], "caption": ["fine", 3.5, {"x": 1}]}),  # 8: wrong type
        json.dumps({"image": data["rels"][0], "caption": "other id", "image_id": "elsewhere"}),  # 9: id conflict
        "",
        json.dumps(good[4]),  # 11
    ]
    ann = data["root"] / "ann" / "mixed.jsonl"
    ann.write_text("\n".join(rows) + "\n")
    base = {"root": str(data["root"]), "image_root": "images", "annotations": {"train": "ann/mixed.jsonl"}}
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.annotations"):
        train = _policy_build("json_caption", "skip", **base)["train"]
    assert len(train) == 4  # lines 1-3 and 11
    assert train.skipped == Counter({"no_caption": 1, "not_json": 1, "no_image": 1, "not_an_object": 1,
                                     "bad_type": 1, "image_id_conflict": 1})
    assert [e["where"] for e in train.bad_records] == [f"{ann} line {n}" for n in (4, 5, 6, 7, 8, 9)]
    assert "record has no non-empty caption" in train.bad_records[0]["detail"]
    assert "6 bad record(s)" in caplog.text and f"{ann} line 5" in caplog.text
    # the same records under `error`: the first one stops the build, naming file and line and the way out
    with pytest.raises(BadRecordError, match=rf"mixed.jsonl line 4: bad record \(no_caption: .*on_bad_record=skip"):
        _policy_build("json_caption", "error", **base)
    with pytest.raises(ValueError, match=r"datasets.json_caption.on_bad_record='ignore' is not a policy"):
        _policy_build("json_caption", "ignore", **base)


def test_vqa_and_coco_records_follow_the_policy(data):
    rows = [{"image": data["rels"][0], "question": "what?", "answers": ["a"]},
            {"image": data["rels"][1], "question": "what?"},  # no answers
            {"image": data["rels"][2], "question": "", "answers": ["a"]},  # no question
            {"image": data["rels"][3], "question": 7, "answers": ["a"]}]  # wrong type
    _jsonl(data["root"] / "ann" / "q.jsonl", rows)
    base = {"root": str(data["root"]), "image_root": "images"}
    val = _policy_build("json_vqa", None, **base, annotations={"val": "ann/q.jsonl"})["val"]
    assert len(val) == 1 and val.skipped == Counter({"no_answers": 1, "no_question": 1, "bad_type": 1})
    with pytest.raises(BadRecordError, match=r"q.jsonl line 2: bad record \(no_answers: record has no 'answers'"):
        _policy_build("json_vqa", "error", **base, annotations={"val": "ann/q.jsonl"})
    coco = {"images": [{"id": 1, "file_name": data["rels"][0]}, {"file_name": data["rels"][1]}],
            "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 9, "caption": "x"}, {"image_id": 1, "caption": ""}]}
    _write_json(data["root"] / "ann" / "coco.json", coco)
    test = _policy_build("coco_caption_file", None, **base, annotations={"test": "ann/coco.json"})["test"]
    assert len(test) == 1 and test.skipped == Counter({"bad_image_entry": 1, "unknown_image_id": 1, "no_caption": 1})
    with pytest.raises(BadRecordError, match=r"coco.json images\[1\]: bad record \(bad_image_entry: "):
        _policy_build("coco_caption_file", "error", **base, annotations={"test": "ann/coco.json"})


def test_a_file_with_no_usable_record_fails_with_the_reasons(data):
    _jsonl(data["root"] / "ann" / "empty.jsonl", [{"image": data["rels"][0], "caption": ""}, {"caption": "x"}])
    with pytest.raises(ValueError, match=r"empty.jsonl: no usable records.*no_caption 1.*no_image 1.*line 1"):
        load_annotations("caption", data["root"] / "ann" / "empty.jsonl", data["root"] / "images")


def test_path_escapes_stay_a_hard_error_under_skip(data, tmp_path):
    _jsonl(data["root"] / "ann" / "evil.jsonl", [{"image": data["rels"][0], "caption": "ok"},
                                                 {"image": "../../x.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match=r"evil.jsonl line 2: image path '../../x.jpg'.*outside the image root"):
        _policy_build("json_caption", "skip", root=str(data["root"]), image_root="images",
                      annotations={"train": "ann/evil.jsonl"})


def test_unreadable_images_under_error_name_the_image_and_the_line_that_named_it(data):
    sets = _policy_build("json_caption", "error", root=str(data["root"]), image_root="images",
                         annotations={"train": "ann/cap_train.jsonl", "val": "ann/cap_val.json"})
    _damage(data)
    assert sets["val"][0]["image_id"] == "val-0"
    with pytest.raises(BadRecordError, match=r"cap_val.json record 1, image 'pics/img1.png': bad record \(corrupt_image: "):
        sets["val"][1]
    with pytest.raises(BadRecordError, match=r"cap_train.jsonl line 3, image 'pics/img2.jpg': bad record \(missing_image: "):
        sets["train"][4]  # (image 2, caption 0); train samples are never replaced under `error` either
