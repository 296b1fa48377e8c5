"""Lengths for shards that were not written by us: ``lavis-ext shards index`` and img2dataset's stats.

runner_base needs each split's length in the units of its mode (captions, images or questions;
:data:`lavis_ext.datasets.wds_pipeline.MODES`). The synthetic generator and ``lavis-ext shards convert``
write them into ``sizes.json``; shards from elsewhere have none. Two ways to get them here:

- ``lavis-ext shards index DIR`` reads every shard once (images decoded, text validated exactly as the
  datasets do) and writes ``DIR/sizes.json`` with the split's shard pattern, its ``images`` / ``captions`` /
  ``questions`` counts and ``shard_samples`` (tar samples per shard, so tar damage later reports exactly how
  many samples it cost). It counts *readable* samples, so the lengths never overstate the data.
- img2dataset writes ``NNNNN_stats.json`` beside each ``NNNNN.tar``; its ``successes`` is the number of
  samples in that tar (failed downloads are not in the tar). With no ``sizes.json``, the builders take the
  split length from them when every shard of the split has one. What this assumes: one caption per image
  (img2dataset's ``caption`` / ``txt``), so captions = images = successes; the stats do not look inside the
  samples, so a sample with an empty caption or an image that does not decode is counted there but skipped
  in training, and the end-of-pass check warns with the true count (run ``index`` for exact lengths).
  The stats give no question count: VQA shards need ``index`` or ``build_info.lengths``.

CLI::

    lavis-ext shards index DIR                     # one split per subfolder holding *.tar, else DIR's *.tar
    lavis-ext shards index DIR --split val         # DIR's own *.tar as split "val" (default "train")
    lavis-ext shards index DIR --pattern 'train/{00000..00009}.tar' --split train
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["img2dataset_counts", "img2dataset_successes", "index_split", "length_from_stats", "main", "shard_pattern",
           "write_index"]

_NUMBERED = re.compile(r"^(.*?)(\d+)\.tar$")


def _stats_path(url: str) -> Path | None:
    from lavis_ext.datasets.wds_pipeline import is_remote

    if is_remote(url):
        return None  # remote: the stats are not fetched
    local = url[len("file:"):] if url.startswith("file:") else url
    if not local.endswith(".tar"):
        return None
    return Path(local[: -len(".tar")] + "_stats.json")


def img2dataset_successes(url: str) -> int | None:
    """Samples in a local img2dataset shard from its ``NNNNN_stats.json`` (``successes``); None if there is none."""
    path = _stats_path(str(url))
    if path is None or not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
        return int(stats["successes"])
    except (ValueError, KeyError, TypeError) as exn:
        logger.warning("ignoring %s: not an img2dataset stats file (%s: %s)", path, type(exn).__name__, exn)
        return None


def img2dataset_counts(urls: Sequence[str]) -> dict[str, int]:
    """``{url: successes}`` for the shards that have an img2dataset stats file (each file read once)."""
    counts = {str(u): img2dataset_successes(str(u)) for u in urls}
    return {u: n for u, n in counts.items() if n is not None}


def length_from_stats(urls: Sequence[str], counts: dict[str, int], unit: str) -> int | None:
    """A split's length in ``unit`` from img2dataset stats (``counts``, :func:`img2dataset_counts`), or None when
    some shard has none or the unit is ``questions`` (see the module docstring for what is assumed)."""
    if unit not in ("images", "captions") or not urls or any(str(u) not in counts for u in urls):
        return None
    return sum(counts[str(u)] for u in urls)


def shard_pattern(names: Sequence[str]) -> str | list[str]:
    """A brace pattern for consecutively numbered names (``a-{000..004}.tar``), else the names as a list."""
    names = sorted(names)
    parts = [_NUMBERED.match(os.path.basename(n)) for n in names]
    if parts and all(parts):
        heads = {os.path.dirname(n) + "/" + p.group(1) if os.path.dirname(n) else p.group(1) for n, p in zip(names, parts)}
        widths = {len(p.group(2)) for p in parts}
        numbers = [int(p.group(2)) for p in parts]
        if len(heads) == 1 and len(widths) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            head, width = heads.pop(), widths.pop()
            if len(names) == 1:
                return names[0]
            return f"{head}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}.tar"
    return list(names)


def index_split(root: str | os.PathLike, shards: str | list[str]) -> dict:
    """Count one split's readable samples. ``shards`` is a pattern or list relative to ``root``.

    Returns:
        The split's sizes.json entry: ``shards``, ``num_shards``, ``images``, ``captions``, ``questions``
        (only the text kinds present), ``shard_samples`` ({path relative to root: tar samples read}), and
        ``skipped`` ({reason: count}, not stored).
    """
    from lavis_ext.datasets.wds_pipeline import WdsSplitDataset, expand_shards

    root = Path(root)
    urls = expand_shards(shards, root)
    dataset = WdsSplitDataset(urls, "caption_eval", rank=0, world_size=1, name=f"index {root}")
    counts = dataset.count_readable()
    entry = {"shards": shards, "num_shards": len(urls), "images": counts["images"]}
    for unit in ("captions", "questions"):
        if counts[unit]:
            entry[unit] = counts[unit]
    entry["shard_samples"] = {os.path.relpath(u, root): n for u, n in counts["shard_samples"].items()}
    return {**entry, "skipped": counts["skipped"]}


def write_index(root: str | os.PathLike, splits: dict[str, dict], sizes_name: str = "sizes.json") -> Path:
    """Merge ``{split: entry}`` into ``root/sizes_name`` (other splits are kept); returns the path."""
    path = Path(root) / sizes_name
    sizes = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(sizes.get("splits"), dict):
        sizes["splits"] = {}
    for split, entry in splits.items():
        sizes["splits"][split] = {k: v for k, v in entry.items() if k != "skipped"}
    path.write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    return path


def _discover(root: Path, split: str | None, pattern: str | None) -> dict[str, str | list[str]]:
    if pattern:
        return {split or "train": pattern}
    folders = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.tar")))
    if folders and split is None:
        return {d.name: shard_pattern([f"{d.name}/{f.name}" for f in d.glob("*.tar")]) for d in folders}
    tars = [f.name for f in root.glob("*.tar")]
    if not tars:
        where = f"; its subfolders with shards: {', '.join(d.name for d in folders)} (leave out --split)" if folders else ""
        raise FileNotFoundError(f"no *.tar in {str(root)!r}{where}; give --pattern 'SPLIT/shard-{{000..009}}.tar'")
    return {split or "train": shard_pattern(tars)}


def main(argv=None) -> int:
    """``lavis-ext shards index DIR [--split NAME] [--pattern PATTERN]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="lavis-ext shards index",
        description="Count the readable samples of existing webdataset shards (e.g. img2dataset output) and write "
        "DIR/sizes.json, which the wds_caption/wds_vqa builders read (build_info.root=DIR).",
    )
    parser.add_argument("dir", help="the shard folder: one split per subfolder holding *.tar, or *.tar in it")
    parser.add_argument("--split", help="split name for DIR's own *.tar or --pattern (default train)")
    parser.add_argument("--pattern", help="brace pattern relative to DIR, e.g. 'train/{00000..00009}.tar'")
    parser.add_argument("--sizes", default="sizes.json", help="file name under DIR (default sizes.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.dir)
    if not root.is_dir():
        parser.error(f"{args.dir!r} is not a folder")
    splits = {name: index_split(root, shards) for name, shards in _discover(root, args.split, args.pattern).items()}
    path = write_index(root, splits, args.sizes)
    for name, entry in splits.items():
        texts = ", ".join(f"{entry[u]} {u}" for u in ("captions", "questions") if u in entry)
        skipped = f"; skipped {entry['skipped']}" if entry["skipped"] else ""
        print(f"{name}: {entry['images']} images, {texts or 'no text'} in {entry['num_shards']} shard(s){skipped}", flush=True)
    print(f"wrote {path}", flush=True)
    return 0
