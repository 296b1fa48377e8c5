"""Shards as the field writes them (img2dataset layout, remote URLs) and bad shard data that must never be
used silently: truncated and 16-bit images, damaged tars, lengths that overstate the data, on_bad_record."""
from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from lavis_ext import cli
from lavis_ext.datasets.bad_records import BadRecordError
from lavis_ext.datasets.to_shards import write_shards
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset

LOG = "lavis_ext.datasets.wds_pipeline"


def _jpeg(seed: int = 0, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)  # noise: no tiny file
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _img2dataset_sample(key: str, caption: str, seed: int = 0) -> list[tuple[str, bytes]]:
    """What img2dataset writes per success: KEY.jpg, KEY.txt and KEY.json with a "caption" string."""
    meta = {"caption": caption, "url": f"http://example.invalid/{key}.jpg", "key": key, "status": "success",
            "error_message": None, "width": 32, "height": 32}
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", caption.encode())]


def _sample(key: str, caption: str, seed: int = 0) -> list[tuple[str, bytes]]:
    """The layout of the synthetic data and `lavis-ext shards convert`: KEY.jpg + KEY.json with "captions"."""
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.json", json.dumps({"image_id": key, "captions": [caption]}).encode())]


def _caption_shard(path: Path, n: int, start: int = 0, stats: bool = True, img2dataset: bool = False) -> list:
    entries = []
    for i in range(start, start + n):
        entries += (_img2dataset_sample if img2dataset else _sample)(f"{i:09d}", f"caption number {i}", seed=i)
    _write_tar(path, entries)
    if stats:  # img2dataset's per-shard stats file, as it writes it
        path.with_name(path.stem + "_stats.json").write_text(json.dumps(
            {"count": n + 2, "successes": n, "failed_to_download": 1, "failed_to_resize": 1,
             "status_dict": {"success": n, "HTTP Error 404: File not found": 1, "Image decoding error": 1}}))
    return entries


# ---- img2dataset layout ---------------------------------------------------------------------------


def test_captions_from_json_caption_string_or_txt_member_in_that_order(tmp_path):
    entries = _img2dataset_sample("a", "json caption string")
    entries = [(n, b"the txt caption" if n.endswith(".txt") else d) for n, d in entries]  # json "caption" wins
    entries += [("b.jpg", _jpeg(1)), ("b.txt", b"only a txt member\n")]  # no json at all: fine for captions
    entries += [("c.jpg", _jpeg(2)), ("c.json", json.dumps({"captions": ["list one", ""], "caption": "str"}).encode()),
                ("c.txt", b"txt")]  # the captions list wins, its empty entry is dropped
    entries += [("d.jpg", _jpeg(3)), ("d.json", json.dumps({"caption": ""}).encode()), ("d.txt", b"from txt")]
    entries += [("e.jpg", _jpeg(4)), ("e.json", json.dumps({"caption": None}).encode())]  # no caption anywhere
    entries += [("f.jpg", _jpeg(5)), ("f.txt", "caf\u00e9".encode("latin-1"))]  # not UTF-8: never guessed at
    _write_tar(tmp_path / "00000.tar", entries)
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_train")
    got = [(s["image_id"], s["text_input"]) for s in ds]
    assert got == [("a", "json caption string"), ("b", "only a txt member"), ("c", "list one"), ("d", "from txt")]
    assert dict(ds.skipped) == {"partial_text": 1, "missing_text": 1, "bad_text": 1}
    evals = list(WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval"))
    assert [s["captions"] for s in evals] == [["json caption string"], ["only a txt member"], ["list one"], ["from txt"]]


def test_lengths_from_img2dataset_stats_when_there_is_no_sizes_file(tmp_path):
    _caption_shard(tmp_path / "00000.tar", 5, img2dataset=True)
    _caption_shard(tmp_path / "00001.tar", 3, start=5, img2dataset=True)
    cls = registry.get_builder_class("wds_caption")
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets.wds_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, {"root": str(tmp_path), "shards": {"train": "{00000..00001}.tar"}})
    train = cls(cfg).build_datasets()["train"]
    assert len(train) == 8  # successes 5 + 3: one caption per image
    assert sum(1 for _ in train) == 8
    # no stats, no sizes file, no lengths: the error names the real options
    (tmp_path / "00001_stats.json").unlink()
    with pytest.raises(ValueError, match=r"lavis-ext shards index .*build_info.lengths.train.*_stats.json"):
        cls(cfg).build_datasets()
    cfg.build_info.shards = None
    with pytest.raises(FileNotFoundError, match=r"lavis-ext shards index"):
        cls(cfg).build_datasets()


