"""Convert an annotation file and its image folder into webdataset shards the ``wds_*`` builders read.

Why shards at all when ``json_caption`` reads the files directly: for large sets on network storage,
a few big sequential tars are far faster than millions of small files, and they stream from URLs.

Reads the formats of :mod:`lavis_ext.datasets.annotations` (``--kind caption|vqa|coco``), with the same
rule that every image must resolve inside ``--image-root``, and writes what
:mod:`lavis_ext.datasets.synthetic` writes: one tar sample per image, ``KEY.jpg`` (the file's own bytes;
PNG/WebP keep their extension, other formats are re-encoded as PNG) and ``KEY.json``
(``{"image_id", "image", "captions": [...]}`` or ``{"image_id", "image", "questions": [{"question_id",
"question", "answers", ...}]}``), in ``OUT/SPLIT/PREFIX-000000.tar ...``, and adds the split to
``OUT/sizes.json`` (other splits are kept). Then::

    datasets:
      wds_caption:   # or wds_vqa
        build_info: {root: OUT, sizes: sizes.json}

Every image is fully decoded through :func:`lavis_ext.images.decode_image` first, so one that is missing,
truncated (even after ``import lavis`` made PIL accept truncated files) or corrupt is left out, counted and
reported, never written. A format kept as it is (JPEG/PNG/WebP) keeps its bytes (a 16-bit PNG too: the
datasets decode it scaled); any other (TIFF, BMP, ...) is re-encoded as 8-bit PNG from the decoded image, so
16-bit data is scaled, not clipped.

CLI (``lavis-ext shards`` has two subcommands; the old flag form without ``convert`` still works)::

    lavis-ext shards convert --kind caption|vqa|coco --annotations FILE --image-root DIR --out DIR --split train
        [--shard-size 1000] [--prefix shard]        # also: python -m lavis_ext.datasets.to_shards ...
    lavis-ext shards index DIR [--split NAME] [--pattern P]   # sizes.json for existing shards (shard_index)
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from lavis_ext.datasets.annotations import KINDS, ImageEntry, load_annotations
from lavis_ext.images import decode_image

logger = logging.getLogger(__name__)

__all__ = ["main", "write_shards"]

_PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots (webdataset splits keys at the first dot) and no slashes


def _image_payload(entry: ImageEntry) -> tuple[str, bytes]:
    """``(extension, bytes)``; raises OSError/PIL errors for a missing, truncated or undecodable image."""
    data = Path(entry.path).read_bytes()
    decoded = decode_image(data)  # strict: a truncated file fails here, not silently grey in training
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
    if fmt in _PASS_THROUGH:
        return _PASS_THROUGH[fmt], data
    buf = io.BytesIO()
    decoded.save(buf, format="PNG")  # 8-bit RGB, 16-bit data scaled by decode_image
    return "png", buf.getvalue()


def _meta(kind: str, entry: ImageEntry) -> dict:
    meta = {"image_id": entry.image_id, "image": entry.rel}
    if KINDS[kind] == "caption":
        meta["captions"] = list(entry.captions)
    else:
        meta["questions"] = [dict(q) for q in entry.questions]
    return meta


def write_shards(
    kind: str,
    annotations,
    image_root,
    out,
    split: str,
    shard_size: int = 1000,
    prefix: str = "shard",
) -> dict:
    """Write ``split`` of an annotation file as shards under ``out`` and record it in ``out/sizes.json``.

    Args:
        kind: ``caption`` | ``vqa`` | ``coco`` (see :mod:`lavis_ext.datasets.annotations`).
        annotations: the annotation file.
        image_root: the folder every image path must resolve inside.
        out: output folder (created); ``out/split`` receives the tars, old ``prefix-*.tar`` there are removed.
        split: split name (``train``, ``val``, ...); ``train`` is read by the builders in train mode.
        shard_size: images per tar.
        prefix: tar file name prefix.

    Returns:
        The split's entry of sizes.json plus ``skipped`` ({reason: count}).

    Raises:
        FileNotFoundError: a missing annotation file or image root.
        ValueError: bad arguments, malformed records, an image path outside the root, or no readable image.
    """
    import webdataset as wds

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size = {shard_size}; it must be >= 1")
    for what, value in (("split", split), ("prefix", prefix)):
        if not _NAME.match(str(value)):
            raise ValueError(f"{what} {value!r} may hold only letters, digits, '_' and '-'")
    entries = load_annotations(kind, annotations, image_root, where="--annotations")
    out = Path(out)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob(f"{prefix}-*.tar"):
        stale.unlink()  # a smaller rewrite must not leave old shards behind the new pattern
    skipped: Counter = Counter()
    counts = Counter()
    writer = None
    written = 0
    for entry in entries:
        try:
            ext, data = _image_payload(entry)
        except FileNotFoundError as exn:
            skipped["missing_image"] += 1
            logger.warning("skipping %r (%s): %s", entry.rel, entry.where, exn)
            continue
        except Exception as exn:  # PIL raises many types for bad bytes
            skipped["corrupt_image"] += 1
            logger.warning("skipping %r (%s): %s: %s", entry.rel, entry.where, type(exn).__name__, exn)
            continue
        if written % int(shard_size) == 0:
            if writer is not None:
                writer.close()
            path = split_dir / f"{prefix}-{written // int(shard_size):06d}.tar"
            writer = wds.TarWriter(str(path), user="lavis_ext", group="lavis_ext", mode=0o644, mtime=0.0, encoder=False)
        meta = _meta(kind, entry)
        body = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        writer.write({"__key__": f"{split}-{written:06d}", ext: data, "json": body})
        written += 1
        counts["captions"] += len(entry.captions)
        counts["questions"] += len(entry.questions)
    if writer is not None:
        writer.close()
    if not written:
        raise ValueError(f"no readable image among the {len(entries)} in {annotations}; skipped {dict(skipped)}")
    num_shards = -(-written // int(shard_size))
    info = {
        "shards": f"{split}/{prefix}-{{000000..{num_shards - 1:06d}}}.tar",
        "num_shards": num_shards,
        "images": written,
    }
    unit = "captions" if KINDS[kind] == "caption" else "questions"  # only the unit the shards hold
    info[unit] = counts[unit]
    sizes_path = out / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    if not isinstance(sizes.get("splits"), dict):
        sizes["splits"] = {}
    sizes["splits"][split] = info
    sizes_path.write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    if skipped:
        logger.warning("%s: left out %s of %d images", split, dict(skipped), len(entries))
    return {**info, "skipped": dict(skipped)}


def main(argv=None) -> int:
    """``lavis-ext shards {convert,index} ...``; no subcommand (flags first) means ``convert``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "index":
        from lavis_ext.datasets.shard_index import main as index_main

        return index_main(argv[1:])
    if argv and argv[0] == "convert":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"lavis-ext shards: unknown subcommand {argv[0]!r}; use convert (annotations + images -> shards) "
              "or index (sizes.json for existing shards)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="lavis-ext shards convert",
        epilog="lavis-ext shards index DIR: write sizes.json for shards that exist already (e.g. img2dataset output).",
        description="Convert a caption/VQA/COCO annotation file and its images into webdataset shards + sizes.json.",
    )
    parser.add_argument("--kind", required=True, choices=sorted(KINDS), help="annotation format")
    parser.add_argument("--annotations", required=True, help="JSON/JSONL (caption, vqa) or COCO captions file")
    parser.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder (sizes.json is created or updated)")
    parser.add_argument("--split", required=True, help="split name, e.g. train, val, test")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = write_shards(args.kind, args.annotations, args.image_root, args.out, args.split, args.shard_size, args.prefix)
    unit = "captions" if "captions" in info else "questions"
    print(
        f"{args.split}: {info['images']} images, {info[unit]} {unit} in {info['num_shards']} shard(s) under {args.out}"
        + (f"; skipped {info['skipped']}" if info["skipped"] else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
