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
joined to it), ``image_root`` (folder every image must lie in; defaults to ``root``) and
``annotations`` ({split: file}, any split names). The split named ``train`` uses the train processors
and the ``*_train`` mode; every other split the eval ones.

Why every image path is checked at build time: annotation files come from users and other tools, so
a path like ``../../etc/x`` or a symlink out of the image folder must not make a training job read
files outside the folder it was given. Unreadable images are a load-time matter (files change,
folders are mounted late): they are skipped and counted in ``dataset.skipped`` as in the pipeline.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from PIL import Image

from lavis_ext.datasets.builders import read_build_info
from lavis_ext.datasets.wds_pipeline import DEFAULT_VQA_PROMPT, collate, format_sample

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "AnnotationDataset", "ImageEntry", "load_annotations", "resolve_image"]

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


def _read_records(path: Path) -> list[tuple[str, object]]:
    """``[(where, record)]`` from a JSON list or a JSONL file; ``where`` names the line or list index."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exn:
            raise ValueError(f"{path} line {exn.lineno}: not valid JSON ({exn.msg})") from None
        return [(f"{path} record {i}", r) for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exn:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({exn.msg}); expected one record per line") from None
    return out


def _strings(value, where: str, what: str) -> list[str]:
    """A string or a list of strings (numbers allowed for answers), empty ones dropped."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and "answer" in item:  # VQAv2: {"answer", "answer_confidence", "answer_id"}
            item = item["answer"]
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise ValueError(f"{where}: {what} must be strings, got {type(item).__name__} {item!r}")
        if item.strip():
            out.append(item)
    return out


class _Grouper:
    """Records -> :class:`ImageEntry` per resolved image path, in first-seen order."""

    def __init__(self, image_root: str):
        self.image_root = image_root
        self.entries: dict[str, ImageEntry] = {}

    def entry(self, image, image_id, where: str) -> ImageEntry:
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: record has no 'image' (a path relative to the image root), got {image!r}")
        resolved = resolve_image(self.image_root, image, where)
        entry = self.entries.get(resolved)
        if entry is None:
            rel = Path(os.path.relpath(resolved, self.image_root)).as_posix()
            entry = ImageEntry(resolved, rel, str(image_id) if image_id is not None else rel, where)
            self.entries[resolved] = entry
        elif image_id is not None and str(image_id) != entry.image_id:
            raise ValueError(
                f"{where}: image {image!r} has image_id {str(image_id)!r}, but {entry.where} gave it "
                f"{entry.image_id!r}; one image needs one image_id (evaluation merges results by it)"
            )
        return entry


def _caption_records(records, grouper: _Grouper) -> None:
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        raw = rec.get("captions", rec.get("caption"))
        if raw is None:
            raise ValueError(f"{where}: record has no 'caption' or 'captions' (keys: {sorted(rec)})")
        captions = _strings(raw, where, "captions")
        if not captions:
            raise ValueError(f"{where}: record has no non-empty caption")
        grouper.entry(rec.get("image"), rec.get("image_id"), where).captions.extend(captions)


def _vqa_records(records, grouper: _Grouper) -> None:
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: record has no non-empty 'question' (keys: {sorted(rec)})")
        raw = rec.get("answers", rec.get("answer"))
        answers = _strings(raw, where, "answers") if raw is not None else []
        if not answers:
            raise ValueError(f"{where}: record has no 'answers' (or 'answer'); evaluation and training need at least one")
        entry = grouper.entry(rec.get("image"), rec.get("image_id"), where)
        q = {"question": question, "answers": answers}
        qid = rec.get("question_id")
        q["question_id"] = str(qid) if qid is not None else f"{entry.image_id}-q{len(entry.questions)}"
        for key in ("question_type", "answer_type"):
            if rec.get(key) is not None:
                q[key] = str(rec[key])
        entry.questions.append(q)


def _coco_records(path: Path, grouper: _Grouper) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{where}: an image needs 'id' and 'file_name'")
        images[img["id"]] = (img["file_name"], where)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            got = ann.get("image_id") if isinstance(ann, dict) else ann
            raise ValueError(f"{where}: image_id {got!r} is not in 'images'")
        captions = _strings(ann.get("caption"), where, "caption") if ann.get("caption") is not None else []
        if not captions:
            raise ValueError(f"{where}: annotation has no non-empty 'caption'")
        file_name, img_where = images[ann["image_id"]]
        grouper.entry(file_name, ann["image_id"], img_where).captions.extend(captions)
    unused = len(images) - len(grouper.entries)
    if unused:
        logger.info("%s: %d image(s) without captions left out", path, unused)


