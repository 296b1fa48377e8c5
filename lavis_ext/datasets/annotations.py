"""Builders for annotation files next to a folder of images: ``json_caption``, ``json_vqa``, ``coco_caption_file``.

Custom data without code: a JSON list or JSONL file of records plus an image folder becomes a LAVIS
dataset whose samples have exactly the keys and shapes of the webdataset pipeline's
(:mod:`lavis_ext.datasets.wds_pipeline`), so ``captioning_ext``, ``vqa_ext`` and the models take them
unchanged. Formats (one record per line in JSONL, or a JSON list of records)::

    json_caption       {"image": "rel/path.jpg", "caption": "..."}  or  {"image": ..., "captions": ["...", ...]}
                       ("caption" may also be a list, as in LAVIS's Karpathy files); optional "image_id"
    json_vqa           {"image": ..., "question": "...", "answers": ["...", ...]}  ("answer": str or list is
                       accepted too, as are VQAv2's {"answer": ...} dicts); optional "question_id",
                       "question_type", "answer_type", "image_id"
    coco_caption_file  {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}

Records of the same image may repeat; they are grouped by resolved image path (one image, all its
captions / questions). ``image_id`` defaults to the image's path relative to the image root;
``question_id`` to ``<image_id>-q<j>`` (j-th question of that image), the pipeline's convention.

``build_info`` keys: ``root`` (optional; relative annotation files and a relative ``image_root`` are
joined to it), ``image_root`` (folder every image must lie in; defaults to ``root``; or one folder per
split, ``{train: train2014, val: val2014}``, as official COCO lays its images out) and
``annotations`` ({split: file}, any split names). The split named ``train`` uses the train processors
and the ``*_train`` mode; every other split the eval ones.

Ids: samples carry ``image_id`` and ``question_id`` as strings (the pipeline's convention); where the file
gives an id as another JSON type (COCO's integer image ids), its value is kept in ``dataset.source_ids``
and the tasks write it back into result files, so official tools (pycocotools' ``loadRes``) accept them.

Bad data is never used silently (one policy for files and shards: :mod:`lavis_ext.datasets.bad_records`). A
record that cannot be used is a *bad record* with a reason: ``not_utf8`` / ``not_json`` (a JSONL line: files
are read line by line as bytes, so the message names the line and the byte), ``not_an_object``, ``no_image``,
``no_caption``, ``no_question``, ``no_answers``, ``bad_type`` (a caption, answer, question, path or id of the
wrong JSON type), ``image_id_conflict``; in COCO files ``bad_image_entry`` and ``unknown_image_id``; and at
load time ``missing_image``, ``unreadable_image`` and ``corrupt_image`` (truncated files included, see
:mod:`lavis_ext.images`). ``datasets.<name>.on_bad_record`` decides: ``skip`` (the default, as for shards)
leaves it out, counts it by reason in ``dataset.skipped``, logs and keeps the first few of each reason with
their ``FILE line N`` in ``dataset.bad_records`` and logs one summary per file at build; ``error`` raises
:class:`~lavis_ext.datasets.bad_records.BadRecordError` at the first, naming file and line (for an image: the
image and the line that named it). Whole-file problems are errors under both policies: a missing file, a JSON
list or COCO file that is not UTF-8 or not JSON (named by line and byte offset; a JSON document cannot be
parsed around a bad byte, JSONL can), a file with no usable record.

Why every image path is checked at build time, under both policies: annotation files come from users and
other tools, so a path like ``../../etc/x`` or a symlink out of the image folder must not make a training
job read files outside the folder it was given. That is a security check, not a data-quality one, so it is
never skipped. Unreadable images are a load-time matter (files change, folders are mounted late).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from types import MappingProxyType

import torch
from lavis.common.registry import registry

from lavis_ext.datasets.bad_records import BadRecordLog, resolve_policy
from lavis_ext.datasets.builders import BAD_RECORD_OPTION, VQA_PROMPT_OPTION, OptionsBuilder, read_build_info
from lavis_ext.datasets.wds_pipeline import DEFAULT_VQA_PROMPT, collate, format_sample
from lavis_ext.images import decode_image
from lavis_ext.processors import fuse_image_processor

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "AnnotationDataset", "ImageEntry", "fit_image_sizes", "load_annotations", "resolve_image"]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
BUILD_INFO_KEYS = ("root", "image_root", "annotations")
#: file format -> the pipeline's mode family ("caption" or "vqa").
KINDS = {"caption": "caption", "vqa": "vqa", "coco": "caption"}


@dataclass
class ImageEntry:
    """One image and all its text: what one webdataset tar sample holds."""

    path: str  # resolved, inside the image root
    rel: str  # relative to the resolved image root (posix)
    image_id: str
    where: str  # "FILE line N" of the first record naming it, for messages
    captions: list[str] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)
    # The annotation file's own id values where they are not strings (COCO's and VQAv2's integers): samples carry
    # string ids, result files these, so that pycocotools' and the VQA API's loadRes accept them.
    source_image_id: object = None
    source_question_ids: dict = field(default_factory=dict)  # str(question_id) -> the file's value


# ---------------------------------------------------------------------------------------------
# parsing


def resolve_image(image_root: str, path: str, where: str) -> str:
    """``path`` joined to ``image_root`` with every symlink resolved; refuses anything outside the root.

    Args:
        image_root: the image folder, already ``os.path.realpath``-ed.
        path: the record's image path (relative, or absolute inside the root).
        where: ``"FILE line N"`` for the message.

    Raises:
        ValueError: the resolved path is not inside ``image_root`` (names file, line, path and root).
    """
    resolved = os.path.realpath(os.path.join(image_root, path))
    if resolved == image_root or os.path.commonpath([resolved, image_root]) != image_root:
        raise ValueError(
            f"{where}: image path {path!r} resolves to {resolved!r}, outside the image root {image_root!r}; "
            "image paths must stay inside the image root (no '..', absolute paths elsewhere or symlinks out)"
        )
    return resolved


class _Bad(Exception):
    """A record that cannot be used: ``reason`` (a stable code, the key in ``dataset.skipped``) and ``detail``
    (for people). The record loops apply the policy to it with the record's ``FILE line N``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_BOM = b"\xef\xbb\xbf"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_whole(path: Path, data: bytes) -> str:
    """A whole JSON file's bytes as text. A JSON document cannot be parsed around a bad byte, so a non-UTF-8
    byte is an error for the file, naming its line and byte offset."""
    body = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exn:
        start = exn.start + len(data) - len(body)
        line = data.count(b"\n", 0, start) + 1
        column = start - data.rfind(b"\n", 0, start)
        raise ValueError(
            f"{path} line {line}: byte 0x{data[start]:02x} at byte offset {start} (column {column}) is not UTF-8 "
            f"({exn.reason}); a JSON file is parsed as a whole, so re-encode it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8), or write one record per line (JSONL) to have bad lines skipped"
        ) from None


