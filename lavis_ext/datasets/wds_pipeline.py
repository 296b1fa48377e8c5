"""One split of a webdataset caption/VQA dataset, read exactly once per epoch across ranks and workers.

Why not LAVIS's ``laion2B_multi`` pipeline: it resamples shards at random on every rank and worker
(no epochs, no length, duplicates), and it knows only ``{"image", "text_input"}``. Evaluation needs
each sample exactly once, and runner_base needs a length; VQA training needs ``text_output``.

:class:`WdsSplitDataset` is a ``wds.DataPipeline`` (LAVIS's ``concat_datasets`` accepts only that
kind of IterableDataset) whose stages are::

    shard list (this rank/worker's share; shard order shuffled per epoch for training)
    -> tar samples (webdataset's gopen: local, http(s)://, pipe:, ...; tar_reader; tar damage counted, see below)
    -> sample-level share (only when shards do not divide evenly, see below)
    -> expand to units of the mode (one per caption / image / question), validating json and text
    -> wds.shuffle (buffer; rng seeded by seed, epoch, rank, worker)
    -> decode (lavis_ext.images.decode_image -> vis_processor; corrupt or truncated images counted
       and skipped, 16-bit scaled) and format

Text. Captions come from the first of these that holds a non-empty caption: the ``json`` member's
``captions`` list (the synthetic and ``lavis-ext shards convert`` layout), its ``caption`` string, the
``txt`` member (img2dataset writes both of the last two, with the same text). A caption sample needs
no ``json`` when it has a ``txt``. Questions come only from ``json["questions"]``.

Decode once. An image with several units (five captions, or several questions) used to be decoded once per
unit, 5x per epoch. Its units now share the decoded image: the first one to leave the shuffle buffer
decodes it, the others get copies of it, the last one frees it. The samples are the same pixels in the same
order (decoding is deterministic and each unit's processor call happens as before, so random crops draw the
same numbers); only the memory differs, bounded per reader by ``decode_cache_mb`` (default 128: about 290
decoded 384 px images; beyond it, images are decoded again as before; 0 turns the cache off).

Splitting. Readers are ``world_size x num_workers`` (rank-major). With ``split_by="shard"`` reader
``k`` reads shards ``k, k + readers, ...``; with ``"sample"`` every reader opens every shard and keeps
every ``readers``-th tar sample (exactly once, at the cost of reading the bytes ``readers`` times);
``"auto"`` (default) takes ``"shard"`` when the shard count divides by the readers and ``"sample"``
otherwise, so no configuration ever drops or duplicates a sample. Explicit ``"shard"`` with an
uneven count still reads each sample once, but readers get unequal shares (logged); with fewer
shards than readers it raises, since some readers would have nothing.

Skipped samples (missing image/json/text, bad json or text, corrupt image, tar damage) are counted by
reason in ``dataset.skipped`` (exact for a pass iterated in this process: ``num_workers=0``); every
process logs the first ``max_warnings`` skips with key and shard, then a summary when its pass ends.
Counts are per tar sample (an image with five captions counts once), reset at the start of each pass;
``partial_text`` counts samples kept without some of their captions/questions (empty or incomplete).
``on_bad_record: error`` (:mod:`lavis_ext.datasets.bad_records`) raises on the first of them instead.

Tar damage is counted as ``tar_error`` once per shard, with the samples it cost (``lost_samples``). Shards
are read by :mod:`lavis_ext.datasets.tar_reader` (headers parsed by hand, ~6-13 µs a sample where Python's
tarfile took ~55), which tells every way a shard can end apart: only an end-of-archive marker followed by
zeros is a clean end; a missing shard (an http 404), a file that is not a tar, a cut (inside a member or at
a member boundary), a damaged header after the first, or data after the end-of-archive marker is damage.
The samples lost are exact when the shard's sample count is known: ``shard_samples`` (``sizes.json``'s
per-split ``shard_samples``, written by ``lavis-ext shards index``) or img2dataset's ``NNNNN_stats.json``
beside a local ``NNNNN.tar`` (``successes``); a shard that reads another number of samples than its count
without any damage is warned about too. Every reader that opens a damaged shard reports it (with
``split_by`` ``sample`` that is every reader).

Length check. A pass that ends (its source exhausted, not a loader that stopped early) compares the units
it yielded with ``len()``: with one reader (one process, ``num_workers`` 0 or 1) the comparison is exact
and a mismatch is warned with the true count, since the epoch loader would silently re-read samples of
the next pass to fill a length that overstates the data. With several readers each one sees only its own
share, so each logs its count (``last_pass_units``) at INFO and only their sum can be compared.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import random
import re
import zlib
import lzma
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
import torch
import webdataset as wds

from lavis_ext.datasets.bad_records import BadRecordError, resolve_policy
from lavis_ext.datasets.tar_reader import TarError, iter_samples
from lavis_ext.images import decode_image
from lavis_ext.processors import fuse_image_processor

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "DEFAULT_VQA_PROMPT",
    "WdsSplitDataset",
    "expand_shards",
    "read_sizes",
    "split_length",
    "collate",
    "format_sample",
]

#: mode -> the unit one sample stands for (a key of sizes.json's per-split entry).
MODES = {"caption_train": "captions", "caption_eval": "images", "vqa_train": "questions", "vqa_eval": "questions"}
SPLIT_POLICIES = ("auto", "shard", "sample")
DEFAULT_VQA_PROMPT = "Question: {} Short answer:"
#: decoded images held for the later units of their sample, per reader (module docstring: "Decode once")
DEFAULT_DECODE_CACHE_MB = 128
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # http:, https:, pipe:, s3:, gs:, ... (not C:)


# ---------------------------------------------------------------------------------------------
# shard lists and sizes


def is_remote(url: str) -> bool:
    """A URL webdataset opens itself (``http(s)://``, ``pipe:``, ``s3://`` ...), not a local path."""
    return bool(_REMOTE.match(url)) and not url.startswith("file:")


def expand_shards(urls: str | Sequence[str], root: str | os.PathLike | None = None) -> list[str]:
    """Brace-expand shard patterns, join relative local ones to ``root``, and check local files exist.

    Args:
        urls: a pattern (``"train/shard-{000000..000007}.tar"``), or a list of patterns or paths.
        root: folder that relative local patterns are relative to (itself relative to the CWD);
            None keeps them as given.

    Returns:
        The shard URLs in order. Remote ones (``http://``, ``pipe:``, ``s3://`` ...) are not checked.

    Raises:
        FileNotFoundError: a local pattern matches no file, or names a file that does not exist.
        ValueError: no pattern at all.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls or [])
    if not patterns:
        raise ValueError("no shard pattern given; e.g. urls='train/shard-{000000..000007}.tar'")
    result: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        remote = is_remote(pattern)
        local = pattern[len("file:"):] if pattern.startswith("file:") else pattern
        if not remote and root is not None and not os.path.isabs(local):
            local = os.path.join(str(root), local)
        expanded = list(braceexpand.braceexpand(pattern if remote else local))
        if not remote:
            missing = [p for p in expanded if not os.path.isfile(p)]
            where = f" (resolved against root {str(root)!r})" if root is not None else ""
            if len(missing) == len(expanded):
                raise FileNotFoundError(
                    f"shard pattern {pattern!r}{where} matches no file ({local!r}); generate the data "
                    "(python -m lavis_ext.datasets.synthetic --out <root>) or fix build_info.root/shards"
                )
            if missing:
                raise FileNotFoundError(
                    f"shard pattern {pattern!r}{where}: {len(missing)} of {len(expanded)} shards are missing, "
                    f"first {missing[0]!r}; fix the brace range or regenerate the shards"
                )
        result.extend(expanded)
    return result


def read_sizes(path: str | os.PathLike) -> dict:
    """Load a ``sizes.json`` (written by ``lavis-ext shards index|convert``, the synthetic generator, or by hand).

    Raises:
        FileNotFoundError: no such file (names it and the ways to get the lengths).
        ValueError: the file has no ``splits`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sizes file {str(path)!r} does not exist; count existing shards into it with "
            f"`lavis-ext shards index {str(path.parent)!r}`, or give build_info.shards with build_info.lengths "
            "(or img2dataset's NNNNN_stats.json files beside the shards), or for the synthetic data generate it "
            "(python -m lavis_ext.datasets.synthetic --out <root>)"
        )
    sizes = json.loads(path.read_text())
    if not isinstance(sizes.get("splits"), dict):
        raise ValueError(f"{str(path)!r} has no 'splits' mapping; expected {{'splits': {{'train': {{'images': N, ...}}}}}}")
    return sizes


def split_length(sizes: dict, split: str, mode: str) -> int:
    """Samples of ``split`` in the units of ``mode`` (captions, images or questions) from a sizes dict.

    Raises:
        KeyError: the split or its unit is not in the sizes (names what is there).
        ValueError: an unknown mode.
    """
    unit = _unit(mode)
    splits = sizes.get("splits", {})
    if split not in splits:
        raise KeyError(f"split {split!r} is not in the sizes file; it has {sorted(splits)}")
    if unit not in splits[split]:
        raise KeyError(f"sizes for split {split!r} give no {unit!r} count (mode {mode!r}); it has {sorted(splits[split])}")
    return int(splits[split][unit])


def _unit(mode: str) -> str:
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), list(MODES), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(MODES)}"
        raise ValueError(f"unknown mode {mode!r}; {hint}")
    return MODES[mode]


# ---------------------------------------------------------------------------------------------
# batching


def collate(samples: list[dict]) -> dict:
    """Stack ``image`` tensors; keep every other field as a list (answers stay lists of lists).

    torch's default collate would transpose lists of answers into tuples per position.
    """
    if not samples:
        return {}
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "image" and all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True)
class _Reader:
    rank: int
    world: int
    worker: int
    num_workers: int

    @property
    def slots(self) -> int:
        return self.world * self.num_workers

    @property
    def slot(self) -> int:
        return self.rank * self.num_workers + self.worker


def format_sample(mode: str, unit: dict, image, text_processor=None, prompt: str = "") -> dict:
    """The sample a task sees for one unit (caption / image / question) of ``mode``: shared by every
    dataset here, so the webdataset and annotation-file datasets give the same keys and shapes."""
    text = text_processor or (lambda s: s)
    if mode == "caption_train":
        return {"image": image, "text_input": text(unit["caption"]), "image_id": unit["image_id"]}
    if mode == "caption_eval":
        return {"image": image, "image_id": unit["image_id"], "captions": list(unit["captions"])}
    q = unit["question"]
    question = text(q["question"])
    text_input = prompt.format(question) if prompt else question
    answers = [str(a) for a in q["answers"]]
    if mode == "vqa_train":
        counts = Counter(answers)  # insertion-ordered: max() keeps the first-seen answer on ties
        return {
            "image": image,
            "text_input": text_input,
            "question": question,  # unprompted, for the Q-Former (qformer_text_input)
            "text_output": max(counts, key=counts.get),
            "answers": list(counts),
            "weights": [c / len(answers) for c in counts.values()],
            "question_id": unit["question_id"],
            "image_id": unit["image_id"],
        }
    return {
        "image": image,
        "text_input": text_input,
        "question": question,
        "question_id": unit["question_id"],
        "answers": answers,
        "question_type": str(q.get("question_type", "unknown")),
        "answer_type": str(q.get("answer_type", "other")),
        "image_id": unit["image_id"],
    }


class WdsSplitDataset(wds.DataPipeline):
    """One split (train/val/test) of caption or VQA shards, in one of four output modes.

    Args:
        urls: brace pattern string, list of patterns, or list of paths (see :func:`expand_shards`).
        mode: ``caption_train`` (one sample per image x caption), ``caption_eval`` (per image, all
            references), ``vqa_train`` / ``vqa_eval`` (per question).
        vis_processor: callable on a PIL RGB image (a LAVIS processor); None keeps the PIL image.
        text_processor: callable on a caption (train) or a question (vqa); None = identity.
        length: samples of this split over all ranks, in units of the mode; ``len()`` returns it.
            None leaves the length unknown (``len()`` raises TypeError).
        shuffle_buffer: 0 = stream order; > 0 shuffles shard order and samples (training).
        seed: base of every shuffle; with the epoch, rank and worker it fixes the order.
        prompt: VQA prompt with one ``{}`` for the processed question; None or "" = question alone.
        root: folder relative local patterns are joined to.
        split_by: ``auto`` | ``shard`` | ``sample`` (module docstring).
        rank, world_size: override the torch.distributed rank/world (tests, custom launchers).
        max_warnings: skip warnings logged per pass and process before only counting.
        name: label for log lines (e.g. ``wds_caption/val``; the part before ``/`` names the dataset in errors).
        on_bad_record: ``skip`` (count and log) or ``error`` (raise :class:`BadRecordError` on the first).
        shard_samples: ``{url: tar samples}`` for shards whose count is known (sizes.json), so tar damage
            reports exactly how many samples it cost; local shards with an img2dataset ``_stats.json``
            beside them are looked up too.
        decode_cache_mb: decoded images kept for the other units of their sample (module docstring: "Decode
            once"), at most this many MB per reader; 0 decodes every unit's image again.

    Raises:
        ValueError: unknown mode, split or bad-record policy, a prompt without ``{}``, a bad rank/world pair.
        FileNotFoundError: a local pattern that matches nothing (names it).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        mode: str,
        vis_processor: Callable | None = None,
        text_processor: Callable | None = None,
        length: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        prompt: str | None = DEFAULT_VQA_PROMPT,
        root: str | os.PathLike | None = None,
        split_by: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        max_warnings: int = 10,
        name: str | None = None,
        on_bad_record: str | None = None,
        shard_samples: dict | None = None,
        decode_cache_mb: float = DEFAULT_DECODE_CACHE_MB,
    ):
        super().__init__()
        _unit(mode)
        if split_by not in SPLIT_POLICIES:
            raise ValueError(f"unknown split_by {split_by!r}; valid: {', '.join(SPLIT_POLICIES)}")
        if mode.startswith("vqa") and prompt and "{}" not in prompt:
            raise ValueError(f"VQA prompt {prompt!r} has no '{{}}' for the question; e.g. {DEFAULT_VQA_PROMPT!r}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give rank and world_size together (got rank={rank}, world_size={world_size})")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if length is not None and int(length) < 0:
            raise ValueError(f"length {length} is negative")
        if not float(decode_cache_mb) >= 0:
            raise ValueError(f"decode_cache_mb={decode_cache_mb!r} must be >= 0 (0 turns the decoded-image cache off)")
        self.urls = expand_shards(urls, root)
        self.mode = mode
        self.vis_processor = fuse_image_processor(vis_processor)  # same tensors, without ToTensor's copies
        self.text_processor = text_processor
        self.num_samples = None if length is None else int(length)
        self.shuffle_buffer = int(shuffle_buffer or 0)
        self.seed = int(seed)
        self.prompt = prompt or ""
        self.split_by = split_by
        self.rank_override = rank
        self.world_override = world_size
        self.max_warnings = int(max_warnings)
        self.name = name or mode
        where = f"datasets.{self.name.split('/')[0]}" if "/" in self.name else "datasets.<name>"
        self.on_bad_record = resolve_policy(on_bad_record, f"{where}.on_bad_record")
        self._policy_name = where
        self.shard_samples = _shard_counts(self.urls, shard_samples)
        self.decode_cache_bytes = int(float(decode_cache_mb) * 2**20)
        self.last_pass_units: int | None = None
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._bad_keys: set[tuple[str, str]] = set()
        self._warned = 0
        self._uneven_logged = False
        self.pipeline = [
            self._shard_source,
            self._tar_samples,
            self._own_samples,
            self._expand,
            self._shuffle,
            self._decode,
        ]

    # ---- public -----------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{self.name}: length unknown; pass length= (e.g. from sizes.json via split_length)")
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle is used next (call before creating the loader's iterator;
        persistent DataLoader workers keep the epoch they were started with)."""
        self.epoch = int(epoch)

    def collater(self, samples: list[dict]) -> dict:
        """LAVIS's runner looks up ``dataset.collater``; see :func:`collate`."""
        return collate(samples)

    def __repr__(self) -> str:
        n = "?" if self.num_samples is None else self.num_samples
        return f"WdsSplitDataset({self.name!r}, mode={self.mode!r}, shards={len(self.urls)}, length={n})"

    # ---- reader and share -------------------------------------------------------------------
    def _reader(self) -> _Reader:
        if self.world_override is not None:
            rank, world = self.rank_override, self.world_override
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _Reader(rank, world, worker, num_workers)

    def _policy(self, reader: _Reader) -> str:
        n, slots = len(self.urls), reader.slots
        if self.split_by == "auto":
            return "shard" if n % slots == 0 else "sample"
        if self.split_by == "shard" and n < slots:
            raise ValueError(
                f"{self.name}: {n} shard(s) for {reader.world} rank(s) x {reader.num_workers} worker(s) = {slots} "
                f"readers, so some readers would get nothing; use split_by='auto' or 'sample', fewer "
                f"workers (run.num_workers), or write at least {slots} shards"
            )
        if self.split_by == "shard" and n % slots and not self._uneven_logged:
            self._uneven_logged = True
            logger.info("%s: %d shards over %d readers: unequal shares (each sample still read once)", self.name, n, slots)
        return self.split_by

    # ---- stages -----------------------------------------------------------------------------
    def _shard_source(self) -> Iterator[dict]:
        """This reader's shards. Written here, not wds.split_by_node/split_by_worker: those take the rank
        only from RANK/torch.distributed (no override) and cannot fall back to a sample-level share."""
        reader = self._reader()
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            # the same permutation on every reader, so the shares stay a partition
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(urls)
        if self._policy(reader) == "shard":
            urls = urls[reader.slot :: reader.slots]
        for url in urls:
            yield {"url": url}

    def _own_samples(self, src: Iterable[dict]) -> Iterator[dict]:
        reader = self._reader()
        if self._policy(reader) != "sample" or reader.slots == 1:
            yield from src
            return
        for i, sample in enumerate(src):
            if i % reader.slots == reader.slot:
                yield sample

    def _expand(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            yield from self._units(sample)

    def _shuffle(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.shuffle_buffer <= 0:
            yield from src
            return
        r = self._reader()
        rng = random.Random(f"{self.seed}:{self.epoch}:{r.rank}:{r.worker}")
        yield from wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(iter(src))

    def _decode(self, src: Iterable[dict]) -> Iterator[dict]:
        """Decode after the shuffle (the buffer holds bytes, not pixels). Not wds.decode: its handler sees
        only the exception, not the sample's key and shard, so a skip could not be named or counted."""
        self.skipped = Counter()
        self._bad_keys = set()
        self._warned = 0
        yielded = dropped = 0
        exhausted = False
        budget = [self.decode_cache_bytes]  # bytes of decoded images this pass may still hold
        try:
            for unit in src:
                try:
                    shared = unit.get("decoded")
                    if shared is None:
                        image = decode_image(unit["image_bytes"])  # truncated files raise; 16-bit is scaled
                    else:
                        image = shared.get(unit["image_bytes"], budget)
                except Exception as exn:  # PIL raises many types for bad bytes
                    dropped += 1
                    self._skip("corrupt_image", unit["__key__"], unit["__url__"], f"{type(exn).__name__}: {exn}")
                    continue
                if self.vis_processor is not None:
                    image = self.vis_processor(image)
                yielded += 1
                yield self._format(unit, image)
            exhausted = True
        finally:
            if exhausted:  # not when the consumer stopped early (an epoch that ends mid-pass)
                self._check_pass_length(yielded, dropped)
            self._log_pass_summary()

    # ---- validation and output --------------------------------------------------------------
    def _units(self, sample: dict) -> Iterator[dict]:
        """Validate one tar sample and yield its units; webdataset has no hook for content checks."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        parsed = parse_sample(sample, "caption" if self.mode.startswith("caption") else "vqa")
        if isinstance(parsed, _Problem):
            self._skip(parsed.reason, key, url, parsed.detail)
            return
        base, items, partial = parsed
        if partial:
            self._skip("partial_text", key, url, partial, drop=False)
        if self.mode == "caption_eval":
            yield {**base, "captions": items}
            return
        if len(items) > 1 and self.decode_cache_bytes > 0:
            base["decoded"] = _Decoded(len(items))  # shared by the units: the image is decoded once
        if self.mode == "caption_train":
            for caption in items:
                yield {**base, "caption": caption}
        else:
            for j, q in enumerate(items):
                yield {**base, "question": q, "question_id": str(q.get("question_id", f"{key}-q{j}"))}

    def count_readable(self) -> dict:
        """Read every shard once (all of them, whatever the rank) and count what the modes would yield.

        Returns:
            ``{"images", "captions", "questions", "shard_samples": {url: tar samples read}, "skipped"}``:
            ``captions`` / ``questions`` are the ``*_train`` units, ``images`` the ``caption_eval`` units
            (images with a caption; for a split without captions, images with a question). Images are
            decoded, so a corrupt one is not counted. ``skipped`` counts samples by reason as a pass would.
        """
        self.skipped, self._bad_keys, self._warned = Counter(), set(), 0
        counts = Counter()
        per_shard: dict[str, int] = {}
        for url in self.urls:
            for sample in self._read_shard(url):
                per_shard[url] = per_shard.get(url, 0) + 1
                key = sample.get("__key__", "?")
                caption = parse_sample(sample, "caption")
                vqa = parse_sample(sample, "vqa")
                if isinstance(caption, _Problem) and isinstance(vqa, _Problem):
                    self._skip(caption.reason, key, url, caption.detail)
                    continue
                try:
                    decode_image((caption if not isinstance(caption, _Problem) else vqa)[0]["image_bytes"])
                except Exception as exn:  # PIL raises many types for bad bytes
                    self._skip("corrupt_image", key, url, f"{type(exn).__name__}: {exn}")
                    continue
                if not isinstance(caption, _Problem):
                    counts["images_with_captions"] += 1
                    counts["captions"] += len(caption[1])
                if not isinstance(vqa, _Problem):
                    counts["images_with_questions"] += 1
                    counts["questions"] += len(vqa[1])
            per_shard.setdefault(url, 0)  # an empty or unreadable shard
        images = counts["images_with_captions"] if counts["captions"] else counts["images_with_questions"]
        return {"images": images, "captions": counts["captions"], "questions": counts["questions"],
                "shard_samples": per_shard, "skipped": dict(self.skipped)}

    def _format(self, unit: dict, image) -> dict:
        return format_sample(self.mode, unit, image, self.text_processor, self.prompt)

    # ---- skip accounting ----------------------------------------------------------------------
    def _skip(self, reason: str, key: str, url: str, detail: str, drop: bool = True, what: str | None = None,
              where: str | None = None) -> None:
        if self.on_bad_record == "error":
            raise BadRecordError(where or f"shard {url}, key {key!r}", reason, detail, name=self._policy_name)
        if (reason, key) in self._bad_keys:
            return  # the same image seen again (one unit per caption), or the same shard: count it once
        self._bad_keys.add((reason, key))
        self.skipped[reason] += 1
        self._warned += 1
        what = what or f"{'skipping' if drop else 'keeping the rest of'} sample {key!r}"
        if self._warned <= self.max_warnings:
            logger.warning("%s: %s in %s: %s (%s)", self.name, what, url, reason, detail)
        elif self._warned == self.max_warnings + 1:
            logger.warning("%s: more skipped samples; only counting them from now on (summary at the end of the pass)", self.name)

    def _tar_samples(self, src: Iterable[dict]) -> Iterator[dict]:
        for source in src:
            yield from self._read_shard(source["url"])

    def _read_shard(self, url: str) -> Iterator[dict]:
        """The tar samples of one shard, grouped by key as webdataset groups them (``KEY.ext`` members in a
        row; :func:`lavis_ext.datasets.tar_reader.iter_samples`). Not wds.tarfile_to_samples: its tarfile ends
        quietly at a damaged header and its error handler sees neither the samples read nor the shard's key,
        so losses went uncounted; and tarfile costs ~50 µs a sample more."""
        read, last_key, damage = 0, None, None
        stream = None
        try:
            stream = wds.gopen(url, "rb")
            for sample in iter_samples(stream, url):  # the sample in progress at damage comes too (validated)
                read, last_key = read + 1, sample["__key__"]
                yield sample
        except TarError as exn:
            damage = str(exn)
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exn:  # gopen/curl/pipe, decompression
            damage = f"{type(exn).__name__}: {exn}"
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception as exn:  # a pipe/curl that exited non-zero says so here
                    damage = damage or f"{type(exn).__name__}: {exn}"
        expected = self.shard_samples.get(url)
        if damage is not None:
            if expected is not None:
                lost = max(expected - read, 0)
                cost = f"{lost} of its {expected} samples lost"
                if lost:
                    self.skipped["lost_samples"] += lost
            else:
                cost = (f"{read} samples read, the rest lost (how many is unknown: no per-shard count in sizes.json "
                        "or an img2dataset _stats.json; the end-of-pass length check shows the total)")
            after = f" after key {last_key!r}" if last_key is not None else " before its first sample"
            self._skip("tar_error", url, url, f"{damage}; {cost}", what=f"shard damaged{after}",
                       where=f"shard {url}{after}")
        elif expected is not None and read != expected:
            logger.warning("%s: shard %s holds %d samples but its count says %d; recount with `lavis-ext shards "
                           "index`", self.name, url, read, expected)

    def _check_pass_length(self, yielded: int, dropped: int) -> None:
        self.last_pass_units = yielded
        if self.num_samples is None:
            return
        r = self._reader()
        unit = MODES[self.mode]
        if r.slots > 1:
            logger.info("%s: pass done on reader %d of %d with %d %s; the length %d counts all readers' shares",
                        self.name, r.slot, r.slots, yielded, unit, self.num_samples)
            return
        if yielded == self.num_samples:
            return
        if yielded < self.num_samples:
            effect = ("so each epoch re-reads samples of the next pass to fill the gap" if self.mode.endswith("_train")
                      else "so evaluation covers fewer samples than the length claims")
            bad = f"; {dropped} {unit} were bad records and skipped {dict(sorted(self.skipped.items()))}" if self.skipped else ""
            logger.warning(
                "%s: the pass ended after %d %s but the length says %d (%d fewer%s), %s; set the true length "
                "(`lavis-ext shards index ROOT` rewrites sizes.json, or build_info.lengths)",
                self.name, yielded, unit, self.num_samples, self.num_samples - yielded, bad, effect,
            )
        else:
            logger.warning(
                "%s: the pass yielded %d %s but the length says %d, so an epoch stops before the data ends; set the "
                "true length (`lavis-ext shards index ROOT` rewrites sizes.json, or build_info.lengths)",
                self.name, yielded, unit, self.num_samples,
            )

    def _log_pass_summary(self) -> None:
        if not self.skipped:
            return
        r = self._reader()
        logger.warning(
            "%s: pass done on rank %d/%d worker %d/%d (epoch %d): skipped %s",
            self.name, r.rank, r.world, r.worker, r.num_workers, self.epoch, dict(sorted(self.skipped.items())),
        )