def load_annotations(kind: str, path, image_root, where: str = "annotations") -> list[ImageEntry]:
    """Parse an annotation file into one :class:`ImageEntry` per image, every path checked.

    Args:
        kind: ``caption`` (JSON/JSONL records), ``vqa`` (JSON/JSONL records) or ``coco`` (COCO captions).
        path: the annotation file.
        image_root: the folder every image must lie in.
        where: the config key or option that named ``path``, for the missing-file message.

    Returns:
        Entries in order of first appearance.

    Raises:
        FileNotFoundError: the annotation file or the image root does not exist.
        ValueError: unknown kind, malformed JSON or record (names file and line), an image path
            outside the root, or no records at all.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown annotation kind {kind!r}; valid: {', '.join(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} (from {where}) does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root {str(image_root)!r} is not a folder")
    grouper = _Grouper(os.path.realpath(image_root))
    if kind == "coco":
        _coco_records(path, grouper)
    elif kind == "caption":
        _caption_records(_read_records(path), grouper)
    else:
        _vqa_records(_read_records(path), grouper)
    if not grouper.entries:
        raise ValueError(f"{path}: no records")
    return list(grouper.entries.values())


# ---------------------------------------------------------------------------------------------
# the dataset


class AnnotationDataset(torch.utils.data.Dataset):
    """One split as a map-style dataset, in one of the pipeline's four modes (``caption_train`` ...).

    Samples come from the pipeline's own ``format_sample`` (it reads ``mode``,
    ``text_processor`` and ``prompt``), so both give the same keys and shapes by construction.

    Unreadable images: an eval sample becomes None and :meth:`collater` drops it. A train sample is
    replaced by the next readable one, because LAVIS wraps every map-style train split in its
    ``ConcatDataset``, whose collater cannot take None. Either way the image is counted once in
    ``skipped`` (per process: exact with ``num_workers=0``) and the first ``max_warnings`` are logged.

    Args:
        entries: from :func:`load_annotations`.
        mode: ``caption_train`` | ``caption_eval`` | ``vqa_train`` | ``vqa_eval``.
        vis_processor, text_processor: LAVIS processors (None: PIL image / identity).
        prompt: VQA prompt with one ``{}``; None or "" = the question alone.
        name: label for log lines.

    Raises:
        ValueError: unknown mode, a VQA prompt without ``{}``, or entries without the mode's text.
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
    ):
        modes = ("caption_train", "caption_eval", "vqa_train", "vqa_eval")
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(modes)}")
        if mode.startswith("vqa") and prompt and "{}" not in prompt:
            raise ValueError(f"VQA prompt {prompt!r} has no '{{}}' for the question; e.g. {DEFAULT_VQA_PROMPT!r}")
        self.entries = list(entries)
        self.mode = mode
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.prompt = prompt or ""
        self.name = name or mode
        self.max_warnings = int(max_warnings)
        self.skipped: Counter = Counter()
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
            with Image.open(entry.path) as raw:
                image = raw.convert("RGB")
        except FileNotFoundError as exn:
            return self._skip("missing_image", entry, f"{type(exn).__name__}: {exn}")
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
        self._bad.add(entry.path)
        self.skipped[reason] += 1
        n = sum(self.skipped.values())
        if n <= self.max_warnings:
            logger.warning(
                "%s: skipping image %r (%s, first named at %s): %s", self.name, entry.rel, reason, entry.where, detail
            )
        elif n == self.max_warnings + 1:
            logger.warning("%s: more unreadable images; only counting them from now on (see dataset.skipped)", self.name)


# ---------------------------------------------------------------------------------------------
# builders


class AnnotationBuilder(BaseDatasetBuilder):
    """Shared logic; subclasses set ``name``, ``kind`` (a key of :data:`KINDS`) and the default YAML."""

    name = "json_caption"
    kind = "caption"
    DATASET_CONFIG_DICT: dict = {}

    def build_datasets(self) -> dict:
        """``{split: AnnotationDataset}``; no download and no barrier (every rank parses the files).

        Raises:
            ValueError: unknown ``build_info`` keys, no annotations, a malformed record, an image path
                outside the image root.
            FileNotFoundError: a missing annotation file (names it and its config key) or image root.
        """
        self.build_processors()
        info = self._build_info()
        prefix = f"datasets.{self.name}.build_info"
        root = info.get("root")
        image_root = self._image_root(info, prefix)
        annotations = info.get("annotations") or {}
        if not isinstance(annotations, dict) or not annotations:
            raise ValueError(f"{prefix}.annotations gives no splits; e.g. {{train: train.jsonl, val: val.jsonl}}")
        datasets = {}
        for split, file in annotations.items():
            if not file:
                raise ValueError(f"{prefix}.annotations.{split} is empty; give an annotation file or remove the split")
            path = self._join(root, file)
            entries = load_annotations(self.kind, path, image_root, where=f"{prefix}.annotations.{split}")
            train = split == "train"
            proc = "train" if train else "eval"
            dataset = AnnotationDataset(
                entries,
                mode=f"{KINDS[self.kind]}_{proc}",
                vis_processor=self.vis_processors[proc],
                text_processor=self.text_processors[proc],
                prompt=self.config.get("prompt", DEFAULT_VQA_PROMPT),
                name=f"{self.name}/{split}",
            )
            logger.info("built %r from %s", dataset, path)
            datasets[split] = dataset
        return datasets

    @staticmethod
    def _join(root, path) -> str:
        path = os.path.expanduser(str(path))
        return path if root is None or os.path.isabs(path) else os.path.join(os.path.expanduser(str(root)), path)

    def _image_root(self, info: dict, prefix: str):
        """``build_info.image_root`` (default ``root``), joined to ``root``; it must be a folder."""
        root = info.get("root")
        image_root = info.get("image_root") or root
        if not image_root:
            raise ValueError(f"{prefix}.image_root is not set; give the folder the image paths are relative to")
        image_root = self._join(root, image_root)
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{prefix}.image_root {str(image_root)!r} is not a folder")
        return image_root

    def _build_info(self) -> dict:
        return read_build_info(self.config, BUILD_INFO_KEYS, self.name)


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


@registry.register_builder("coco_caption_file")
class CocoCaptionFileBuilder(AnnotationBuilder):
    """COCO-format caption files (``captions_train2017.json`` style), same samples as ``json_caption``."""

    name = "coco_caption_file"
    kind = "coco"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "coco_caption_file" / "defaults.yaml")}
