"""VQA accuracy: golden values produced by the official evaluation (GT-Vision-Lab/VQA vqaEval.py, py3 version
c4e6a0e) on hand-built cases, one per normalisation rule and per agreement count 0..10; the simplified mode; the
EvalAI submission writer. Pure Python, no Java, milliseconds."""
from __future__ import annotations

import copy
import json
import random

import pytest

from lavis_ext.evaluation import normalize_answer, vqa_accuracy, write_vqa_submission
from lavis_ext.evaluation import vqa as V

# prediction -> what the official code turns it into (run on the official vqaEval.py)
OFFICIAL_NORMALISATION = {
    # lower-case; "\n"/"\t" to spaces and strip; runs of spaces collapse
    "Yes": "yes",
    "  yes\n": "yes",
    "yes\tno": "yes no",
    "multiple   spaces": "multiple spaces",
    # number words to digits (after lower-casing), only zero..ten and none
    "Two": "2",
    "none": "0",
    "ten dogs": "10 dogs",
    "eleven": "eleven",
    # articles dropped (also when a split leaves one behind)
    "a dog": "dog",
    "The Cat": "cat",
    "an apple": "apple",
    "the": "",
    "a/b": "b",
    "N/A": "n",
    # contractions restored from the table; keys are matched after lower-casing, so "Im" never matches;
    # the table maps "somebody'd" the wrong way round
    "dont": "don't",
    "isnt": "isn't",
    "Im": "im",
    "somebody'd": "somebodyd",
    # punctuation: deleted next to a space, else replaced by a space ...
    "t-shirt": "t shirt",
    "yes, sir": "yes sir",
    "red,blue": "red blue",
    "(left)": "left",
    "what?!": "what",
    "a / b": "b",
    "@home": "home",
    "hello-world, 2": "hello world 2",
    # ... and every mark deleted when the text holds digit,comma,digit
    "100,978": "100978",
    "1,000-ish": "1000ish",
    # apostrophe, colon, '#', '$' and non-ASCII letters are kept
    "girl's": "girl's",
    "2:50": "2:50",
    "#1": "#1",
    "$5": "$5",
    "café": "café",
    # periods: removed unless followed by a digit; the intended look-behind is a typo, so "2." loses its period
    "yes.": "yes",
    "3.5": "3.5",
    "2.": "2",
    ".5": ".5",
    "U.S.A.": "usa",
    "x.5.5.5": "x.5.5.5",
    # re.UNICODE passed as `count`: at most 32 periods are removed
    "a" + "." * 40: "a" + "." * 8,
}


@pytest.mark.parametrize("raw, expected", list(OFFICIAL_NORMALISATION.items()))
def test_prediction_normalisation_matches_the_official_code(raw, expected):
    assert normalize_answer(raw) == expected


def _cases() -> dict:
    """name -> (ten or five annotator answers, prediction, question_type, answer_type)."""
    cases = {}
    for k in range(11):  # k of the 10 annotators said "2"; the prediction "Two" normalises to "2"
        cases[f"agree{k}"] = (["2"] * k + ["many"] * (10 - k), "Two", "how many", "number")
    cases["gt_unanimous_kept_raw"] = (["red-ish"] * 10, "red-ish", "what color", "other")
    cases["gt_processed_when_mixed"] = (["red-ish"] * 9 + ["pink"], "red-ish", "what color", "other")
    cases["gt_never_digit_normalised"] = (["two"] * 10, "two", "how many", "number")
    cases["gt_never_lowercased"] = (["Yes"] * 10, "yes", "is the", "yes/no")
    cases["pred_normalised"] = (["yes"] * 3 + ["no"] * 7, "  Yes!\n", "is the", "yes/no")
    cases["five_answers"] = (["dog"] * 2 + ["cat"] * 3, "dog", "what is", "other")
    return cases


