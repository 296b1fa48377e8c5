"""VQA accuracy (VQAv2 / OK-VQA / VizWiz style), GQA exact match, and the leaderboard submission files.

**Official VQA accuracy** (the default, ``mode="official"``) is LAVIS's port of the official evaluation,
``lavis.common.vqa_tools.vqa_eval.VQAEval``, fed in-memory objects instead of VQAv2 files, so any data with
annotator answers can be scored. The port was checked against GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (py3 version, commit c4e6a0e): the contraction table, number
words, articles, punctuation list and both regular expressions are equal (``commaStrip`` is spelt ``(,)`` instead of
``(\\,)``, the same pattern), the scoring loop is the same statement for statement, and 200,000 random strings
normalise identically; ``tests/unit/test_vqa_metrics.py`` holds golden values produced by the official file.
So it is wrapped, not rewritten. What it does, quirks included (each has a golden test):

- prediction: ``\\n``/``\\t`` to spaces, strip, ``processPunctuation``, ``processDigitArticle`` (lower-case,
  number words to digits, drop a/an/the, restore contractions from a table whose keys are matched after
  lower-casing, so its capitalised keys such as ``Im`` never match);
- ``processPunctuation``: a mark next to a space, or any mark when the text holds digit-comma-digit, is deleted,
  otherwise it becomes a space (``t-shirt`` -> ``t shirt``); apostrophes and colons are kept; a period not followed
  by a digit is deleted (the regex's intended look-behind is a typo, so ``2.`` -> ``2``), and at most 32 of them,
  because ``re.UNICODE`` is passed as the ``count`` argument;
- ground truth: ``processPunctuation`` only when the answers are not all identical, never lower-cased or
  digit-normalised (VQAv2's released answers are already normalised; your own data should be too);
- score per question: the mean over the n leave-one-annotator-out subsets of ``min(1, matches / 3)``
  (n = 10 for VQAv2, so 1, 2, 3 and >= 4 agreeing annotators give 0.3, 0.6, 0.9 and 1.0); overall, per question
  type and per answer type: the mean x 100, rounded to 2 decimals.

**Simplified** (``mode="simplified"``): ``min(1, matches / 3)`` on the same normalised strings, without the
leave-one-out average. Several codebases report it; it is higher whenever 1 to 3 annotators agree (0.33, 0.67, 1.0
instead of 0.3, 0.6, 0.9) and is NOT comparable with published VQA accuracies. Only available by name; results
carry ``"mode": "simplified"`` and a warning.

**GQA** is not VQA accuracy: one answer per question, exact match (https://cs.stanford.edu/people/dorarad/gqa/
evaluate.html). As in LAVIS's ``GQATask`` with generated answers, the prediction goes through the same
``processPunctuation`` + ``processDigitArticle`` and the ground truth is used as given; so a predicted ``t-shirt``
becomes ``t shirt`` and misses a ``t-shirt`` answer, as it did for the paper's numbers. GQA's own script only
lower-cases the prediction.

No torch here; the LAVIS module used (``vqa_eval``) imports only ``re`` and ``sys``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

OFFICIAL = "official"
SIMPLIFIED = "simplified"
MODES = (OFFICIAL, SIMPLIFIED)
SIMPLIFIED_WARNING = (
    "simplified VQA accuracy min(#matches/3, 1) without the official 10-choose-9 leave-one-out average: "
    "higher than the official metric whenever 1-3 annotators agree; NOT comparable with published VQA accuracies"
)

__all__ = [
    "MODES",
    "OFFICIAL",
    "SIMPLIFIED",
    "gqa_accuracy",
    "normalize_answer",
    "vqa_accuracy",
    "write_gqa_submission",
    "write_vqa_submission",
]


class _InMemoryVQA:
    """The slice of LAVIS's `VQA` API that `VQAEval.evaluate` uses."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self):
        return list(self.qa)


def _vqa_eval_class():
    from lavis_ext import compat

    compat.apply()  # importing anything under lavis imports the whole package, which needs the shims
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    return VQAEval


_normaliser = None


def _tool():
    """One VQAEval used only for its normalisation methods (created lazily; they keep no state that matters:
    ``manualMap.setdefault`` adds each seen word mapped to itself)."""
    global _normaliser
    if _normaliser is None:
        _normaliser = _vqa_eval_class()()
    return _normaliser


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer (exactly what ``VQAEval.evaluate`` does to it).

    Args:
        answer: the raw predicted answer.

    Returns:
        The normalised string (lower-cased, punctuation, number words, articles and contractions processed).

    Raises:
        TypeError: ``answer`` is not a string.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__} {answer!r}")
    tool = _tool()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return tool.processDigitArticle(tool.processPunctuation(text))


# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ----------------------------------------------------------------------------------------------------------------
def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    ground_truths: Mapping[Hashable, object],
    *,
    mode: str = OFFICIAL,
    per_question: bool = False,
) -> dict:
    """Score open-ended answers with the VQA accuracy.

    Args:
        predictions: ``{question_id: answer}``; ids of any hashable type, equal to the ground truth's.
        ground_truths: ``{question_id: {"answers": [...], "question_type": str, "answer_type": str}}`` or
            ``{question_id: [answers]}``. Answers are strings or VQAv2 answer dicts ``{"answer": ...}``; VQAv2 has
            ten per question, and the leave-one-out average runs over however many are given. Missing types
            count as ``"all"``.
        mode: ``"official"`` (default) or ``"simplified"`` (non-comparable, see the module docstring).
        per_question: also return ``"per_question": {question_id: accuracy}`` (x 100, 2 decimals).

    Returns:
        ``{"overall", "per_question_type", "per_answer_type", "num_questions", "mode"}`` (accuracies x 100,
        rounded to 2 decimals as the official code does); simplified results add ``"warning"``.

    Raises:
        ValueError: unknown mode, id sets that differ (names examples), a question without answers, or no
            questions at all.
        TypeError: a prediction or answer that is not a string.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; valid: {', '.join(MODES)} (official is the default)")
    gts = _ground_truth_records(predictions, ground_truths)
    res = {qid: {"question_id": qid, "answer": _prediction(predictions[qid], qid)} for qid in gts}
    if mode == OFFICIAL:
        evaluator = _vqa_eval_class()(_InMemoryVQA(gts), _InMemoryVQA(res), n=2)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress bar
            evaluator.evaluate()
        acc = evaluator.accuracy
        out = {
            "overall": acc["overall"],
            "per_question_type": dict(acc["perQuestionType"]),
            "per_answer_type": dict(acc["perAnswerType"]),
        }
        per_q = evaluator.evalQA
    else:
        out, per_q = _simplified(gts, res)
    out["num_questions"] = len(gts)
    out["mode"] = mode
    if mode == SIMPLIFIED:
        out["warning"] = SIMPLIFIED_WARNING
    if per_question:
        out["per_question"] = dict(per_q)
    return out


def _prediction(value, qid) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TypeError(f"prediction for question {qid!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _check_ids(predictions: Mapping, ground_truths: Mapping) -> None:
    if not isinstance(predictions, Mapping) or not isinstance(ground_truths, Mapping):
        raise TypeError("predictions and ground_truths must be dicts keyed by question id")
    if not ground_truths:
        raise ValueError("ground_truths is empty: nothing to score")
    missing = [q for q in ground_truths if q not in predictions]
    extra = [q for q in predictions if q not in ground_truths]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question(s) have no prediction, e.g. {missing[:5]!r}")
        if extra:
            parts.append(f"{len(extra)} predicted id(s) are not in the ground truth, e.g. {extra[:5]!r}")
        raise ValueError(
            "prediction and ground-truth question ids differ: " + "; ".join(parts)
            + " (ids must also have the same type: 1 and '1' differ)"
        )


def _answer_strings(raw, qid) -> list[str]:
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise TypeError(f"answers of question {qid!r} must be a list, got {type(raw).__name__} {raw!r}")
    answers = []
    for item in raw:
        if isinstance(item, Mapping) and "answer" in item:
            item = item["answer"]
        if not isinstance(item, str):
            raise TypeError(f"answers of question {qid!r} must be strings, got {type(item).__name__} {item!r}")
        answers.append(item)
    if not answers:
        raise ValueError(f"question {qid!r} has no ground-truth answers")
    return answers


def _ground_truth_records(predictions: Mapping, ground_truths: Mapping) -> dict:
    """Fresh VQAv2-style records (VQAEval rewrites the answers in place, so the caller's data stay untouched)."""
    _check_ids(predictions, ground_truths)
    gts = {}
    for qid, gt in ground_truths.items():
        gt = gt if isinstance(gt, Mapping) else {"answers": gt}
        gts[qid] = {
            "question_id": qid,
            # answer_id keeps equal answers distinct in the leave-one-out comparison (`item != gtAnsDatum`),
            # as VQAv2's answer dicts do.
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(_answer_strings(gt.get("answers"), qid))],
            "question_type": str(gt.get("question_type") or "all"),
            "answer_type": str(gt.get("answer_type") or "all"),
        }
    return gts


def _simplified(gts: dict, res: dict) -> tuple[dict, dict]:
    tool = _tool()
    per_q, by_qtype, by_atype, all_acc = {}, defaultdict(list), defaultdict(list), []
    for qid, gt in gts.items():
        pred = normalize_answer(res[qid]["answer"])
        answers = [a["answer"] for a in gt["answers"]]
        if len(set(answers)) > 1:  # the official ground-truth rule, so that only the formula differs
            answers = [tool.processPunctuation(a) for a in answers]
        acc = min(1.0, sum(a == pred for a in answers) / 3)
        all_acc.append(acc)
        by_qtype[gt["question_type"]].append(acc)
        by_atype[gt["answer_type"]].append(acc)
        per_q[qid] = round(100 * acc, 2)

    def mean(values):
        return round(100 * float(sum(values)) / len(values), 2)

    return {
        "overall": mean(all_acc),
        "per_question_type": {k: mean(v) for k, v in by_qtype.items()},
        "per_answer_type": {k: mean(v) for k, v in by_atype.items()},
    }, per_q