def _read_records(path: Path, bad: BadRecordLog) -> Iterator[tuple[str, object]]:
    """``(where, record)`` from a JSON list (``where`` = ``FILE record i``) or a JSONL file (``FILE line N``).

    JSONL is read line by line as bytes, so a line that is not UTF-8 or not JSON is that line's bad record
    (``not_utf8`` / ``not_json``, through ``bad``) and the file goes on. A JSON list is one document: a bad byte or
    bad syntax in it is a ``ValueError`` naming the file and line.
    """
    with open(path, "rb") as f:
        if f.read(len(_BOM)) != _BOM:
            f.seek(0)
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if first == b"[":
            f.seek(0)
            try:
                records = json.loads(_decode_whole(path, f.read()))
            except json.JSONDecodeError as exn:
                raise ValueError(f"{path} line {exn.lineno}: not valid JSON ({exn.msg}); fix the file") from None
            yield from ((f"{path} record {i}", r) for i, r in enumerate(records))
            return
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            where, start, offset = f"{path} line {lineno}", offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM):], start + len(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exn:
                bad.add(where, "not_utf8", f"byte 0x{raw[exn.start]:02x} at column {exn.start + 1} (file offset "
                        f"{start + exn.start}) is not UTF-8 ({exn.reason}); re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exn:
                bad.add(where, "not_json",
                        f"not valid JSON ({exn.msg} at column {exn.colno}); expected one record per line")


def _strings(value, what: str) -> list[str]:
    """A string or a list of strings (numbers allowed, VQA answers often are), empty ones dropped.

    Raises:
        _Bad: ``bad_type`` for anything else (names the value).
    """
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and "answer" in item:  # VQAv2: {"answer", "answer_confidence", "answer_id"}
            item = item["answer"]
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise _Bad("bad_type", f"{what} must be strings, got {type(item).__name__} {_short(item)}")
        if item.strip():
            out.append(item)
    return out


def _check_id(value, what: str) -> None:
    """Ids are strings or integers (evaluation merges results by them); raises ``_Bad`` (``bad_type``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise _Bad("bad_type", f"{what} must be a string or an integer, got {type(value).__name__} {_short(value)}")


class _Grouper:
    """Records -> :class:`ImageEntry` per resolved image path, in first-seen order."""

    def __init__(self, image_root: str):
        self.image_root = image_root
        self.entries: dict[str, ImageEntry] = {}

    def entry(self, image, image_id, where: str) -> ImageEntry:
        """The entry of ``image`` (created on first sight).

        Raises:
            _Bad: no image path (``no_image``), a non-string path or id (``bad_type``), or an image_id that
                contradicts the one an earlier record gave the same image (``image_id_conflict``).
            ValueError: the path leaves the image root (a hard error under every policy: a security check).
        """
        if image is None or (isinstance(image, str) and not image.strip()):
            raise _Bad("no_image", f"record has no 'image' (a path relative to the image root), got {image!r}")
        if not isinstance(image, str):
            raise _Bad("bad_type", f"'image' must be a path string, got {type(image).__name__} {_short(image)}")
        _check_id(image_id, "image_id")
        resolved = resolve_image(self.image_root, image, where)
        entry = self.entries.get(resolved)
        if entry is None:
            rel = Path(os.path.relpath(resolved, self.image_root)).as_posix()
            entry = ImageEntry(resolved, rel, str(image_id) if image_id is not None else rel, where)
            if image_id is not None and not isinstance(image_id, str):
                entry.source_image_id = image_id
            self.entries[resolved] = entry
        elif image_id is not None and str(image_id) != entry.image_id:
            raise _Bad(
                "image_id_conflict",
                f"image {image!r} has image_id {str(image_id)!r}, but {entry.where} gave it {entry.image_id!r}; "
                "one image needs one image_id (evaluation merges results by it)",
            )
        return entry


def _caption_records(records, grouper: _Grouper, bad: BadRecordLog) -> None:
    for where, rec in records:
        try:
            if not isinstance(rec, dict):
                raise _Bad("not_an_object", f"a record must be a JSON object, got {type(rec).__name__}")
            raw = rec.get("captions", rec.get("caption"))
            if raw is None:
                raise _Bad("no_caption", f"record has no 'caption' or 'captions' (keys: {sorted(rec)})")
            captions = _strings(raw, "captions")
            if not captions:
                raise _Bad("no_caption", "record has no non-empty caption")
            grouper.entry(rec.get("image"), rec.get("image_id"), where).captions.extend(captions)
        except _Bad as exn:
            bad.add(where, exn.reason, exn.detail)


def _vqa_records(records, grouper: _Grouper, bad: BadRecordLog) -> None:
    for where, rec in records:
        try:
            if not isinstance(rec, dict):
                raise _Bad("not_an_object", f"a record must be a JSON object, got {type(rec).__name__}")
            question = rec.get("question")
            if question is not None and not isinstance(question, str):
                raise _Bad("bad_type", f"'question' must be a string, got {type(question).__name__} {_short(question)}")
            if not question or not question.strip():
                raise _Bad("no_question", f"record has no non-empty 'question' (keys: {sorted(rec)})")
            raw = rec.get("answers", rec.get("answer"))
            answers = _strings(raw, "answers") if raw is not None else []
            if not answers:
                raise _Bad("no_answers",
                           "record has no 'answers' (or 'answer'); evaluation and training need at least one")
            qid = rec.get("question_id")
            _check_id(qid, "question_id")
            entry = grouper.entry(rec.get("image"), rec.get("image_id"), where)
        except _Bad as exn:
            bad.add(where, exn.reason, exn.detail)
            continue
        q = {"question": question, "answers": answers}
        q["question_id"] = str(qid) if qid is not None else f"{entry.image_id}-q{len(entry.questions)}"
        if qid is not None and not isinstance(qid, str):
            entry.source_question_ids[q["question_id"]] = qid
        for key in ("question_type", "answer_type"):
            if rec.get(key) is not None:
                q[key] = str(rec[key])
        entry.questions.append(q)


def _coco_records(path: Path, grouper: _Grouper, bad: BadRecordLog) -> None:
    try:
        data = json.loads(_decode_whole(path, path.read_bytes()))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} line {exn.lineno}: not valid JSON ({exn.msg})") from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)):
        raise ValueError(
            f"{path}: not a COCO caption file; expected "
            "{'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
        )
    images = {}
    for i, img in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        ok = (isinstance(img, dict) and isinstance(img.get("id"), (str, int)) and not isinstance(img.get("id"), bool)
              and isinstance(img.get("file_name"), str) and img["file_name"].strip())
        if not ok:
            bad.add(where, "bad_image_entry",
                    f"an image needs an 'id' (string or integer) and a 'file_name', got {_short(img)}")
            continue
        images[img["id"]] = (img["file_name"], where)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        try:
            if not isinstance(ann, dict):
                raise _Bad("not_an_object", f"an annotation must be a JSON object, got {type(ann).__name__}")
            image_id = ann.get("image_id")
            _check_id(image_id, "image_id")
            if image_id not in images:
                raise _Bad("unknown_image_id", f"image_id {image_id!r} is not in 'images'")
            captions = _strings(ann.get("caption"), "caption") if ann.get("caption") is not None else []
            if not captions:
                raise _Bad("no_caption", "annotation has no non-empty 'caption'")
            file_name, img_where = images[image_id]
            grouper.entry(file_name, image_id, img_where).captions.extend(captions)
        except _Bad as exn:
            bad.add(where, exn.reason, exn.detail)
    unused = len(images) - len(grouper.entries)
    if unused:
        logger.info("%s: %d image(s) without captions left out", path, unused)


def load_annotations(kind: str, path, image_root, where: str = "annotations",
                     on_bad_record: str | BadRecordLog | None = None) -> list[ImageEntry]:
    """Parse an annotation file into one :class:`ImageEntry` per image, every path checked.

    Args:
        kind: ``caption`` (JSON/JSONL records), ``vqa`` (JSON/JSONL records) or ``coco`` (COCO captions).
        path: the annotation file.
        image_root: the folder every image must lie in.
        where: the config key or option that named ``path``, for the missing-file message.
        on_bad_record: ``skip`` (default) | ``error``, or a :class:`BadRecordLog` that collects this split's bad
            records (the builders pass the one the dataset then keeps, so ``dataset.skipped`` counts both).

    Returns:
        Entries in order of first appearance.

    Raises:
        FileNotFoundError: the annotation file or the image root does not exist.
        BadRecordError: under ``error``, the first bad record (names file and line).
        ValueError: unknown kind or policy, a JSON list / COCO file that is not UTF-8 or not JSON (names file
            and line), an image path outside the root (under every policy), or no usable record at all.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown annotation kind {kind!r}; valid: {', '.join(KINDS)}")
    bad = on_bad_record if isinstance(on_bad_record, BadRecordLog) else BadRecordLog(on_bad_record, logger=logger)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} (from {where}) does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root {str(image_root)!r} is not a folder")
    before, examples = Counter(bad.counts), len(bad.examples)
    grouper = _Grouper(os.path.realpath(image_root))
    if kind == "coco":
        _coco_records(path, grouper, bad)
    elif kind == "caption":
        _caption_records(_read_records(path, bad), grouper, bad)
    else:
        _vqa_records(_read_records(path, bad), grouper, bad)
    skipped = bad.counts - before
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    if not grouper.entries:
        if not skipped:
            raise ValueError(f"{path}: no records")
        new = bad.examples[examples:]
        example = f"; e.g. {new[0]['where']}: {new[0]['detail']}" if new else ""
        raise ValueError(
            f"{path}: no usable records ({reasons}{example}); check that the file is a {kind} annotation file "
            "(formats: lavis_ext.datasets.annotations)"
        )
    if skipped:
        logger.warning(
            "%s: skipped %d bad record(s) (%s); the first of each reason are in dataset.bad_records; set "
            "%s.on_bad_record=error to stop at the first instead", path, sum(skipped.values()), reasons, bad.name,
        )
    return list(grouper.entries.values())


# ---------------------------------------------------------------------------------------------
# the dataset


class AnnotationDataset(torch.utils.data.Dataset):
    """One split as a map-style dataset, in one of the pipeline's four modes (``caption_train`` ...).

    Samples come from the pipeline's own ``format_sample`` (it reads ``mode``,
    ``text_processor`` and ``prompt``), so both give the same keys and shapes by construction.

    Images are decoded by :func:`lavis_ext.images.decode_image`: a truncated file is an error (not grey pixels,
    although LAVIS makes PIL pad them process-wide) and 16-bit images are scaled to 8 bits, not clipped.
    Unreadable images (``missing_image``, ``unreadable_image``, ``corrupt_image``) follow ``on_bad_record``.
    Under ``skip`` an eval sample becomes None and :meth:`collater` drops it; a train sample is replaced by the
    next readable one, because LAVIS wraps every map-style train split in its ``ConcatDataset``, whose collater
    cannot take None. Either way the image is counted once in ``skipped`` (per process: exact with
    ``num_workers=0``) and the first ``max_warnings`` per reason are logged and kept in ``bad_records``. Under
    ``error`` loading it raises :class:`~lavis_ext.datasets.bad_records.BadRecordError` naming the image and the
    line that named it.

    Args:
        entries: from :func:`load_annotations`.
        mode: ``caption_train`` | ``caption_eval`` | ``vqa_train`` | ``vqa_eval``.
        vis_processor, text_processor: LAVIS processors (None: PIL image / identity).
        prompt: VQA prompt with one ``{}``; None or "" = the question alone.
        name: label for log lines.
        max_warnings: bad records logged (and kept in ``bad_records``) per reason.
        on_bad_record: ``skip`` (default) | ``error``, or the :class:`BadRecordLog` that
            :func:`load_annotations` filled for this split (its build-time skips then show in ``skipped`` too).

    Raises:
        ValueError: unknown mode or policy, a VQA prompt without ``{}``, or entries without the mode's text.
    """

    def __init__(
        self,
        entries: list[ImageEntry],
        mode: str,
        vis_processor: Callable | None = None,
        text_processor: Callable | None = None,
        prompt: str | None = DEFAULT_VQA_PROMPT,
        name: str | None = None,
        max_warnings: int = 10,
        on_bad_record: str | BadRecordLog | None = None,
    ):
        modes = ("caption_train", "caption_eval", "vqa_train", "vqa_eval")
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(modes)}")
        if mode.startswith("vqa") and prompt and "{}" not in prompt:
            raise ValueError(f"VQA prompt {prompt!r} has no '{{}}' for the question; e.g. {DEFAULT_VQA_PROMPT!r}")
        self.entries = list(entries)
        self.mode = mode
        self.vis_processor = fuse_image_processor(vis_processor)  # same tensors, without ToTensor's copies
        self.text_processor = text_processor
        self.prompt = prompt or ""
        self.name = name or mode
        self.max_warnings = int(max_warnings)
        if isinstance(on_bad_record, BadRecordLog):
            self.bad_record_log = on_bad_record
        else:
            self.bad_record_log = BadRecordLog(on_bad_record, label=self.name, max_examples=self.max_warnings,
                                               logger=logger)
        self._bad: set[str] = set()
        if mode == "caption_train":
            self.index = [(e, j) for e, entry in enumerate(self.entries) for j in range(len(entry.captions))]
        elif mode == "caption_eval":
            self.index = [(e, None) for e, entry in enumerate(self.entries) if entry.captions]
        else:
            self.index = [(e, j) for e, entry in enumerate(self.entries) for j in range(len(entry.questions))]
        if not self.index:
            raise ValueError(f"{self.name}: no {'questions' if mode.startswith('vqa') else 'captions'} for mode {mode!r}")

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"AnnotationDataset({self.name!r}, mode={self.mode!r}, images={len(self.entries)}, length={len(self)})"

    @property
    def skipped(self) -> Counter:
        """Bad records left out so far, by reason: the annotation file's (at build) and the images' (as loaded)."""
        return self.bad_record_log.counts

    @property
    def bad_records(self) -> list[dict]:
        """The first few bad records of each reason: ``[{"where": "FILE line N", "reason", "detail"}]``."""
        return self.bad_record_log.examples

    @property
    def source_ids(self) -> dict[str, dict[str, object]]:
        """The annotation file's own values of the ids that samples carry as strings, where they differ:
        ``{"image_id": {"391895": 391895}, "question_id": {"42000": 42000}}``. The tasks write these into result
        files, because official tools compare ids by value (pycocotools ``COCO.loadRes``, the VQA API's
        ``loadRes``: ``AssertionError: Results do not correspond to current ... set`` for ``"42000"``)."""
        images = {e.image_id: e.source_image_id for e in self.entries if e.source_image_id is not None}
        questions = {qid: value for e in self.entries for qid, value in e.source_question_ids.items()}
        return {"image_id": images, "question_id": questions}

    def __getitem__(self, idx: int):
        sample = self._load(idx)
        if sample is not None or not self.mode.endswith("train"):
            return sample
        for step in range(1, len(self.index)):
            sample = self._load((idx + step) % len(self.index))
            if sample is not None:
                return sample
        raise RuntimeError(f"{self.name}: no image of this split can be read (skipped {dict(self.skipped)})")

    def collater(self, samples: list) -> dict:
        """Drop skipped (None) samples and batch like the pipeline (:func:`collate`). A batch whose every
        image failed gets the split's first readable sample instead of being empty (the loops index ``image``);
        evaluation merges results by image_id / question_id, so the repeat is not scored twice."""
        kept = [s for s in samples if s is not None]
        if not kept and samples:
            for idx in range(len(self.index)):
                sample = self._load(idx)
                if sample is not None:
                    kept = [sample]
                    break
            else:
                raise RuntimeError(f"{self.name}: no image of this split can be read (skipped {dict(self.skipped)})")
        return collate(kept)

    # ---- internals ------------------------------------------------------------------------------
    def _load(self, idx: int):
        e, j = self.index[idx]
        entry = self.entries[e]
        if entry.path in self._bad:
            return None
        try:
            image = decode_image(entry.path)
        except FileNotFoundError as exn:
            return self._skip("missing_image", entry, f"{type(exn).__name__}: {exn}")
        except (PermissionError, IsADirectoryError) as exn:
            return self._skip("unreadable_image", entry, f"{type(exn).__name__}: {exn}")
        except Exception as exn:  # PIL raises many types for bad bytes
            return self._skip("corrupt_image", entry, f"{type(exn).__name__}: {exn}")
        if self.vis_processor is not None:
            image = self.vis_processor(image)
        unit = {"image_id": entry.image_id}
        if self.mode == "caption_train":
            unit["caption"] = entry.captions[j]
        elif self.mode == "caption_eval":
            unit["captions"] = entry.captions
        else:
            q = entry.questions[j]
            unit.update(question=q, question_id=q["question_id"])
        return format_sample(self.mode, unit, image, self.text_processor, self.prompt)

    def _skip(self, reason: str, entry: ImageEntry, detail: str) -> None:
        """The policy for an image that cannot be loaded; raises under ``error``, else None (counted once)."""
        self.bad_record_log.add(f"{entry.where}, image {entry.rel!r}", reason, detail)
        self._bad.add(entry.path)