# evalQA and accuracy of the official vqaEval.py on _cases() (question ids 1000.. in this order)
OFFICIAL_PER_QUESTION = {
    "agree0": 0.0, "agree1": 30.0, "agree2": 60.0, "agree3": 90.0, "agree4": 100.0, "agree5": 100.0,
    "agree6": 100.0, "agree7": 100.0, "agree8": 100.0, "agree9": 100.0, "agree10": 100.0,
    "gt_unanimous_kept_raw": 0.0, "gt_processed_when_mixed": 100.0, "gt_never_digit_normalised": 0.0,
    "gt_never_lowercased": 0.0, "pred_normalised": 90.0, "five_answers": 53.33,
}
OFFICIAL_ACCURACY = {
    "overall": 66.08,
    "perQuestionType": {"how many": 73.33, "what color": 50.0, "is the": 45.0, "what is": 53.33},
    "perAnswerType": {"number": 73.33, "other": 51.11, "yes/no": 45.0},
}


def _inputs(cases: dict, id_of=lambda i, name: 1000 + i):
    preds, gts, names = {}, {}, {}
    for i, (name, (answers, pred, qtype, atype)) in enumerate(cases.items()):
        qid = id_of(i, name)
        names[qid] = name
        preds[qid] = pred
        gts[qid] = {"answers": answers, "question_type": qtype, "answer_type": atype}
    return preds, gts, names


def test_official_accuracy_equals_the_official_code_on_every_case():
    preds, gts, names = _inputs(_cases())
    result = vqa_accuracy(preds, gts, per_question=True)
    assert {names[q]: v for q, v in result["per_question"].items()} == OFFICIAL_PER_QUESTION
    assert result["overall"] == OFFICIAL_ACCURACY["overall"]
    assert result["per_question_type"] == OFFICIAL_ACCURACY["perQuestionType"]
    assert result["per_answer_type"] == OFFICIAL_ACCURACY["perAnswerType"]
    assert result["mode"] == "official" and result["num_questions"] == len(preds) and "warning" not in result


# k of 10 annotators agree: official = mean over the 10 leave-one-out subsets; simplified = min(k/3, 1)
OFFICIAL_BY_K = [0.0, 30.0, 60.0, 90.0] + [100.0] * 7
SIMPLIFIED_BY_K = [0.0, 33.33, 66.67] + [100.0] * 8


@pytest.mark.parametrize("k", range(11))
def test_each_agreement_count_official_and_simplified(k):
    preds, gts, _ = _inputs({"q": _cases()[f"agree{k}"]})
    assert vqa_accuracy(preds, gts)["overall"] == OFFICIAL_BY_K[k]
    assert vqa_accuracy(preds, gts, mode="simplified")["overall"] == SIMPLIFIED_BY_K[k]


def test_ids_of_any_type_and_vqav2_answer_dicts_give_the_same_result():
    preds, gts, _ = _inputs(_cases(), id_of=lambda i, name: f"q-{name}")
    as_dicts = {q: {**g, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                     for j, a in enumerate(g["answers"])]} for q, g in gts.items()}
    assert vqa_accuracy(preds, gts)["overall"] == vqa_accuracy(preds, as_dicts)["overall"] == OFFICIAL_ACCURACY["overall"]
    # a bare list of answers works too; missing types count as "all"
    r = vqa_accuracy({7: "yes"}, {7: ["yes"] * 10})
    assert r["overall"] == 100.0 and r["per_answer_type"] == {"all": 100.0}


def test_ground_truth_is_not_modified():
    preds, gts, _ = _inputs(_cases())
    before = copy.deepcopy(gts)
    vqa_accuracy(preds, gts)
    vqa_accuracy(preds, gts, mode="simplified")
    assert gts == before


def _leave_one_out(pred: str, answers: list[str]) -> float:
    """The spec's formula, written independently: mean over i of min(1, #{j != i: gt_j == pred} / 3)."""
    total = 0.0
    for i in range(len(answers)):
        total += min(1, float(sum(1 for j, a in enumerate(answers) if j != i and a == pred)) / 3)
    return total / len(answers)


