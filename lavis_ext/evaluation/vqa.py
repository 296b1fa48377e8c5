"""VQA accuracy through LAVIS's port of the official VQA evaluation (`lavis.common.vqa_tools.vqa_eval`).

The official metric averages `min(#matching annotators / 3, 1)` over the ten leave-one-annotator-out
subsets, after normalising punctuation, number words, articles and contractions. We feed LAVIS's
`VQAEval` in-memory objects with the two attributes it reads (`qa`, `getQuesIds`) instead of
VQAv2 files, so any data with ten annotator answers can be scored.
"""
from __future__ import annotations

import contextlib
import io
from typing import Mapping


class _InMemoryVQA:
    """The slice of LAVIS's `VQA` API that `VQAEval.evaluate` uses."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self):
        return list(self.qa)


def vqa_accuracy(predictions: Mapping, ground_truths: Mapping) -> dict:
    """Score open-ended answers.

    Args:
        predictions: ``{question_id: answer}``.
        ground_truths: ``{question_id: {"answers": [ten strings], "question_type": str, "answer_type": str}}``
            (or ``{question_id: [ten strings]}``).
    Returns:
        ``{"overall": %, "per_question_type": {...}, "per_answer_type": {...}}`` (percentages, 2 decimals).
    Raises:
        ValueError: when the id sets differ or a question has no answers.
    """
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    missing = set(ground_truths) - set(predictions)
    extra = set(predictions) - set(ground_truths)
    if missing or extra:
        raise ValueError(
            f"prediction/ground-truth ids differ: missing predictions for {sorted(map(str, missing))[:5]}, "
            f"unknown ids {sorted(map(str, extra))[:5]}"
        )
    gts, res = {}, {}
    for qid, gt in ground_truths.items():
        if not isinstance(gt, Mapping):
            gt = {"answers": list(gt)}
        if not gt["answers"]:
            raise ValueError(f"question {qid!r} has no ground-truth answers")
        gts[qid] = {
            "question_id": qid,
            # answer_id keeps equal answers distinct in the leave-one-out comparison (`item != gtAnsDatum`).
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt["answers"])],
            "question_type": gt.get("question_type", "all"),
            "answer_type": gt.get("answer_type", "all"),
        }
        res[qid] = {"question_id": qid, "answer": str(predictions[qid])}
    evaluator = VQAEval(_InMemoryVQA(gts), _InMemoryVQA(res), n=2)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress bar
        evaluator.evaluate()
    return {
        "overall": evaluator.accuracy["overall"],
        "per_question_type": dict(evaluator.accuracy["perQuestionType"]),
        "per_answer_type": dict(evaluator.accuracy["perAnswerType"]),
    }