def test_shards_index_writes_sizes_from_readable_samples(tmp_path, capsys):
    for split, n in (("train", 6), ("val", 3)):
        (tmp_path / split).mkdir()
        entries = _caption_shard(tmp_path / split / "00000.tar", n, stats=False, img2dataset=True)
        if split == "train":
            entries += [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"a caption")]
        _write_tar(tmp_path / split / "00000.tar", entries)
        _caption_shard(tmp_path / split / "00001.tar", 2, start=100, stats=False, img2dataset=True)
    assert cli.main(["shards", "index", str(tmp_path)]) == 0
    sizes = json.loads((tmp_path / "sizes.json").read_text())["splits"]
    assert sizes["train"] == {"shards": "train/{00000..00001}.tar", "num_shards": 2, "images": 8, "captions": 8,
                              "shard_samples": {"train/00000.tar": 7, "train/00001.tar": 2}}
    assert sizes["val"]["images"] == sizes["val"]["captions"] == 5
    assert "train: 8 images, 8 captions in 2 shard(s); skipped {'corrupt_image': 1}" in capsys.readouterr().out
    # the builders read it as they read the synthetic sizes.json
    cls = registry.get_builder_class("wds_caption")
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets.wds_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, {"root": str(tmp_path)})
    datasets = cls(cfg).build_datasets()
    assert (len(datasets["train"]), len(datasets["val"])) == (8, 5)
    assert sum(1 for _ in datasets["train"]) == 8
    # a single folder of tars (img2dataset's output folder) as one named split
    flat = tmp_path / "flat"
    flat.mkdir()
    _caption_shard(flat / "00000.tar", 4, img2dataset=True)
    assert cli.main(["shards", "index", str(flat), "--split", "val"]) == 0
    assert json.loads((flat / "sizes.json").read_text())["splits"]["val"]["shards"] == "00000.tar"