class _Decoded:
    """The decoded image of one tar sample, shared by its units (captions or questions) while they wait in the
    shuffle buffer: decoded by the first unit that reaches :meth:`get`, handed to the others as copies (so a
    processor that changes its input in place cannot reach a later unit), and dropped after the last one."""

    __slots__ = ("left", "image", "error", "nbytes")

    def __init__(self, units: int):
        self.left = units
        self.image = None
        self.error: Exception | None = None
        self.nbytes = 0

    def get(self, data: bytes, budget: list[int]):
        """The image for one unit; ``budget[0]``: bytes the pass may still hold (taken and given back here)."""
        self.left -= 1
        if self.error is not None:
            raise self.error  # the same bytes fail the same way: not decoded again
        if self.image is not None:
            image = self.image
            if self.left > 0:
                return image.copy()
            self.image = None  # the last unit takes the cached image itself
            budget[0] += self.nbytes
            return image
        try:
            image = decode_image(data)
        except Exception as exn:
            self.error = exn
            raise
        nbytes = image.width * image.height * len(image.getbands())
        if self.left > 0 and nbytes <= budget[0]:
            self.image, self.nbytes = image, nbytes
            budget[0] -= nbytes
            return image.copy()
        return image  # over the budget: later units decode again (same pixels, only slower)