def test_random_answers_match_the_leave_one_out_formula():
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "3", "red", "dog", "blue sky"]
    preds, gts, expected = {}, {}, {}
    for q in range(300):
        answers = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        preds[q], gts[q] = pred, answers
        expected[q] = round(100 * _leave_one_out(pred, answers), 2)  # normalisation is identity on this vocab
    result = vqa_accuracy(preds, gts, per_question=True)
    assert result["per_question"] == expected


def test_simplified_mode_is_labelled_and_only_by_name():
    preds, gts, _ = _inputs(_cases())
    r = vqa_accuracy(preds, gts, mode="simplified")
    assert r["mode"] == "simplified" and "NOT comparable" in r["warning"]
    assert r["overall"] > OFFICIAL_ACCURACY["overall"]
    with pytest.raises(ValueError, match="official is the default"):
        vqa_accuracy(preds, gts, mode="lenient")


def test_mismatched_ids_and_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"have no prediction, e\.g\. \[2\]"):
        vqa_accuracy({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match=r"not in the ground truth, e\.g\. \['1'\]"):
        vqa_accuracy({1: "a", "1": "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_accuracy({1: "a"}, {1: []})
    with pytest.raises(TypeError, match="must be a string"):
        vqa_accuracy({1: None}, {1: ["a"]})
    with pytest.raises(TypeError, match="must be strings"):
        vqa_accuracy({1: "a"}, {1: ["a", 3]})
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy({}, {})


def test_evalai_submission_file(tmp_path):
    path = write_vqa_submission({"262148002": "yes", 262148000: "Two dogs", "5": "a"}, tmp_path / "sub" / "s.json")
    assert json.loads(path.read_text()) == [
        {"question_id": 5, "answer": "a"},
        {"question_id": 262148000, "answer": "Two dogs"},  # raw: EvalAI normalises itself
        {"question_id": 262148002, "answer": "yes"},
    ]
    with pytest.raises(ValueError, match="not an integer"):
        write_vqa_submission({"img1.jpg-q0": "yes"}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="no predictions"):
        write_vqa_submission({}, tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists()


def test_lavis_port_is_the_one_wrapped():
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    assert isinstance(V._tool(), VQAEval)


@pytest.fixture()
def vqa_task(tmp_path, monkeypatch):
    from lavis.common.registry import registry

    (tmp_path / "result").mkdir()
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path / "result"))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    return registry.get_task_class("vqa_ext")(num_beams=1, max_len=5, min_len=1, evaluate=True)


def test_vqa_ext_scores_with_the_official_metric_and_keeps_the_first_duplicate(vqa_task, tmp_path):
    rows = [{"question_id": str(1000 + i), "answer": pred, "answers": answers, "question_type": qt, "answer_type": at}
            for i, (answers, pred, qt, at) in enumerate(_cases().values())]
    rows.append({**rows[0], "answer": "a duplicate from another rank"})
    metrics = vqa_task.after_evaluation(rows, split_name="val", epoch=1)
    assert metrics["agg_metrics"] == OFFICIAL_ACCURACY["overall"]
    assert metrics["acc_number"] == OFFICIAL_ACCURACY["perAnswerType"]["number"]
    record = json.loads((tmp_path / "val_epoch1_metrics.json").read_text())
    assert record["metrics"]["per_question_type"] == OFFICIAL_ACCURACY["perQuestionType"]
    saved = json.loads((tmp_path / "result" / "val_vqa_result_epoch1.json").read_text())
    assert len(saved) == len(rows) - 1 and saved[0] == {"question_id": "1000", "answer": "Two"}


def test_vqa_ext_writes_the_evalai_submission_for_a_split_without_answers(vqa_task, tmp_path):
    rows = [{"question_id": "262148000", "answer": "Yes", "answers": []},
            {"question_id": "5", "answer": "2", "answers": []}]
    metrics = vqa_task.after_evaluation(rows, split_name="test", epoch="best")
    path = tmp_path / "result" / "test_evalai_submission.json"
    assert metrics == {"agg_metrics": 0.0, "submission_file": str(path)}
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "2"},
                                            {"question_id": 262148000, "answer": "Yes"}]
