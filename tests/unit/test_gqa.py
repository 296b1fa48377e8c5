"""GQA: exact match of the normalised prediction against the one answer (LAVIS's GQATask rule for generated
answers), per structural / answer / semantic type; gqa_ext's scoring and submission file. Pure Python."""
from __future__ import annotations

import json

import pytest
from lavis.common.registry import registry

from lavis_ext.evaluation import gqa_accuracy, write_gqa_submission

# (prediction, ground-truth answer, hit?) -- the answer is never normalised, the prediction always is
GQA_CASES = [
    ("yes", "yes", True),
    ("Yes.", "yes", True),  # lower-cased, period dropped
    ("  no\n", "no", True),
    ("the left", "left", True),  # article dropped
    ("a man", "man", True),
    ("Left side", "left", False),  # no partial credit
    ("right", "left", False),
    ("t-shirt", "t-shirt", False),  # the hyphen becomes a space in the prediction only (LAVIS's rule, kept)
    ("t shirt", "t-shirt", False),
    ("two", "2", True),  # number words become digits ...
    ("two", "two", False),  # ... so a spelt-out answer can never be matched
    ("dont know", "don't know", True),  # contraction restored
    ("", "yes", False),
]


@pytest.mark.parametrize("prediction, answer, hit", GQA_CASES)
def test_exact_match_after_prediction_normalisation(prediction, answer, hit):
    r = gqa_accuracy({"q": prediction}, {"q": answer})
    assert r["overall"] == (100.0 if hit else 0.0) and r["correct"] == int(hit)


def test_same_rule_as_lavis_gqa_task():
    """LAVIS 1.0.2 GQATask._report_metrics with inference_method='generate', applied by hand."""
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    tool = VQAEval()
    for prediction, answer, hit in GQA_CASES:
        lavis_hit = tool.processDigitArticle(tool.processPunctuation(prediction)) == answer
        assert lavis_hit == hit, prediction


def test_breakdown_by_type_and_overall():
    gts = {
        "1": {"answer": "yes", "question_type": "verify", "answer_type": "binary", "semantic_type": "attr"},
        "2": {"answer": "left", "question_type": "query", "answer_type": "open", "semantic_type": "rel"},
        "3": {"answer": "dog", "question_type": "query", "answer_type": "open", "semantic_type": "obj"},
        "4": {"answer": "no", "question_type": "logical", "answer_type": "binary", "semantic_type": "obj"},
    }
    preds = {"1": "Yes", "2": "right", "3": "a dog", "4": "yes"}
    r = gqa_accuracy(preds, gts, per_question=True)
    assert r["overall"] == 50.0 and r["correct"] == 2 and r["num_questions"] == 4
    assert r["per_answer_type"] == {"binary": 50.0, "open": 50.0}
    assert r["per_question_type"] == {"verify": 100.0, "query": 50.0, "logical": 0.0}
    assert r["per_semantic_type"] == {"attr": 100.0, "rel": 0.0, "obj": 50.0}
    assert r["per_question"] == {"1": 100.0, "2": 0.0, "3": 100.0, "4": 0.0}


def test_overall_is_not_rounded():
    preds = {i: "yes" if i < 1 else "no" for i in range(3)}
    r = gqa_accuracy(preds, {i: "yes" for i in range(3)})
    assert r["overall"] == 100.0 / 3


def test_answers_list_must_hold_one_answer():
    assert gqa_accuracy({1: "cat"}, {1: {"answers": ["cat"] * 10}})["overall"] == 100.0
    with pytest.raises(ValueError, match="2 different answers"):
        gqa_accuracy({1: "cat"}, {1: {"answers": ["cat", "dog"]}})
    with pytest.raises(ValueError, match="no ground-truth answers"):
        gqa_accuracy({1: "cat"}, {1: {"answers": []}})
    with pytest.raises(ValueError, match="have no prediction"):
        gqa_accuracy({}, {1: "cat"})


def test_gqa_submission_file(tmp_path):
    path = write_gqa_submission({"201": "The Left.", 202: "yes"}, tmp_path / "gqa.json")
    assert json.loads(path.read_text()) == [{"questionId": "201", "prediction": "left"},
                                            {"questionId": "202", "prediction": "yes"}]


@pytest.fixture()
def gqa_task(tmp_path, monkeypatch):
    (tmp_path / "result").mkdir()
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path / "result"))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    return registry.get_task_class("gqa_ext")(num_beams=1, max_len=5, min_len=1, evaluate=True)


def _rows(answers_of):
    return [
        {"question_id": "1", "answer": "Yes", "answers": answers_of(["yes"]), "question_type": "verify", "answer_type": "binary"},
        {"question_id": "2", "answer": "the cat", "answers": answers_of(["cat"]), "question_type": "query", "answer_type": "open"},
        {"question_id": "3", "answer": "blue", "answers": answers_of(["red"]), "question_type": "query", "answer_type": "open"},
        {"question_id": "1", "answer": "duplicate from another rank", "answers": answers_of(["yes"])},
    ]


def test_gqa_ext_scores_merged_results(gqa_task, tmp_path):
    metrics = gqa_task.after_evaluation(_rows(lambda a: a), split_name="val", epoch=0)
    assert metrics["agg_metrics"] == pytest.approx(200 / 3) and metrics["acc_open"] == 50.0 and metrics["acc_binary"] == 100.0
    record = json.loads((tmp_path / "val_epoch0_metrics.json").read_text())
    assert record["metrics"]["per_question_type"] == {"verify": 100.0, "query": 50.0}
    results = json.loads((tmp_path / "result" / "val_gqa_result_epoch0.json").read_text())
    assert results == [{"question_id": "1", "answer": "Yes"}, {"question_id": "2", "answer": "the cat"},
                       {"question_id": "3", "answer": "blue"}]


def test_gqa_ext_writes_a_submission_for_a_split_without_answers(gqa_task, tmp_path):
    metrics = gqa_task.after_evaluation(_rows(lambda a: []), split_name="challenge", epoch="best")
    assert metrics["agg_metrics"] == 0.0
    rows = json.loads((tmp_path / "result" / "challenge_gqa_submission.json").read_text())
    assert rows == [{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "cat"},
                    {"questionId": "3", "prediction": "blue"}]


def test_a_split_half_answered_is_refused(gqa_task):
    rows = _rows(lambda a: a)
    rows[2]["answers"] = []
    with pytest.raises(ValueError, match="1 of 3 val questions have no ground-truth answers"):
        gqa_task.after_evaluation(rows, split_name="val", epoch=0)