def _entries(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


@dataclass(frozen=True)
class _Problem:
    reason: str
    detail: str


def parse_sample(sample: dict, kind: str):
    """Validate one tar sample for ``kind`` (``caption`` | ``vqa``).

    Returns:
        ``(base, items, partial)``: the unit fields shared by every unit of the sample, the captions
        (strings) or questions (dicts), and a note about dropped empty/incomplete ones ("" if none);
        or a ``_Problem(reason, detail)`` when the sample has no usable image or text.
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image_bytes is None:
        return _Problem("missing_image", f"no {'/'.join(IMAGE_KEYS)} entry (has {_entries(sample)})")
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
        except ValueError as exn:  # UnicodeDecodeError included
            return _Problem("bad_json", str(exn))
    elif kind == "vqa" or "txt" not in sample:
        needs = "json" if kind == "vqa" else "json or txt"
        return _Problem("missing_json", f"no {needs} entry (has {_entries(sample)})")
    base = {"__key__": key, "__url__": url, "image_bytes": image_bytes, "image_id": str(meta.get("image_id", key))}
    if kind == "caption":
        return _captions(sample, meta, base)
    raw = meta.get("questions")
    questions = [q for q in raw if _valid_question(q)] if isinstance(raw, list) else []
    if not questions:
        return _Problem("missing_text", "no question with a non-empty 'question' and 'answers'")
    partial = f"{len(raw) - len(questions)} incomplete question(s) dropped" if len(questions) != len(raw) else ""
    return base, questions, partial


def _captions(sample: dict, meta: dict, base: dict):
    """The first caption source that holds a non-empty caption: json ``captions``, json ``caption``, ``txt``."""
    raw = meta.get("captions")
    if isinstance(raw, list):
        captions = [c for c in raw if isinstance(c, str) and c.strip()]
        if captions:
            partial = f"{len(raw) - len(captions)} empty caption(s) dropped" if len(captions) != len(raw) else ""
            return base, captions, partial
    caption = meta.get("caption")
    if isinstance(caption, str) and caption.strip():
        return base, [caption], ""
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            return _Problem("bad_text", f"txt is not UTF-8 ({exn})")
        if text:
            return base, [text], ""
    return _Problem("missing_text", "no non-empty json 'captions' list, json 'caption' string or txt entry")


def _shard_counts(urls: Sequence[str], given: dict | None) -> dict[str, int]:
    """Known tar-sample counts per shard URL: ``given`` first, then img2dataset's stats beside local shards."""
    from lavis_ext.datasets.shard_index import img2dataset_successes

    counts = {str(u): int(n) for u, n in (given or {}).items()}
    for url in urls:
        if url not in counts:
            n = img2dataset_successes(url)
            if n is not None:
                counts[url] = n
    return counts


def _valid_question(q) -> bool:
    return (
        isinstance(q, dict)
        and isinstance(q.get("question"), str)
        and bool(q["question"].strip())
        and isinstance(q.get("answers"), list)
        and len(q["answers"]) > 0
        and all(isinstance(a, str) for a in q["answers"])
    )
