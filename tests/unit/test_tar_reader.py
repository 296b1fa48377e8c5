"""The hand-written tar reader: the same samples as webdataset's tarfile path, and every way a shard can end."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from lavis_ext.datasets import wds_pipeline
from lavis_ext.datasets.synthetic import generate_dataset
from lavis_ext.datasets.tar_reader import TarError, iter_members, iter_samples, split_key
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset, read_sizes, split_length


def _tar(entries, fmt=tarfile.USTAR_FORMAT, compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" + (f":{compression}" if compression else ""), format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:  # a directory
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset_samples(url: str) -> list[dict]:
    """webdataset's own path: gopen -> tarfile (r|*) -> group_by_keys."""
    return list(wds.tarfile_samples([{"url": url}]))


LONG = "deep/" + "x" * 120  # over ustar's 100-character name field: GNU long name or pax path
ENTRIES = [
    ("a.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("a.json", b'{"captions": ["a"]}'), ("a.seg.PNG", b"png"),
    (f"{LONG}.jpg", b"long" * 300), (f"{LONG}.txt", b"a long name"),
    ("caf\u00e9.jpg", b"x" * 512), ("caf\u00e9.txt", b"exactly one block above"),
    ("b.jpg", b""), ("b.txt", b"empty image member"),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_samples_equal_webdataset_for_every_header_format_and_compression(tmp_path, fmt, compression):
    entries = ENTRIES if fmt != tarfile.USTAR_FORMAT else [e for e in ENTRIES if not e[0].startswith("deep/")]
    path = tmp_path / f"shard.tar{'.' + compression if compression else ''}"
    path.write_bytes(_tar(entries, fmt, compression))
    with open(path, "rb") as stream:
        ours = list(iter_samples(stream, str(path)))
    assert ours == _webdataset_samples(str(path))
    if fmt != tarfile.USTAR_FORMAT:
        assert ours[1]["__key__"] == LONG and ours[1]["txt"] == b"a long name"
    assert ours[0]["seg.png"] == b"png"  # extensions lower-cased, everything after the first dot


def test_dataset_gives_identical_samples_in_identical_order_to_the_webdataset_path(tmp_path, monkeypatch):
    """A whole shuffled training pass, ours vs the same pipeline reading through webdataset's tarfile path."""
    generate_dataset(tmp_path, seed=0, num_images={"train": 24, "val": 4, "test": 4}, images_per_shard=5)
    sizes = read_sizes(tmp_path / "sizes.json")
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

    def run(mode):
        ds = WdsSplitDataset(sizes["splits"]["train"]["shards"], mode, root=tmp_path, shuffle_buffer=50, seed=3,
                             vis_processor=BlipImageEvalProcessor(image_size=32), text_processor=BlipCaptionProcessor(),
                             length=split_length(sizes, "train", mode))
        ds.set_epoch(1)
        return list(ds)

    for mode in ("caption_train", "vqa_train"):
        ours = run(mode)
        with monkeypatch.context() as patch:
            patch.setattr(WdsSplitDataset, "_read_shard", lambda self, url: iter(_webdataset_samples(url)))
            reference = run(mode)
        assert len(ours) == len(reference) == split_length(sizes, "train", mode)
        for a, b in zip(ours, reference):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) if k == "image" else a[k] == b[k] for k in a)


def test_members_that_are_not_samples_are_skipped():
    data = _tar([("dir", None), ("k.jpg", b"1"), ("__meta__", b"m"), ("noext", b"n"), ("k.JPG", b"dup"),
                 ("k.json", b"{}"), (".hidden", b"h")])
    samples = list(iter_samples(io.BytesIO(data), "u"))
    assert samples == [{"__key__": "k", "__url__": "u", "jpg": b"1", "json": b"{}"}]  # duplicate: the first kept
    assert [name for name, _ in iter_members(io.BytesIO(data))] == ["k.jpg", "__meta__", "noext", "k.JPG", "k.json",
                                                                    ".hidden"]


def test_split_key_matches_webdataset_base_plus_ext():
    for name in ["a.jpg", "a.b.c", "dir/a.jpg", "d.x/a.jpg", "a/b.c/d", ".x", "dir/.x", "noext", "a.", "x/y/z.tar.gz"]:
        assert split_key(name) == wds.tariterators.base_plus_ext(name), name


