"""Readers for the annotation and result files that evaluation meets, into plain dicts (no torch, no LAVIS).

Used by the scoring CLI (:mod:`lavis_ext.evaluation.score`) and by the dataset builders of
:mod:`lavis_ext.datasets.official`, so a split is read the same way for training, evaluation and re-scoring.

Formats:

- **VQAv2 / OK-VQA** (also VQA v1): a question file ``{"data_subtype", "questions": [{"question_id", "image_id",
  "question"}]}`` and, except for test splits, an annotation file ``{"annotations": [{"question_id", "image_id",
  "question_type", "answer_type", "answers": [{"answer", "answer_id", ...}]}]}``.
- **GQA**: ``{question_id: {"imageId", "question", "answer", "types": {"structural", "semantic", ...},
  "isBalanced", ...}}`` (``testdev_balanced_questions.json``); submission splits have no ``"answer"``.
- **Our JSON/JSONL records** (the ``json_caption`` / ``json_vqa`` builders' format): captions
  ``{"image", "caption" | "captions", "image_id"?}``, questions ``{"image", "question", "answers" | "answer",
  "question_id"?, ...}``. Ids default as those builders default them: ``image_id`` to the image path,
  ``question_id`` to ``<image_id>-q<j>`` (the j-th question of that image).
- **COCO captions**: ``{"images": [{"id", ...}], "annotations": [{"image_id", "caption"}]}``.
- **Results**: ``[{"image_id", "caption"}]`` (COCO / LAVIS caption results), ``[{"question_id", "answer"}]``
  (VQA results, EvalAI submissions), ``[{"questionId", "prediction"}]`` (GQA submissions), or ``{id: answer}``.

Ids from files are compared as strings by the scoring CLI (``123`` in a result file matches ``"123"`` in ours).
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "VQASplit",
    "read_caption_image_names",
    "read_caption_references",
    "read_caption_results",
    "read_gqa_questions",
    "read_json_or_jsonl",
    "read_vqa_files",
    "read_vqa_records",
    "read_vqa_results",
]

#: GQA structural types whose answers are yes/no or one of two options (GQA's eval.py: every type but "query").
GQA_OPEN_STRUCTURAL = "query"


@dataclass
class VQASplit:
    """One split read from VQAv2-style files.

    ``records``: ``[{"question_id", "image_id", "question", "answers", "question_type", "answer_type"}]`` in question
    file order (``answers`` is ``[]`` when there is no annotation file: test-dev / test-std); ``data_subtype``: the
    question file's (e.g. ``val2014``, ``test-dev2015``) or None.
    """

    records: list[dict] = field(default_factory=list)
    data_subtype: str | None = None
    has_answers: bool = True


def _load_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} line {exn.lineno}: not valid JSON ({exn.msg})") from None


def read_json_or_jsonl(path) -> object:
    """A JSON document, or a list of the records of a JSONL file (one JSON object per line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither valid JSON nor valid JSONL (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exn:
                where = lineno if len(records) else first.lineno
                raise ValueError(
                    f"{path} line {where}: neither JSON nor JSONL ({exn.msg if len(records) else first.msg})"
                ) from None
        return records


def _records(data, path, what: str) -> list[dict]:
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path} record {i}: expected a JSON object, got {type(rec).__name__}")
    return data


def _answer_list(raw, where: str) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if isinstance(item, dict) and "answer" in item:
            item = item["answer"]
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise ValueError(f"{where}: answers must be strings, got {type(item).__name__} {item!r}")
        out.append(item)
    return out


def _image_key(rec: dict, where: str) -> str:
    if rec.get("image_id") is not None:
        return str(rec["image_id"])
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: record has neither 'image_id' nor 'image'")
    return posixpath.normpath(image.replace(os.sep, "/"))


# ----------------------------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------------------------
def read_vqa_files(questions, annotations=None) -> VQASplit:
    """Join a VQAv2-style question file and (optionally) its annotation file.

    Args:
        questions: the question file (``v2_OpenEnded_mscoco_val2014_questions.json``,
            ``OpenEnded_mscoco_val2014_questions.json`` for OK-VQA, ...).
        annotations: the annotation file of the same split; None for test splits (no public answers).

    Returns:
        A :class:`VQASplit` in question-file order.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: not the expected layout, or questions and annotations that do not cover the same ids.
    """
    qdata = _load_json(questions)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(
            f"{questions}: not a VQAv2 question file; expected {{'questions': [{{'question_id', 'image_id', "
            "'question'}], ...}"
        )
    subtype = qdata.get("data_subtype")
    anns = None
    if annotations is not None:
        anns = _vqa_annotation_index(annotations)
    records, seen = [], set()
    for i, q in enumerate(qdata["questions"]):
        where = f"{questions} questions[{i}]"
        if not isinstance(q, dict) or "question_id" not in q or "question" not in q or "image_id" not in q:
            raise ValueError(f"{where}: a question needs 'question_id', 'image_id' and 'question'")
        qid = q["question_id"]
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        rec = {"question_id": qid, "image_id": q["image_id"], "question": str(q["question"]), "answers": [],
               "question_type": None, "answer_type": None}
        if anns is not None:
            ann = anns.get(qid)
            if ann is None:
                raise ValueError(f"{where}: question {qid!r} has no entry in {annotations}")
            rec.update(answers=ann["answers"], question_type=ann["question_type"], answer_type=ann["answer_type"])
        records.append(rec)
    if anns is not None and len(anns) != len(seen):
        extra = [q for q in anns if q not in seen][:5]
        raise ValueError(f"{annotations} annotates questions that are not in {questions}, e.g. {extra!r}")
    if not records:
        raise ValueError(f"{questions}: no questions")
    return VQASplit(records=records, data_subtype=subtype, has_answers=anns is not None)


def _vqa_annotation_index(path) -> dict:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{path}: not a VQAv2 annotation file; expected {{'annotations': [{{'question_id', 'answers', "
            "'question_type', 'answer_type'}], ...}"
        )
    index = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        if not isinstance(ann, dict) or "question_id" not in ann or "answers" not in ann:
            raise ValueError(f"{where}: an annotation needs 'question_id' and 'answers'")
        answers = _answer_list(ann["answers"], where)
        if not answers:
            raise ValueError(f"{where}: no answers")
        index[ann["question_id"]] = {
            "answers": answers,
            "question_type": ann.get("question_type"),
            "answer_type": ann.get("answer_type"),
            "image_id": ann.get("image_id"),
        }
    return index


def read_vqa_records(path) -> list[dict]:
    """Our ``json_vqa`` records (JSON list or JSONL) as ``[{"question_id", "image_id", "question", "answers",
    "question_type", "answer_type"}]``, ids defaulted as the ``json_vqa`` builder does.

    Raises:
        ValueError: not a list of records, or a record without a question or answers.
    """
    data = _records(read_json_or_jsonl(path), path, "a list of question records")
    out, per_image = [], {}
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        image_id = _image_key(rec, where)
        j = per_image.get(image_id, 0)
        per_image[image_id] = j + 1
        raw = rec.get("answers", rec.get("answer"))
        answers = [a for a in _answer_list(raw, where) if a.strip()] if raw is not None else []
        if not answers:
            raise ValueError(f"{where}: record has no 'answers' (or 'answer')")
        qid = rec.get("question_id")
        out.append({
            "question_id": qid if qid is not None else f"{image_id}-q{j}",
            "image_id": image_id,
            "question": rec.get("question"),
            "answers": answers,
            "question_type": rec.get("question_type"),
            "answer_type": rec.get("answer_type"),
        })
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def read_gqa_questions(path) -> list[dict]:
    """A GQA question file as ``[{"question_id", "image_id", "question", "answers", "question_type",
    "answer_type", "semantic_type", "is_balanced"}]``.

    ``question_type`` is GQA's structural type (verify, query, choose, logical, compare), ``answer_type`` is
    ``open`` for ``query`` questions and ``binary`` otherwise (as GQA's ``eval.py``), ``answers`` is ``[answer]``
    or ``[]`` for a split without answers.

    Raises:
        ValueError: not a GQA question file.
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: not a GQA question file; expected {{question_id: {{'imageId', 'question', ...}}}}")
    out = []
    for qid, q in data.items():
        where = f"{path} question {qid!r}"
        if not isinstance(q, dict) or "imageId" not in q or "question" not in q:
            raise ValueError(f"{where}: a GQA question needs 'imageId' and 'question'")
        types = q.get("types") or {}
        structural = types.get("structural")
        answer = q.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{where}: 'answer' must be a string, got {answer!r}")
        out.append({
            "question_id": str(qid),
            "image_id": str(q["imageId"]),
            "question": str(q["question"]),
            "answers": [answer] if answer is not None else [],
            "question_type": structural,
            "answer_type": None if structural is None else ("open" if structural == GQA_OPEN_STRUCTURAL else "binary"),
            "semantic_type": types.get("semantic"),
            "is_balanced": q.get("isBalanced"),
        })
    return out


def read_vqa_results(path) -> dict[str, str]:
    """Predicted answers keyed by ``str(question_id)``.

    Accepts ``[{"question_id", "answer"}]``, GQA's ``[{"questionId", "prediction"}]`` and ``{question_id: answer}``.

    Raises:
        ValueError: another layout, or a question id listed twice.
    """
    data = read_json_or_jsonl(path)
    if isinstance(data, dict):
        return {str(k): _result_text(v, f"{path} [{k!r}]") for k, v in data.items()}
    out = {}
    for i, rec in enumerate(_records(data, path, "a list of results")):
        where = f"{path} record {i}"
        if "question_id" in rec and "answer" in rec:
            qid, answer = rec["question_id"], rec["answer"]
        elif "questionId" in rec and "prediction" in rec:
            qid, answer = rec["questionId"], rec["prediction"]
        else:
            raise ValueError(
                f"{where}: expected {{'question_id', 'answer'}} or {{'questionId', 'prediction'}}, got keys {sorted(rec)}"
            )
        key = str(qid)
        if key in out:
            raise ValueError(f"{where}: question_id {qid!r} has a second result")
        out[key] = _result_text(answer, where)
    return out


def _result_text(value, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: the answer must be a string, got {type(value).__name__} {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------------------------
def read_caption_references(path) -> dict[str, list[str]]:
    """Reference captions keyed by ``str(image_id)``, from a COCO caption file or our caption records.

    Records (``json_caption``, or LAVIS's Karpathy ``coco_karpathy_test.json``) are keyed by ``image_id`` when
    they have one, else by their ``image`` path, and repeated images are merged.

    Raises:
        ValueError: an unknown layout, or an image without references.
    """
    data = read_json_or_jsonl(path)
    refs: dict[str, list[str]] = {}
    if isinstance(data, dict):
        if not (isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)):
            raise ValueError(
                f"{path}: not a COCO caption file ({{'images', 'annotations'}}) nor a list of caption records"
            )
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path} annotations[{i}]: needs 'image_id' and a 'caption' string")
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        return _nonempty(refs, path)
    for i, rec in enumerate(_records(data, path, "a list of caption records")):
        where = f"{path} record {i}"
        raw = rec.get("captions", rec.get("caption"))
        if raw is None:
            raise ValueError(f"{where}: record has no 'caption' or 'captions' (keys: {sorted(rec)})")
        captions = raw if isinstance(raw, list) else [raw]
        if not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{where}: captions must be strings")
        refs.setdefault(_image_key(rec, where), []).extend(captions)
    return _nonempty(refs, path)


def read_caption_image_names(path) -> dict[str, str]:
    """Image file names by reference id (``str(image_id)``) where the annotation file gives both: a COCO file's
    ``images[].file_name`` (LAVIS's ``coco_karpathy_test_gt.json`` may have none), records with ``image_id`` and
    ``image``. The scoring CLI matches results keyed by image path through them.

    Raises:
        ValueError: neither a COCO caption file nor a list of records.
    """
    data = read_json_or_jsonl(path)
    names: dict[str, str] = {}
    if isinstance(data, dict):
        for img in data.get("images") or []:
            if isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str):
                names[str(img["id"])] = img["file_name"]
        return names
    for rec in _records(data, path, "a list of caption records"):
        if rec.get("image_id") is not None and isinstance(rec.get("image"), str):
            names[str(rec["image_id"])] = rec["image"]
    return names


def _nonempty(refs: dict, path) -> dict:
    if not refs:
        raise ValueError(f"{path}: no reference captions")
    return refs


def read_caption_results(path) -> dict[str, str]:
    """Predicted captions keyed by ``str(image_id)`` from ``[{"image_id", "caption"}]`` (or ``{image_id: caption}``).

    Raises:
        ValueError: another layout, or an image with two results (score one caption per image).
    """
    data = read_json_or_jsonl(path)
    if isinstance(data, dict):
        return {str(k): _result_text(v, f"{path} [{k!r}]") for k, v in data.items()}
    out = {}
    for i, rec in enumerate(_records(data, path, "a list of {'image_id', 'caption'} results")):
        where = f"{path} record {i}"
        if "image_id" not in rec or "caption" not in rec:
            raise ValueError(f"{where}: expected {{'image_id', 'caption'}}, got keys {sorted(rec)}")
        key = str(rec["image_id"])
        if key in out:
            raise ValueError(f"{where}: image_id {rec['image_id']!r} has a second caption; keep one per image")
        out[key] = _result_text(rec["caption"], where)
    return out