# ----------------------------------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------------------------------
def gqa_accuracy(
    predictions: Mapping[Hashable, str],
    ground_truths: Mapping[Hashable, object],
    *,
    per_question: bool = False,
) -> dict:
    """GQA accuracy: exact match of the normalised prediction with the one ground-truth answer.

    Args:
        predictions: ``{question_id: answer}``.
        ground_truths: ``{question_id: answer}`` or ``{question_id: {"answer": str, "question_type": str,
            "answer_type": str, "semantic_type": str}}`` (types optional; :func:`lavis_ext.evaluation.files.
            read_gqa_questions` gives GQA's structural type, ``open``/``binary`` and semantic type). ``"answers"``
            (a list) is accepted too when all its entries are equal, e.g. one answer repeated ten times.
        per_question: also return ``"per_question": {question_id: 0 or 100}``.

    Returns:
        ``{"overall", "correct", "num_questions", "per_question_type", "per_answer_type"}`` and
        ``"per_semantic_type"`` when given; accuracies x 100, not rounded.

    Raises:
        ValueError: id sets that differ, a question without an answer or with several different answers.
        TypeError: a prediction or answer that is not a string.
    """
    _check_ids(predictions, ground_truths)
    groups = {"question_type": defaultdict(list), "answer_type": defaultdict(list), "semantic_type": defaultdict(list)}
    per_q, hits = {}, []
    for qid, gt in ground_truths.items():
        record = gt if isinstance(gt, Mapping) else {"answer": gt}
        answer = _gqa_answer(record, qid)
        hit = normalize_answer(_prediction(predictions[qid], qid)) == answer
        hits.append(hit)
        per_q[qid] = 100.0 if hit else 0.0
        for key, table in groups.items():
            if record.get(key) is not None:
                table[str(record[key])].append(hit)

    def pct(values):
        return 100.0 * sum(values) / len(values)

    out = {"overall": pct(hits), "correct": int(sum(hits)), "num_questions": len(hits)}
    for key, table in groups.items():
        if table or key != "semantic_type":
            out[f"per_{key}"] = {k: pct(v) for k, v in table.items()}
    if per_question:
        out["per_question"] = per_q
    return out


def _gqa_answer(record: Mapping, qid) -> str:
    if "answer" in record and record["answer"] is not None:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise TypeError(f"answer of question {qid!r} must be a string, got {type(answer).__name__} {answer!r}")
        return answer
    answers = set(_answer_strings(record.get("answers") or [], qid))
    if len(answers) != 1:
        raise ValueError(
            f"question {qid!r} has {len(answers)} different answers {sorted(answers)[:5]!r}; GQA is scored against "
            "exactly one answer (use vqa_accuracy for annotator answers)"
        )
    return answers.pop()


# ----------------------------------------------------------------------------------------------------------------
# leaderboard files
# ----------------------------------------------------------------------------------------------------------------
def write_vqa_submission(predictions: Mapping[Hashable, str], path: str | os.PathLike) -> Path:
    """Write a VQAv2 EvalAI submission: ``[{"question_id": int, "answer": str}]``, sorted by question id.

    Answers are written as predicted: EvalAI applies the official normalisation itself.

    Args:
        predictions: ``{question_id: answer}``; ids are ints or strings of digits (VQAv2's question ids).
        path: the JSON file to write (parent folders are created).

    Returns:
        The path written.

    Raises:
        ValueError: an id is not an integer, or there are no predictions.
        TypeError: an answer is not a string.
    """
    if not predictions:
        raise ValueError("no predictions to submit")
    rows = []
    for qid, answer in predictions.items():
        try:
            int_id = int(qid)
            if isinstance(qid, float) or (isinstance(qid, str) and str(int_id) != qid.strip()):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(
                f"question id {qid!r} is not an integer; EvalAI's VQAv2 submissions need VQAv2's integer "
                "question ids (build the split from the VQAv2 question file, builder vqa_files)"
            ) from None
        rows.append({"question_id": int_id, "answer": _prediction(answer, qid)})
    rows.sort(key=lambda r: r["question_id"])
    return _write_json(path, rows)


def write_gqa_submission(predictions: Mapping[Hashable, str], path: str | os.PathLike) -> Path:
    """Write a GQA submission: ``[{"questionId": str, "prediction": str}]``, predictions normalised as scored.

    Raises:
        ValueError: there are no predictions.
        TypeError: an answer is not a string.
    """
    if not predictions:
        raise ValueError("no predictions to submit")
    rows = [{"questionId": str(qid), "prediction": normalize_answer(_prediction(a, qid))} for qid, a in predictions.items()]
    return _write_json(path, rows)


def _write_json(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return path

