"""One split of a webdataset caption/VQA dataset, read exactly once per epoch across ranks and workers.

Why not LAVIS's ``laion2B_multi`` pipeline: it resamples shards at random on every rank and worker
(no epochs, no length, duplicates), and it knows only ``{"image", "text_input"}``. Evaluation needs
each sample exactly once, and runner_base needs a length; VQA training needs ``text_output``.

:class:`WdsSplitDataset` is a ``wds.DataPipeline`` (LAVIS's ``concat_datasets`` accepts only that
kind of IterableDataset) whose stages are::

    shard list (this rank/worker's share; shard order shuffled per epoch for training)
    -> wds.tarfile_to_samples (tar read errors: counted, logged, next shard)
    -> sample-level share (only when shards do not divide evenly, see below)
    -> expand to units of the mode (one per caption / image / question), validating json and text
    -> wds.shuffle (buffer; rng seeded by seed, epoch, rank, worker)
    -> decode (PIL -> RGB -> vis_processor; corrupt images counted and skipped) and format

Splitting. Readers are ``world_size x num_workers`` (rank-major). With ``split_by="shard"`` reader
``k`` reads shards ``k, k + readers, ...``; with ``"sample"`` every reader opens every shard and keeps
every ``readers``-th tar sample (exactly once, at the cost of reading the bytes ``readers`` times);
``"auto"`` (default) takes ``"shard"`` when the shard count divides by the readers and ``"sample"``
otherwise, so no configuration ever drops or duplicates a sample. Explicit ``"shard"`` with an
uneven count still reads each sample once, but readers get unequal shares (logged); with fewer
shards than readers it raises, since some readers would have nothing.

Skipped samples (missing image/json/text, bad json, corrupt image, tar read errors) are counted by
reason in ``dataset.skipped`` (exact for a pass iterated in this process: ``num_workers=0``); every
process logs the first ``max_warnings`` skips with key and shard, then a summary when its pass ends.
Counts are per tar sample (an image with five captions counts once), reset at the start of each pass;
``partial_text`` counts samples kept without some of their captions/questions (empty or incomplete).
Tar damage: a shard that is not a tar, or is cut inside a member's data, raises in Python's tarfile and
is counted as ``tar_error`` (once per shard; the samples before the damage arrive). A damaged or cut
member *header* after the first one ends the archive quietly (tarfile treats it as the end), so the
rest of that shard is lost uncounted: compare a pass with ``len()`` when that matters.
"""
from __future__ import annotations

import difflib
import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
import torch
import webdataset as wds
from PIL import Image

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
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # http:, https:, pipe:, s3:, gs:, ... (not C:)


# ---------------------------------------------------------------------------------------------
# shard lists and sizes


def _is_remote(url: str) -> bool:
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
        remote = _is_remote(pattern)
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
    """Load a ``sizes.json`` written by the synthetic generator (or by hand for other shards).

    Raises:
        FileNotFoundError: no such file (names it and the fix).
        ValueError: the file has no ``splits`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sizes file {str(path)!r} does not exist; generate the data (python -m lavis_ext.datasets.synthetic "
            "--out <root>) or give build_info.lengths explicitly"
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
        name: label for log lines (e.g. ``wds_caption/val``).

    Raises:
        ValueError: unknown mode or split policy, a prompt without ``{}``, a bad rank/world pair.
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
        self.urls = expand_shards(urls, root)
        self.mode = mode
        self.vis_processor = vis_processor
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
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._bad_keys: set[tuple[str, str]] = set()
        self._warned = 0
        self._uneven_logged = False
        self.pipeline = [
            self._shard_source,
            wds.tarfile_to_samples(handler=self._on_tar_error),
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
        try:
            for unit in src:
                try:
                    with Image.open(io.BytesIO(unit["image_bytes"])) as raw:
                        image = raw.convert("RGB")
                except Exception as exn:  # PIL raises many types for bad bytes
                    self._skip("corrupt_image", unit["__key__"], unit["__url__"], f"{type(exn).__name__}: {exn}")
                    continue
                if self.vis_processor is not None:
                    image = self.vis_processor(image)
                yield self._format(unit, image)
        finally:
            self._log_pass_summary()

    # ---- validation and output --------------------------------------------------------------
    def _units(self, sample: dict) -> Iterator[dict]:
        """Validate one tar sample and yield its units; webdataset has no hook for content checks."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image_bytes is None:
            self._skip("missing_image", key, url, f"no {'/'.join(IMAGE_KEYS)} entry (has {_entries(sample)})")
            return
        if "json" not in sample:
            self._skip("missing_json", key, url, f"no json entry (has {_entries(sample)})")
            return
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
        except ValueError as exn:
            self._skip("bad_json", key, url, str(exn))
            return
        base = {"__key__": key, "__url__": url, "image_bytes": image_bytes, "image_id": str(meta.get("image_id", key))}
        if self.mode.startswith("caption"):
            raw = meta.get("captions")
            captions = [c for c in raw if isinstance(c, str) and c.strip()] if isinstance(raw, list) else []
            if not captions:
                self._skip("missing_text", key, url, "no non-empty 'captions' list")
                return
            if len(captions) != len(raw):
                self._skip("partial_text", key, url, f"{len(raw) - len(captions)} empty caption(s) dropped", drop=False)
            if self.mode == "caption_train":
                for caption in captions:
                    yield {**base, "caption": caption}
            else:
                yield {**base, "captions": captions}
            return
        raw = meta.get("questions")
        questions = [q for q in raw if _valid_question(q)] if isinstance(raw, list) else []
        if not questions:
            self._skip("missing_text", key, url, "no question with a non-empty 'question' and 'answers'")
            return
        if len(questions) != len(raw):
            self._skip("partial_text", key, url, f"{len(raw) - len(questions)} incomplete question(s) dropped", drop=False)
        for j, q in enumerate(questions):
            yield {**base, "question": q, "question_id": str(q.get("question_id", f"{key}-q{j}"))}

    def _format(self, unit: dict, image) -> dict:
        return format_sample(self.mode, unit, image, self.text_processor, self.prompt)

    # ---- skip accounting ----------------------------------------------------------------------
    def _skip(self, reason: str, key: str, url: str, detail: str, drop: bool = True, what: str | None = None) -> None:
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

    def _on_tar_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable tars: count once per shard, log, go on with the next shard."""
        text = " ".join(str(a) for a in exn.args)
        url = next((u for u in self.urls if u in text), "?")  # webdataset appends the url or the stream's name
        detail = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self._skip("tar_error", url, url, detail, what="skipping the rest of the shard")
        return True

    def _log_pass_summary(self) -> None:
        if not self.skipped:
            return
        r = self._reader()
        logger.warning(
            "%s: pass done on rank %d/%d worker %d/%d (epoch %d): skipped %s",
            self.name, r.rank, r.world, r.worker, r.num_workers, self.epoch, dict(sorted(self.skipped.items())),
        )


def _entries(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _valid_question(q) -> bool:
    return (
        isinstance(q, dict)
        and isinstance(q.get("question"), str)
        and bool(q["question"].strip())
        and isinstance(q.get("answers"), list)
        and len(q["answers"]) > 0
        and all(isinstance(a, str) for a in q["answers"])
    )