# ---------------------------------------------------------------------------------------------
# builders


def fit_image_sizes(cfg) -> None:
    """Every dataset's image processors at the model's input size, checked before any data or model is built.

    ``image_size: null`` in a ``vis_processor`` means the model's ``model.image_size`` (the ``vqa_files`` and
    ``gqa_files`` defaults: benchmark files serve models of every size) and is filled in here; an explicit size
    that differs from the model's fails here, naming the key, instead of at the first batch with the ViT's
    ``Input image size (224*224) doesn't match model (64*64)``. The ext tasks call this in ``build_datasets``.
    Only the processors the run uses are compared (``train`` when it trains on a split named ``train``, ``eval``
    for the others): an evaluation recipe sets its eval processor and leaves the unused train one at the default.

    Args:
        cfg: LAVIS's ``Config`` (``model_cfg``, ``datasets_cfg``, ``run_cfg``); dataset nodes are updated in place.

    Raises:
        ValueError: a null size without ``model.image_size``, or a size other than the model's (names both).
    """
    model_size = cfg.model_cfg.get("image_size")
    run = cfg.run_cfg
    splits = set(run.get("valid_splits") or []) | set(run.get("test_splits") or [])
    if not run.get("evaluate", False):
        splits |= set(run.get("train_splits", ["train"]) or [])
    used = {"train" if split == "train" else "eval" for split in splits}
    for name, dcfg in cfg.datasets_cfg.items():
        for role, pcfg in (dcfg.get("vis_processor") or {}).items():
            if pcfg is None or "image_size" not in pcfg:
                continue
            key = f"datasets.{name}.vis_processor.{role}.image_size"
            size = pcfg.get("image_size")
            if size is None:
                if model_size is None:
                    raise ValueError(f"{key} is null (the model's size), but model.image_size is not set; set {key}")
                pcfg.image_size = int(model_size)
            elif role in used and model_size is not None and int(size) != int(model_size):
                raise ValueError(
                    f"{key} is {size}, but the model takes {model_size}x{model_size} images (model.image_size); "
                    f"set {key}={model_size}, or null for the model's size"
                )


