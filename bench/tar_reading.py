"""Tar shard reading: our hand-parsed tar reader against webdataset's streaming reader and wids' indexed reader.

Every side yields, per tar sample, the key and the raw bytes of its ``.jpg`` and ``.json`` members (no image
decode, no JSON parse: pure tar reading), in one process, over the synthetic 64 px training shards
(``train/shard-*.tar`` of ``make data``: 50 samples of ``KEY.jpg`` + ``KEY.json`` each, page cache warm). Each member
there has a pax header before it (``mtime=0.0``: tarfile writes one for a float mtime), which ours parses (4 headers
a sample) and wids' index skips by name.

- ours: :func:`lavis_ext.datasets.tar_reader.iter_samples` on each shard opened with ``open(path, "rb")``, in shard
  order (what ``WdsSplitDataset._read_shard`` runs); it yields grouped samples ``{"__key__", "jpg", "json"}``.
- webdataset: ``wds.tarfile_to_samples()`` over ``[{"url": path}, ...]`` (Python's tarfile in stream mode, then
  webdataset's grouping by key: what LAVIS's ``laion`` pipeline and webdataset users run).
- wids: ``wids.ShardListDataset([{"url": path, "nsamples": n}, ...])`` as wids documents it, ``nsamples`` counted
  by wids' own ``compute_num_samples`` (what ``widsindex create`` runs). Two defaults are overridden so it reads
  what the others read: ``transformations=[]`` (the default "PIL" decodes images and JSON) and ``localname``
  mapping each url to a symlink in a temp folder (by default wids *copies* a local shard into
  ``/tmp/_wids_cache`` and writes its ``.lock`` file there; the symlink keeps the lock files out of the data
  folder and reads the shard in place). A sample is ``{".jpg": BytesIO, ".json": BytesIO, "__key__", ...}``
  (the extension keeps its dot); the bytes are taken with ``getvalue()``. wids opens a shard by mmap and
  indexes it (a walk over every member header) on its first access, and keeps ``lru_size`` shards open
  (default 10). Measured four ways:
  - sequential: indices 0..N-1 in order, with ``lru_size`` = the number of shards and one untimed pass first, so
    every shard is open and indexed: pure reads, the open/index cost counted apart. The note gives the first pass
    (a fresh dataset: open + index of each shard, then reads) and sequential passes at the default
    ``lru_size=10``, which with more than 10 shards re-open and re-index every shard each pass;
  - ShardedSampler order (default ``lru_size``): shards shuffled, indices shuffled within each shard (wids'
    training sampler, from its second epoch: ``shufflefirst=True``), one open per shard per pass;
  - random order (default ``lru_size``): a shuffled permutation of 0..N-1 (a ``DataLoader(shuffle=True)``'s
    ``RandomSampler``): nearly every access misses the 10-shard cache and re-opens and re-indexes a shard.
  Ours is a streaming reader with no random access (our pipeline shuffles shards and a buffer instead), so the
  random-order rows compare ways of getting shuffled samples, not the same access pattern.

All sides are checked once before timing to yield the same set of (key, sha1 of jpg, sha1 of json), N distinct
keys. Samples/s = N / wall time of a pass (runs alternate between the sides, one untimed pass each first). The
one-time cost wids needs before it can open a dataset (``nsamples`` of every shard by ``compute_num_samples``) goes
into the sequential row's note. No targets: these are levers measured (ratio > 1 = ours faster).

Usage: python bench/tar_reading.py [--quick] [--runs N] [--json OUT] [--samples N]
(--quick: the first 2000 samples (40 shards), 5 runs; full: all 4000 samples (80 shards), 11 runs.)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, interleaved, print_rows, require_data, resolve_runs, row, setup_paths, stat, write_json  # noqa: E402


def ours_samples(paths):
    from lavis_ext.datasets.tar_reader import iter_samples

    for path in paths:
        with open(path, "rb") as stream:
            for s in iter_samples(stream, path):
                yield s["__key__"], s["jpg"], s["json"]


def webdataset_samples(paths):
    import webdataset as wds

    for s in wds.tarfile_to_samples()(iter([{"url": p} for p in paths])):
        yield s["__key__"], s["jpg"], s["json"]


def wids_dataset(shards, links: Path, lru_size: int = 10):
    """A ShardListDataset returning raw bytes, reading the shards in place (see the module docstring)."""
    import wids

    with contextlib.redirect_stderr(io.StringIO()):  # it prints a summary line to stderr on every construction
        return wids.ShardListDataset(shards, transformations=[], lru_size=lru_size,
                                     localname=lambda url: str(links / Path(url).name))


def wids_samples(dataset, order):
    for i in order:
        s = dataset[i]
        yield s["__key__"], s[".jpg"].getvalue(), s[".json"].getvalue()


def drain(samples) -> int:
    """Consume a side's samples (touching both members' bytes); the byte count, as a sanity figure."""
    return sum(len(jpg) + len(meta) for _, jpg, meta in samples)


def fingerprint(samples) -> set:
    return {(key, hashlib.sha1(jpg).hexdigest(), hashlib.sha1(meta).hexdigest()) for key, jpg, meta in samples}


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
                             runs=11, quick_runs=5)
    parser.add_argument("--samples", type=int, default=None,
                        help="the first N samples, rounded up to whole shards (default all: 4000; 2000 with --quick)")
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    setup_paths()
    root = require_data()
    try:
        import wids
        from wids.wids import compute_num_samples
    except ImportError as exn:
        raise SystemExit(f"wids is not installed ({exn}): bench/tar_reading.py's peer; pip install -e \".[bench]\"")

    paths = [str(p) for p in sorted((root / "train").glob("shard-*.tar"))]
    if not paths:
        raise SystemExit(f"no training shards under {root / 'train'}; run `make data`")
    start = time.perf_counter()
    all_counts = [compute_num_samples(p) for p in paths]  # wids' index: nsamples of each shard
    index_s = time.perf_counter() - start
    want = args.samples or (2000 if args.quick else sum(all_counts))
    keep = next((i + 1 for i, total in enumerate(itertools.accumulate(all_counts)) if total >= want), len(paths))
    paths, counts = paths[:keep], all_counts[:keep]
    n = sum(counts)
    shards = [{"url": p, "nsamples": c} for p, c in zip(paths, counts)]

    with tempfile.TemporaryDirectory(prefix="bench_tar_") as tmp:
        links = Path(tmp)
        for p in paths:
            os.symlink(os.path.abspath(p), links / Path(p).name)
        seq = wids_dataset(shards, links, lru_size=len(shards))
        lru10 = wids_dataset(shards, links)  # wids' default lru_size
        random_order = list(range(n))
        random.Random(0).shuffle(random_order)
        sharded_order = list(wids.ShardedSampler(lru10, seed=0, shufflefirst=True))
        sides = {
            "ours": lambda: drain(ours_samples(paths)),
            "webdataset": lambda: drain(webdataset_samples(paths)),
            "wids sequential": lambda: drain(wids_samples(seq, range(n))),
            "wids first pass": lambda: drain(wids_samples(wids_dataset(shards, links, len(shards)), range(n))),
            "wids sequential lru 10": lambda: drain(wids_samples(lru10, range(n))),
            "wids ShardedSampler": lambda: drain(wids_samples(lru10, sharded_order)),
            "wids random": lambda: drain(wids_samples(lru10, random_order)),
        }
        reference = fingerprint(ours_samples(paths))
        with contextlib.redirect_stdout(io.StringIO()):  # wids prints a cache-miss warning (once per dataset)
            for name, samples in (("webdataset", webdataset_samples(paths)), ("wids", wids_samples(seq, range(n))),
                                  ("wids random", wids_samples(lru10, random_order))):
                got = fingerprint(samples)
                assert got == reference and len(got) == n, f"{name} yields other samples than ours ({len(got)} vs {len(reference)})"
            lru10.cache.reset_stats()
            drain(wids_samples(lru10, random_order))
            accesses, misses = lru10.get_stats()
            times = interleaved(sides, runs)
        seq.close()
        lru10.close()

    labels = {"ours": "lavis_ext tar_reader.iter_samples", "webdataset": "wds.tarfile_to_samples",
              "wids sequential": "wids sequential, lru_size = shards, shards open",
              "wids ShardedSampler": "wids ShardedSampler order, lru_size 10",
              "wids random": "wids random permutation, lru_size 10"}
    rate = {k: stat(labels.get(k, k), [n / t for t in v]) for k, v in times.items()}
    us = {k: 1e6 / s["median"] for k, s in rate.items()}

    def note(*names):
        return "µs per sample: " + ", ".join(f"{k} {us[k]:.1f}" for k in ("ours", *names))

    what = f"tar reading, {n} samples of 64 px jpg + json ({len(paths)} shards), raw bytes, 1 process: samples/s"
    index_note = (f". wids' first pass (fresh dataset: mmap + index of each shard, then reads) "
                  f"{rate['wids first pass']['median']:.0f} samples/s; at the default lru_size=10 every sequential pass "
                  f"re-opens and re-indexes all {len(paths)} shards: {rate['wids sequential lru 10']['median']:.0f} samples/s. "
                  f"One-time index before a dataset can be made (nsamples by wids' compute_num_samples, as widsindex "
                  f"create runs it): {index_s * 1e3:.0f} ms for {len(all_counts)} shards, {index_s * 1e6 / len(all_counts):.0f} µs a shard")
    rows = [row(f"{what}, vs webdataset tarfile_to_samples", "samples/s", rate["ours"], rate["webdataset"],
                note=note("webdataset")),
            row(f"{what}, vs wids ShardListDataset sequential (open/index cost apart)", "samples/s", rate["ours"],
                rate["wids sequential"], note=note("wids sequential", "wids first pass", "wids sequential lru 10") + index_note),
            row(f"{what}, ours in shard order vs wids in ShardedSampler order (default lru_size 10)", "samples/s",
                rate["ours"], rate["wids ShardedSampler"],
                note=note("wids ShardedSampler") + "; shards shuffled, indices shuffled within a shard: one open per shard a pass"),
            row(f"{what}, ours in shard order vs wids in random order (default lru_size 10)", "samples/s", rate["ours"],
                rate["wids random"], note=note("wids random") + f"; {misses} of {accesses} accesses missed wids' 10-shard "
                "cache (each a re-open and re-index of a shard); ours streams and has no random access")]
    print_rows(rows)
    write_json(args.json, "tar_reading", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