def test_shards_cli_keeps_the_flag_form_and_names_bad_subcommands(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg())
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": "a thing"}]))
    common = ["--kind", "caption", "--annotations", str(ann), "--image-root", str(images), "--split", "train"]
    assert cli.main(["shards", *common, "--out", str(tmp_path / "old")]) == 0
    assert cli.main(["shards", "convert", *common, "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "old" / "sizes.json").read_text() == (tmp_path / "new" / "sizes.json").read_text()
    assert cli.main(["shards", "indx", str(tmp_path)]) == 2
    assert "unknown subcommand 'indx'" in capsys.readouterr().err


def test_a_length_that_overstates_the_data_is_warned_with_the_true_count(tmp_path, caplog):
    _caption_shard(tmp_path / "00000.tar", 20, stats=False)
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_train", length=30, shuffle_buffer=8)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert sum(1 for _ in ds) == 20
    assert ds.last_pass_units == 20
    assert "the pass ended after 20 captions but the length says 30 (10 fewer)" in caplog.text
    assert "re-reads samples" in caplog.text
    caplog.clear()
    it = iter(WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_train", length=30))
    next(it)
    it.close()  # a loader that stops mid-pass (the epoch ended) is no evidence
    exact = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_train", length=20)
    with caplog.at_level(logging.WARNING, logger=LOG):
        list(exact)
    assert caplog.text == ""


# ---- images -----------------------------------------------------------------------------------------


def test_truncated_jpeg_is_skipped_even_though_lavis_allows_truncated_files(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # `import lavis` (via lavis_ext) sets it for the whole process
    whole = _jpeg(0, size=64)
    entries = _sample("good", "a caption")
    entries += [("cut.jpg", whole[: len(whole) // 2]), ("cut.json", json.dumps({"captions": ["a caption"]}).encode())]
    _write_tar(tmp_path / "s.tar", entries)
    ds = WdsSplitDataset(str(tmp_path / "s.tar"), "caption_eval")
    assert [s["image_id"] for s in ds] == ["good"]
    assert dict(ds.skipped) == {"corrupt_image": 1}
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # LAVIS's setting is back


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(buf, format="PNG")  # 32896 / 257 = 128
    _write_tar(tmp_path / "s.tar", [("k.png", buf.getvalue()), ("k.json", json.dumps({"captions": ["grey"]}).encode())])
    (sample,) = list(WdsSplitDataset(str(tmp_path / "s.tar"), "caption_eval"))
    assert sample["image"].mode == "RGB" and sample["image"].getpixel((0, 0)) == (128, 128, 128)


def test_convert_leaves_out_truncated_images_and_scales_16_bit_tiff(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    whole = _jpeg(0, size=64)
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(images / "deep.tif")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(images / "mid.tif")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": n, "caption": "c"} for n in ("cut.jpg", "deep.tif", "mid.tif")]))
    info = write_shards("caption", ann, images, tmp_path / "out", "train")
    assert info["images"] == 2 and info["skipped"] == {"corrupt_image": 1}
    pixels = [s["image"].getpixel((0, 0)) for s in WdsSplitDataset(str(tmp_path / "out/train/shard-000000.tar"), "caption_eval")]
    assert pixels == [(255, 255, 255), (128, 128, 128)]


# ---- tar damage ----------------------------------------------------------------------------------


def _damage_header(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data = bytearray(path.read_bytes())
    data[offset + 148: offset + 156] = b"garbage!"  # the checksum field: tarfile's InvalidHeaderError
    path.write_bytes(bytes(data))


def test_damaged_member_header_is_counted_with_the_samples_lost(tmp_path, caplog):
    _caption_shard(tmp_path / "00000.tar", 99)  # its _stats.json says 99 successes
    _damage_header(tmp_path / "00000.tar", f"{40:09d}.jpg")
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval", length=99)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert sum(1 for _ in ds) == 40  # Python's tarfile ends the archive quietly at the damaged header
    assert dict(ds.skipped) == {"tar_error": 1, "lost_samples": 59}
    text = caplog.text
    assert str(tmp_path / "00000.tar") in text and "damaged member header" in text
    assert "59 of its 99 samples lost" in text and "after key '000000039'" in text
    assert "the pass ended after 40 images but the length says 99" in text
    # without a per-shard count the loss is still reported, its size deferred to the length check
    (tmp_path / "00000_stats.json").unlink()
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval")
    assert sum(1 for _ in ds) == 40 and dict(ds.skipped) == {"tar_error": 1}


def test_cut_shards_report_the_samples_lost(tmp_path, caplog):
    _caption_shard(tmp_path / "00000.tar", 10)
    whole = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        inside = tar.getmember(f"{4:09d}.jpg").offset_data + 100
        boundary = tar.getmember(f"{6:09d}.jpg").offset
    (tmp_path / "00000.tar").write_bytes(whole[:inside])  # cut inside a member's data: tarfile raises
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval")
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert [s["image_id"] for s in ds] == [f"{i:09d}" for i in range(4)]
    assert dict(ds.skipped) == {"tar_error": 1, "lost_samples": 6} and "6 of its 10 samples lost" in caplog.text
    (tmp_path / "00000.tar").write_bytes(whole[:boundary])  # cut at a member boundary: tarfile is quiet
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval")
    assert sum(1 for _ in ds) == 6 and dict(ds.skipped) == {"tar_error": 1, "lost_samples": 4}
    (tmp_path / "00000.tar").write_bytes(whole + whole)  # two tars concatenated: tarfile reads only the first
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval")
    assert sum(1 for _ in ds) == 10 and dict(ds.skipped) == {"tar_error": 1}
    (tmp_path / "00000.tar").write_bytes(whole)  # intact: nothing to report
    ds = WdsSplitDataset(str(tmp_path / "00000.tar"), "caption_eval", length=10)
    assert sum(1 for _ in ds) == 10 and not ds.skipped


# ---- on_bad_record ---------------------------------------------------------------------------------


def test_on_bad_record_error_fails_on_the_first_bad_record_naming_shard_key_and_reason(tmp_path):
    entries = _caption_shard(tmp_path / "00000.tar", 3, stats=False)
    _write_tar(tmp_path / "00000.tar", entries + [("k9.jpg", b"garbage"), ("k9.json", b'{"captions": ["c"]}')])
    cls = registry.get_builder_class("wds_caption")
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets.wds_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, {"root": str(tmp_path), "shards": {"val": "00000.tar"},
                                                      "lengths": {"val": 4}})
    assert sum(1 for _ in cls(cfg).build_datasets()["val"]) == 3  # default: skip and count
    cfg.on_bad_record = "error"
    with pytest.raises(BadRecordError, match=r"00000.tar, key 'k9'.*corrupt_image.*datasets.wds_caption.on_bad_record=skip"):
        list(cls(cfg).build_datasets()["val"])
    _caption_shard(tmp_path / "00001.tar", 5)
    _damage_header(tmp_path / "00001.tar", f"{2:09d}.jpg")
    ds = WdsSplitDataset(str(tmp_path / "00001.tar"), "caption_eval", on_bad_record="error", name="wds_caption/val")
    with pytest.raises(BadRecordError, match=r"00001.tar after key '000000001'.*tar_error.*3 of its 5 samples lost"):
        list(ds)
    cfg.on_bad_record = "stop"
    with pytest.raises(ValueError, match=r"datasets.wds_caption.on_bad_record='stop'.*skip, error"):
        cls(cfg).build_datasets()


# ---- remote shards ---------------------------------------------------------------------------------


@pytest.fixture()
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_and_pipe_shards_and_a_404_is_counted_and_skipped(http_root, caplog):
    root, base = http_root
    _caption_shard(root / "00000.tar", 4, stats=False)
    _caption_shard(root / "00001.tar", 3, start=4, stats=False)
    ds = WdsSplitDataset(f"{base}/{{00000..00002}}.tar", "caption_train", length=7)  # 00002.tar: 404
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert sorted(s["image_id"] for s in ds) == [f"{i:09d}" for i in range(7)]
    assert dict(ds.skipped) == {"tar_error": 1} and f"{base}/00002.tar" in caplog.text
    piped = WdsSplitDataset([f"pipe:cat {root / '00000.tar'}", f"pipe:cat {root / '00001.tar'}"], "caption_eval")
    assert [s["image_id"] for s in piped] == [f"{i:09d}" for i in range(7)] and not piped.skipped
