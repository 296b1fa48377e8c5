"""Builders for benchmarks in their released file formats: ``vqa_files`` (VQAv2, OK-VQA) and ``gqa_files`` (GQA).

No conversion step and no download: point ``build_info`` at the files as released and at the image folder.
Samples are :class:`lavis_ext.datasets.annotations.AnnotationDataset`'s (the webdataset pipeline's keys and
shapes), so ``vqa_ext`` / ``gqa_ext`` and the models take them unchanged.

``vqa_files`` reads a VQAv2-style question file per split and, where the split has public answers, its
annotation file (``build_info``: ``questions: {split: file}``, ``annotations: {split: file}``). A split with a
question file but no annotation file (VQAv2 test-dev / test-std) has samples with ``answers: []``; ``vqa_ext``
writes its predictions as an EvalAI submission instead of scoring them. OK-VQA's files have the same layout.
Images: ``image_pattern`` (one pattern, or ``{split: pattern}``) formatted with ``image_id`` (VQAv2's integer,
so ``{image_id:012d}`` works), ``data_subtype`` (from the question file, e.g. ``val2014``, ``test-dev2015``) and
``image_dir`` (``data_subtype``, with test-dev/test mapped to ``test2015``, where COCO keeps those images). The
default, ``{image_dir}/COCO_{image_dir}_{image_id:012d}.jpg``, is COCO's own layout.

``gqa_files`` reads GQA question files (``testdev_balanced_questions.json``: ``{question_id: {"imageId",
"question", "answer", "types", ...}}``; ``build_info``: ``questions: {split: file}``), images by
``image_pattern`` (default ``{image_id}.jpg``, GQA's ``images/`` folder). Each sample's ``answers`` is the one
answer (``[]`` for a split without answers), ``question_type`` GQA's structural type and ``answer_type``
``open`` / ``binary`` as in GQA's ``eval.py``.

Ids: samples carry ``question_id`` and ``image_id`` as strings (``"262148000"``), as every dataset here does; the
file's own values (VQAv2's integers) are kept in ``dataset.source_ids``, and ``vqa_ext`` writes them back into its
result files, so the official VQA API's ``loadRes`` accepts them (GQA's ids are strings already). The split named
``train`` uses the train processors and needs answers; every other split the eval ones. Every image path is
checked to stay inside ``image_root`` (see :mod:`lavis_ext.datasets.annotations`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from lavis.common.registry import registry

from lavis_ext.datasets.annotations import (
    AnnotationBuilder,
    AnnotationDataset,
    ImageEntry,
    resolve_image,
)
from lavis_ext.datasets.bad_records import BadRecordLog
from lavis_ext.datasets.builders import BAD_RECORD_OPTION, VQA_PROMPT_OPTION, read_build_info
from lavis_ext.evaluation.files import read_gqa_questions, read_vqa_files

logger = logging.getLogger(__name__)

__all__ = ["GQAFilesBuilder", "VQAFilesBuilder", "coco_image_dir", "group_questions"]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
VQA_DEFAULT_PATTERN = "{image_dir}/COCO_{image_dir}_{image_id:012d}.jpg"
GQA_DEFAULT_PATTERN = "{image_id}.jpg"


def coco_image_dir(data_subtype: str | None) -> str | None:
    """COCO's image folder for a VQA ``data_subtype``: ``test-dev2015`` and ``test2015`` images are in
    ``test2015``; ``train2014``/``val2014`` are their own."""
    if data_subtype is None:
        return None
    return "test2015" if str(data_subtype).startswith("test") else str(data_subtype)


def group_questions(records: list[dict], image_root: str, pattern: str, fields: dict, where: str) -> list[ImageEntry]:
    """Question records -> one :class:`ImageEntry` per image (first-seen order), image paths checked.

    Args:
        records: ``[{"question_id", "image_id", "question", "answers", "question_type", "answer_type"}]``.
        image_root: the image folder (resolved here).
        pattern: the image path relative to ``image_root``, formatted with ``image_id`` and ``fields``.
        fields: extra format fields (``data_subtype``, ``image_dir``).
        where: the file the records came from, for messages.

    Raises:
        ValueError: the pattern does not format, or a path leaves the image root.
    """
    root = os.path.realpath(image_root)
    entries: dict[str, ImageEntry] = {}
    by_image: dict[object, ImageEntry] = {}
    for rec in records:
        entry = by_image.get(rec["image_id"])
        if entry is None:
            try:
                rel = pattern.format(image_id=rec["image_id"], **fields)
            except (KeyError, ValueError, IndexError) as exn:
                raise ValueError(
                    f"{where}: image_pattern {pattern!r} cannot be formatted for image_id {rec['image_id']!r} "
                    f"({type(exn).__name__}: {exn}); fields: image_id, {', '.join(fields)}"
                ) from None
            resolved = resolve_image(root, rel, f"{where} (question {rec['question_id']!r})")
            entry = entries.get(resolved)
            if entry is None:
                rel_posix = Path(os.path.relpath(resolved, root)).as_posix()
                entry = ImageEntry(resolved, rel_posix, str(rec["image_id"]), f"{where} question {rec['question_id']!r}")
                if not isinstance(rec["image_id"], str):
                    entry.source_image_id = rec["image_id"]
                entries[resolved] = entry
            by_image[rec["image_id"]] = entry
        q = {"question": rec["question"], "answers": list(rec["answers"]), "question_id": str(rec["question_id"])}
        if not isinstance(rec["question_id"], str):
            entry.source_question_ids[q["question_id"]] = rec["question_id"]
        for key in ("question_type", "answer_type"):
            if rec.get(key) is not None:
                q[key] = str(rec[key])
        entry.questions.append(q)
    return list(entries.values())


class _FilesBuilder(AnnotationBuilder):
    """Shared logic: per split, read the records, group them by image, build an AnnotationDataset."""

    BUILD_INFO_KEYS: tuple = ()
    default_pattern = GQA_DEFAULT_PATTERN
    dataset_options = MappingProxyType({**BAD_RECORD_OPTION, **VQA_PROMPT_OPTION})

    def build_datasets(self) -> dict:
        """``{split: AnnotationDataset}`` in ``vqa_train`` (split ``train``) or ``vqa_eval`` mode.

        Raises:
            ValueError: unknown ``build_info`` keys, no question files, a malformed file, a train split without
                answers, an image pattern that does not format, an image path outside the image root.
            FileNotFoundError: a missing file or image root.
        """
        self.build_processors()
        info = read_build_info(self.config, self.BUILD_INFO_KEYS, self.name)
        prefix = f"datasets.{self.name}.build_info"
        root = info.get("root")
        questions = info.get("questions") or {}
        if not isinstance(questions, dict) or not questions:
            raise ValueError(f"{prefix}.questions gives no splits; e.g. {{val: v2_OpenEnded_mscoco_val2014_questions.json}}")
        image_roots = self._image_roots(info, prefix, questions, f"{prefix}.questions")
        patterns = info.get("image_pattern")
        datasets = {}
        for split, qfile in questions.items():
            if not qfile:
                raise ValueError(f"{prefix}.questions.{split} is empty; give a question file or remove the split")
            path = self._join(root, qfile)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"question file {path!r} (from {prefix}.questions.{split}) does not exist")
            records, fields = self._read_split(split, path, info, root, prefix)
            pattern = patterns.get(split) if isinstance(patterns, dict) else patterns
            pattern = pattern or self._default_pattern(fields, path, prefix)
            train = split == "train"
            if train and not all(r["answers"] for r in records):
                raise ValueError(f"{prefix}: split 'train' has questions without answers; training needs answers")
            entries = group_questions(records, image_roots[split], pattern, fields, str(path))
            proc = "train" if train else "eval"
            dataset = AnnotationDataset(
                entries,
                mode=f"vqa_{proc}",
                vis_processor=self.vis_processors[proc],
                text_processor=self.text_processors[proc],
                prompt=self.option("prompt"),
                name=f"{self.name}/{split}",
                on_bad_record=BadRecordLog(self.option("on_bad_record"), name=f"datasets.{self.name}",
                                           label=f"{self.name}/{split}"),  # unreadable images: skip | error
            )
            answered = sum(1 for r in records if r["answers"])
            logger.info("built %r from %s (%d of %d questions with answers)", dataset, path, answered, len(records))
            datasets[split] = dataset
        return datasets

    def _read_split(self, split, path, info, root, prefix) -> tuple[list[dict], dict]:
        raise NotImplementedError

    def _default_pattern(self, fields: dict, path, prefix) -> str:
        return self.default_pattern


@registry.register_builder("vqa_files")
class VQAFilesBuilder(_FilesBuilder):
    """VQAv2 / OK-VQA question files, with annotation files where the split has answers."""

    name = "vqa_files"
    BUILD_INFO_KEYS = ("root", "image_root", "questions", "annotations", "image_pattern")
    DATASET_CONFIG_DICT: ClassVar[dict] = {"default": str(_CONFIGS / "vqa_files" / "defaults.yaml")}

    def _read_split(self, split, path, info, root, prefix):
        annotations = info.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ValueError(f"{prefix}.annotations must be {{split: file}}, got {annotations!r}")
        unknown = [s for s in annotations if s not in (info.get("questions") or {})]
        if unknown:
            raise ValueError(f"{prefix}.annotations names split(s) {unknown} that have no question file in {prefix}.questions")
        ann = annotations.get(split)
        ann_path = self._join(root, ann) if ann else None
        if ann_path is not None and not os.path.isfile(ann_path):
            raise FileNotFoundError(f"annotation file {ann_path!r} (from {prefix}.annotations.{split}) does not exist")
        data = read_vqa_files(path, ann_path)
        if not data.has_answers:
            logger.info("%s/%s: no annotation file, so no answers: predictions will be written for EvalAI", self.name, split)
        return data.records, {"data_subtype": data.data_subtype, "image_dir": coco_image_dir(data.data_subtype)}

    def _default_pattern(self, fields, path, prefix) -> str:
        if fields.get("image_dir") is None:
            raise ValueError(
                f"{path} has no 'data_subtype', so the COCO image folder is unknown; set {prefix}.image_pattern, "
                f"e.g. 'val2014/COCO_val2014_{{image_id:012d}}.jpg'"
            )
        return VQA_DEFAULT_PATTERN


@registry.register_builder("gqa_files")
class GQAFilesBuilder(_FilesBuilder):
    """GQA question files (``{question_id: {"imageId", "question", "answer", "types", ...}}``)."""

    name = "gqa_files"
    BUILD_INFO_KEYS = ("root", "image_root", "questions", "image_pattern")
    DATASET_CONFIG_DICT: ClassVar[dict] = {"default": str(_CONFIGS / "gqa_files" / "defaults.yaml")}

    def _read_split(self, split, path, info, root, prefix):
        records = read_gqa_questions(path)
        unbalanced = sum(1 for r in records if r.get("is_balanced") is False)
        if unbalanced:
            logger.warning(
                "%s/%s: %d of %d questions are not in the balanced set; GQA's accuracy is reported on balanced "
                "questions only (use the *_balanced_questions.json file)", self.name, split, unbalanced, len(records)
            )
        return records, {}