class AnnotationBuilder(OptionsBuilder):
    """Shared logic; subclasses set ``name``, ``kind`` (a key of :data:`KINDS`) and the default YAML."""

    name = "json_caption"
    kind = "caption"
    DATASET_CONFIG_DICT: dict = {}
    dataset_options = BAD_RECORD_OPTION

    def build_datasets(self) -> dict:
        """``{split: AnnotationDataset}``; no download and no barrier (every rank parses the files).

        Raises:
            ValueError: unknown ``build_info`` keys, no annotations, a malformed record, an image path
                outside the image root.
            FileNotFoundError: a missing annotation file (names it and its config key) or image root.
            BadRecordError: under ``on_bad_record: error``, the first bad record (names file and line).
        """
        self.build_processors()
        policy = resolve_policy(self.option("on_bad_record"), f"datasets.{self.name}.on_bad_record")
        info = self._build_info()
        prefix = f"datasets.{self.name}.build_info"
        root = info.get("root")
        annotations = info.get("annotations") or {}
        if not isinstance(annotations, dict) or not annotations:
            raise ValueError(f"{prefix}.annotations gives no splits; e.g. {{train: train.jsonl, val: val.jsonl}}")
        image_roots = self._image_roots(info, prefix, annotations, f"{prefix}.annotations")
        datasets = {}
        for split, file in annotations.items():
            if not file:
                raise ValueError(f"{prefix}.annotations.{split} is empty; give an annotation file or remove the split")
            path = self._join(root, file)
            bad = BadRecordLog(policy, name=f"datasets.{self.name}", label=f"{self.name}/{split}", logger=logger)
            entries = load_annotations(self.kind, path, image_roots[split], where=f"{prefix}.annotations.{split}",
                                       on_bad_record=bad)
            train = split == "train"
            proc = "train" if train else "eval"
            dataset = AnnotationDataset(
                entries,
                mode=f"{KINDS[self.kind]}_{proc}",
                vis_processor=self.vis_processors[proc],
                text_processor=self.text_processors[proc],
                prompt=self.option("prompt") if "prompt" in self.dataset_options else None,
                name=f"{self.name}/{split}",
                on_bad_record=bad,
            )
            logger.info("built %r from %s", dataset, path)
            datasets[split] = dataset
        return datasets

    @staticmethod
    def _join(root, path) -> str:
        path = os.path.expanduser(str(path))
        return path if root is None or os.path.isabs(path) else os.path.join(os.path.expanduser(str(root)), path)

    def _image_roots(self, info: dict, prefix: str, splits, splits_key: str) -> dict[str, str]:
        """``{split: image folder}`` from ``build_info.image_root`` (default ``root``), each joined to ``root`` and
        checked to be a folder. ``image_root`` is one folder for every split, or ``{split: folder}``: official COCO
        keeps ``train2014/`` and ``val2014/`` apart and its caption files name images by file name alone.

        Raises:
            ValueError: no image root, or a mapping that names a split not in ``splits_key`` (names the valid
                splits) or leaves one out.
            FileNotFoundError: a folder that does not exist.
        """
        root = info.get("root")
        image_root = info.get("image_root") or root
        if not image_root:
            raise ValueError(f"{prefix}.image_root is not set; give the folder the image paths are relative to")
        if isinstance(image_root, dict):
            unknown = [s for s in image_root if s not in splits]
            if unknown:
                raise ValueError(
                    f"{prefix}.image_root names split(s) {unknown} that are not in {splits_key}; valid splits: "
                    f"{', '.join(map(str, splits))}"
                )
            missing = [s for s in splits if not image_root.get(s)]
            if missing:
                raise ValueError(
                    f"{prefix}.image_root gives no folder for split(s) {missing}; add them "
                    f"({{{missing[0]}: <folder>}}) or give one folder for every split"
                )
            where = {s: f"{prefix}.image_root.{s}" for s in splits}
        else:
            image_root = {s: image_root for s in splits}
            where = {s: f"{prefix}.image_root" for s in splits}
        out = {}
        for split in splits:
            path = self._join(root, image_root[split])
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{where[split]} {str(path)!r} is not a folder")
            out[split] = path
        return out

    def _build_info(self) -> dict:
        return read_build_info(self.config, BUILD_INFO_KEYS, self.name)

    def build_processors(self):
        """LAVIS's, once no image size is left null: null means the model's size, which the task fills in
        (:func:`fit_image_sizes`); a builder used on its own has no model to take it from."""
        for split, pcfg in (self.config.get("vis_processor") or {}).items():
            if pcfg is not None and "image_size" in pcfg and pcfg.get("image_size") is None:
                raise ValueError(
                    f"datasets.{self.name}.vis_processor.{split}.image_size is null, the model's size, which only a "
                    "task knows (lavis_ext.datasets.annotations.fit_image_sizes); set it when building on your own"
                )
        super().build_processors()


@registry.register_builder("json_caption")
class JsonCaptionBuilder(AnnotationBuilder):
    """JSON/JSONL caption records: train = (image, caption) pairs; other splits = images with all captions."""

    name = "json_caption"
    kind = "caption"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "json_caption" / "defaults.yaml")}


@registry.register_builder("json_vqa")
class JsonVQABuilder(AnnotationBuilder):
    """JSON/JSONL question records: one sample per question; train gives text_output, eval all answers."""

    name = "json_vqa"
    kind = "vqa"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "json_vqa" / "defaults.yaml")}
    dataset_options = MappingProxyType({**BAD_RECORD_OPTION, **VQA_PROMPT_OPTION})


@registry.register_builder("coco_caption_file")
class CocoCaptionFileBuilder(AnnotationBuilder):
    """COCO-format caption files (``captions_train2017.json`` style), same samples as ``json_caption``."""

    name = "coco_caption_file"
    kind = "coco"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "coco_caption_file" / "defaults.yaml")}