def _two_samples() -> tuple[bytes, tarfile.TarFile]:
    data = _tar([("s0.jpg", b"a" * 700), ("s0.json", b"{}"), ("s1.jpg", b"b" * 700), ("s1.json", b"{}")])
    return data, tarfile.open(fileobj=io.BytesIO(data))


def _read(data: bytes) -> tuple[list[str], str | None]:
    keys = []
    try:
        for sample in iter_samples(io.BytesIO(data), "u"):
            keys.append(sample["__key__"])
    except TarError as exn:
        return keys, str(exn)
    return keys, None


def test_every_way_a_shard_ends_is_told_apart():
    data, tar = _two_samples()
    s1 = tar.getmember("s1.jpg")
    end = tar.offset  # where the end-of-archive marker starts
    assert _read(data) == (["s0", "s1"], None)
    assert _read(data[:end] + bytes(1024)) == (["s0", "s1"], None)  # the marker, then zero padding: clean
    keys, why = _read(data[: s1.offset_data + 100])
    assert keys == ["s0"] and "ends inside member 's1.jpg'" in why
    keys, why = _read(data[: tar.getmember("s1.json").offset_data + 1])
    assert keys == ["s0", "s1"] and "ends inside member 's1.json'" in why  # the partial sample comes, then the error
    keys, why = _read(data[: s1.offset])
    assert keys == ["s0"] and f"ends at byte {s1.offset} without an end-of-archive marker" in why
    keys, why = _read(data[: s1.offset + 100])
    assert keys == ["s0"] and "without an end-of-archive marker" in why  # cut inside a header
    keys, why = _read(data[: end + 512] + data)  # two tars concatenated: tarfile would read only the first
    assert keys == ["s0", "s1"] and f"data after the end-of-archive marker at byte {end}" in why
    damaged = bytearray(data)
    damaged[s1.offset + 148: s1.offset + 156] = b"garbage!"
    keys, why = _read(bytes(damaged))
    assert keys == ["s0"] and f"damaged member header at byte {s1.offset} (bad checksum)" in why
    assert _read(b"")[1] == "empty file: not a tar archive"
    assert "not a tar archive" in _read(b"<html>404 not found</html>" * 40)[1]
    assert "not a tar archive" in _read(b"short")[1]


def test_signed_checksums_and_base256_sizes_are_read_as_tarfile_reads_them():
    data = bytearray(_tar([("s.bin", b"x" * 10)]))
    data[0:1] = b"\xe9"  # a byte > 127 in the name, with the checksum of signed chars (old tar writers)
    signed = sum(b - 256 if b > 127 else b for b in data[:148] + data[156:512]) + 256
    data[148:156] = b"%06o\0 " % signed
    assert [(n.encode("utf-8", "surrogateescape"), d) for n, d in iter_members(io.BytesIO(bytes(data)))] == \
        [(b"\xe9.bin", b"x" * 10)]
    assert wds_pipeline is not None  # the dataset module imports the reader
    from lavis_ext.datasets.tar_reader import _number

    assert _number(b"\x80" + (5).to_bytes(11, "big"), "size", 0) == 5  # GNU base-256
    with pytest.raises(TarError, match="size field"):
        _number(b"12z45\0\0\0\0\0\0\0", "size", 512)


def test_sparse_members_fail_naming_the_member():
    data = bytearray(_tar([("s.jpg", b"x")]))
    data[156:157] = b"S"
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data[:512])
    with pytest.raises(TarError, match="'s.jpg' .* GNU sparse file"):
        list(iter_members(io.BytesIO(bytes(data))))


def test_a_shard_larger_than_the_read_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("lavis_ext.datasets.tar_reader.CHUNK", 1000)  # members straddle chunk ends
    entries = [(f"k{i}.{ext}", bytes([i]) * (300 + 97 * i)) for i in range(12) for ext in ("jpg", "json")]
    path = tmp_path / "big.tar"
    path.write_bytes(_tar(entries, tarfile.PAX_FORMAT))
    with open(path, "rb") as stream:
        assert list(iter_samples(stream, str(path))) == _webdataset_samples(str(path))
