"""The scoring CLI (`python -m lavis_ext.evaluation.score`, `lavis-ext score`): every accepted file format, the
metrics file, and errors that name the problem. Caption runs skip METEOR (its JVM takes ~7 s) except where noted."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lavis_ext import cli
from lavis_ext.evaluation import evaluate_captions, gqa_accuracy, vqa_accuracy
from lavis_ext.evaluation.score import main

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed for PTB tokenisation")

REFS = {
    391895: ["A man riding a horse on the beach.", "Someone rides a brown horse.", "a man's horse, running"],
    522418: ["Two dogs play with a red ball.", "dogs playing"],
    184613: ["A plate of food on a table.", "a meal on a wooden table", "food -- on a plate"],
}
PREDS = {391895: "a man riding a horse", 522418: "two dogs playing with a ball", 184613: "a plate with food"}
FAST = ["BLEU", "ROUGE_L", "CIDEr"]


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _coco(tmp_path: Path) -> Path:
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in REFS]
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate((i, c) for i, cs in REFS.items() for c in cs)]
    return _write(tmp_path / "captions_val2014.json", {"images": images, "annotations": anns, "type": "captions"})


@needs_java
def test_captions_from_coco_files_equal_evaluate_captions(tmp_path, capsys):
    results = _write(tmp_path / "res.json", [{"image_id": i, "caption": c} for i, c in PREDS.items()])
    assert main(["captions", "--results", str(results), "--annotations", str(_coco(tmp_path)), "--metrics", *FAST]) == 0
    report = json.loads((tmp_path / "res_metrics.json").read_text())  # the default --out
    expected = evaluate_captions(PREDS, REFS, metrics=FAST)
    expected.pop("skipped")
    assert report["metrics"] == expected and report["num_images"] == 3 and report["task"] == "captions"
    out = capsys.readouterr().out
    assert f"CIDEr={expected['CIDEr']:.4f}" in out and "metrics written to" in out


@needs_java
def test_captions_from_our_jsonl_records_through_lavis_ext_score(tmp_path):
    """Karpathy-style records keyed by image path (as captioning_ext's results are), repeated images merged."""
    lines = [{"image": f"val2014/{i}.jpg", "caption": c} for i, cs in REFS.items() for c in cs]
    ann = tmp_path / "test.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in lines))
    results = _write(tmp_path / "res.json", [{"image_id": f"val2014/{i}.jpg", "caption": c} for i, c in PREDS.items()])
    out = tmp_path / "m" / "metrics.json"
    assert cli.main(["score", "captions", "--results", str(results), "--annotations", str(ann), "--out", str(out),
                     "--metrics", "CIDEr"]) == 0
    assert json.loads(out.read_text())["metrics"]["CIDEr"] == evaluate_captions(PREDS, REFS, metrics=["CIDEr"])["CIDEr"]


def _karpathy_gt(tmp_path: Path) -> Path:
    """LAVIS's coco_karpathy_test_gt.json: COCO format, integer ids, images without file names."""
    pairs = [(i, c) for i, cs in REFS.items() for c in cs]
    anns = [{"image_id": i, "caption": c, "id": n} for n, (i, c) in enumerate(pairs)]
    return _write(tmp_path / "coco_karpathy_test_gt.json", {"annotations": anns, "images": [{"id": i} for i in REFS]})


def _karpathy_path(image_id: int) -> str:
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


@needs_java
def test_karpathy_path_results_score_against_the_karpathy_gt_file(tmp_path, capsys):
    """captioning_ext on LAVIS's coco_karpathy_test.json (json_caption) keys results by image path; the Karpathy
    ground truth keys images by COCO id: the number that ends the path."""
    results = _write(tmp_path / "res.json", [{"image_id": _karpathy_path(i), "caption": c} for i, c in PREDS.items()])
    assert main(["captions", "--results", str(results), "--annotations", str(_karpathy_gt(tmp_path)),
                 "--metrics", "CIDEr"]) == 0
    report = json.loads((tmp_path / "res_metrics.json").read_text())
    assert report["metrics"]["CIDEr"] == evaluate_captions(PREDS, REFS, metrics=["CIDEr"])["CIDEr"]
    assert report["ids_matched_by_file_name"] == 3
    assert "3 result ids matched to annotation ids by image file name" in capsys.readouterr().out


def test_karpathy_path_results_that_do_not_match_are_named(tmp_path, capsys):
    rows = [{"image_id": _karpathy_path(i), "caption": c} for i, c in PREDS.items()]
    rows[2]["image_id"] = "val2014/not_coco.jpg"
    results = _write(tmp_path / "res.json", rows)
    assert main(["captions", "--results", str(results), "--annotations", str(_karpathy_gt(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "1 predicted id(s) have no references, e.g. ['val2014/not_coco.jpg']" in err
    assert "have references but no prediction, e.g. ['184613']" in err
    rows[2]["image_id"] = 391895  # LAVIS's own id for the first image: two results for it
    _write(tmp_path / "res.json", rows)
    assert main(["captions", "--results", str(results), "--annotations", str(_karpathy_gt(tmp_path))]) == 1
    assert "both name image '391895'" in capsys.readouterr().err


def test_caption_ids_match_through_file_names_both_ways():
    from lavis_ext.evaluation.score import match_caption_ids

    refs = {str(i): cs for i, cs in REFS.items()}
    names = {str(i): f"COCO_val2014_{i:012d}.jpg" for i in REFS}  # captions_val2014.json's file names
    preds = {f"COCO_val2014_{i:012d}.jpg": c for i, c in PREDS.items()}
    assert match_caption_ids(preds, refs, names) == ({str(i): c for i, c in PREDS.items()}, 3)
    # LAVIS's integer results against the Karpathy records (keyed by path)
    by_path = {_karpathy_path(i): cs for i, cs in REFS.items()}
    assert match_caption_ids({str(i): c for i, c in PREDS.items()}, by_path, {}) == (
        {_karpathy_path(i): c for i, c in PREDS.items()}, 3)
    # ids that already match are left alone
    assert match_caption_ids({"391895": "x"}, refs, names) == ({"391895": "x"}, 0)


def test_captions_without_java_fail_with_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    results = _write(tmp_path / "res.json", [{"image_id": i, "caption": c} for i, c in PREDS.items()])
    assert main(["captions", "--results", str(results), "--annotations", str(_coco(tmp_path))]) == 1
    assert "Java is needed" in capsys.readouterr().err
    assert not (tmp_path / "res_metrics.json").exists()


VQA_ANNS = [
    {"question_id": 1, "image_id": 9, "question_type": "what color", "answer_type": "other",
     "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["red"] * 2 + ["blue"] * 8)]},
    {"question_id": 2, "image_id": 9, "question_type": "how many", "answer_type": "number",
     "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["2"] * 10)]},
    {"question_id": 3, "image_id": 9, "question_type": "is this", "answer_type": "yes/no",
     "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["yes"] * 3 + ["no"] * 7)]},
]
VQA_PREDS = {1: "Red", 2: "two", 3: "yes"}


def _vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    ann = _write(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": VQA_ANNS})
    ques = _write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": a["question_id"], "image_id": 9, "question": "?"} for a in VQA_ANNS]})
    return ann, ques


def test_vqa_from_vqav2_files(tmp_path, capsys):
    ann, ques = _vqa_files(tmp_path)
    results = _write(tmp_path / "res.json", [{"question_id": q, "answer": a} for q, a in VQA_PREDS.items()])
    expected = vqa_accuracy(VQA_PREDS, {a["question_id"]: a for a in VQA_ANNS})
    assert expected["overall"] == pytest.approx((60 + 100 + 90) / 3, abs=0.01)
    for extra in ([], ["--questions", str(ques)]):
        out = tmp_path / f"m{len(extra)}.json"
        assert main(["vqa", "--results", str(results), "--annotations", str(ann), "--out", str(out), *extra]) == 0
        report = json.loads(out.read_text())
        assert report["metrics"]["overall"] == expected["overall"]
        assert report["metrics"]["per_question_type"] == expected["per_question_type"]
    printed = capsys.readouterr().out
    assert f"official VQA accuracy: {expected['overall']:.2f} over 3 questions" in printed


def test_vqa_simplified_mode_is_labelled(tmp_path, capsys):
    ann, _ = _vqa_files(tmp_path)
    results = _write(tmp_path / "res.json", {str(q): a for q, a in VQA_PREDS.items()})  # {id: answer} works too
    assert main(["vqa", "--results", str(results), "--annotations", str(ann), "--mode", "simplified"]) == 0
    printed = capsys.readouterr().out
    assert "SIMPLIFIED VQA accuracy (NOT comparable)" in printed and "warning:" in printed
    report = json.loads((tmp_path / "res_metrics.json").read_text())
    assert report["mode"] == "simplified" and report["metrics"]["overall"] == pytest.approx((66.67 + 100 + 100) / 3, abs=0.01)


def test_vqa_from_our_jsonl_records_with_default_ids(tmp_path):
    """json_vqa records without ids: question ids default to <image>-q<j>, as the builder and vqa_ext write them."""
    ann = tmp_path / "vqa.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "a/1.jpg", "question": "colour?", "answers": ["red"] * 10},
        {"image": "a/1.jpg", "question": "shape?", "answer": "circle"},
        {"image": "b.jpg", "question": "how many?", "answers": ["2"] * 10, "question_id": "own-id"},
    ]))
    results = _write(tmp_path / "res.json", [{"question_id": "a/1.jpg-q0", "answer": "red"},
                                             {"question_id": "a/1.jpg-q1", "answer": "circle"},
                                             {"question_id": "own-id", "answer": "3"}])
    assert main(["vqa", "--results", str(results), "--annotations", str(ann)]) == 0
    # one answer only: no other annotator is left to agree, so even the right answer scores 0 (use gqa for that)
    assert json.loads((tmp_path / "res_metrics.json").read_text())["metrics"]["overall"] == pytest.approx(100 / 3, abs=0.01)


def _gqa_questions(tmp_path: Path) -> Path:
    return _write(tmp_path / "testdev_all_questions.json", {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "isBalanced": True,
                "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"imageId": "n1", "question": "What is it?", "answer": "cat", "isBalanced": True,
                "types": {"structural": "query", "semantic": "cat"}},
        "203": {"imageId": "n2", "question": "Which side?", "answer": "left", "isBalanced": False,
                "types": {"structural": "query", "semantic": "rel"}},
    })


def test_gqa_from_question_file_scores_balanced_questions_only(tmp_path, capsys):
    questions = _gqa_questions(tmp_path)
    results = _write(tmp_path / "res.json", [{"questionId": "201", "prediction": "Yes"},
                                             {"questionId": "202", "prediction": "a dog"}])  # GQA's own format
    assert main(["gqa", "--results", str(results), "--annotations", str(questions)]) == 0
    report = json.loads((tmp_path / "res_metrics.json").read_text())
    assert report["metrics"]["overall"] == 50.0 and report["unbalanced_left_out"] == 1
    assert report["metrics"]["per_semantic_type"] == {"attr": 100.0, "cat": 0.0}
    assert "GQA accuracy (exact match): 50.00 (1/2)" in capsys.readouterr().out


def test_gqa_from_jsonl_records(tmp_path):
    ann = tmp_path / "gqa.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "1.jpg", "question": "q?", "question_id": 7, "answers": ["yes"] * 10},
        {"image": "2.jpg", "question": "q?", "question_id": 8, "answer": "left"},
    ]))
    results = _write(tmp_path / "res.json", [{"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "the left"}])
    assert main(["gqa", "--results", str(results), "--annotations", str(ann)]) == 0
    assert json.loads((tmp_path / "res_metrics.json").read_text())["metrics"] == gqa_accuracy(
        {"7": "yes", "8": "the left"}, {"7": "yes", "8": "left"})


@pytest.mark.parametrize(
    "task, results, match",
    [
        ("vqa", [{"question_id": 1, "answer": "red"}], r"2 question\(s\) have no prediction"),
        ("vqa", [{"question_id": q, "answer": "x"} for q in (1, 2, 3, 4)], r"not in the ground truth, e\.g\. \['4'\]"),
        ("vqa", [{"question_id": "img-1", "answer": "x"}], "results have ids like 'img-1'"),
        ("vqa", [{"id": 1, "text": "x"}], "expected {'question_id', 'answer'}"),
        ("vqa", [{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], "has a second result"),
    ],
)
def test_bad_results_exit_1_naming_the_problem(tmp_path, capsys, task, results, match):
    ann, _ = _vqa_files(tmp_path)
    res = _write(tmp_path / "res.json", results)
    assert main([task, "--results", str(res), "--annotations", str(ann)]) == 1
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "res_metrics.json").exists()


def test_missing_or_malformed_files_exit_1(tmp_path, capsys):
    assert main(["gqa", "--results", str(tmp_path / "nope.json"), "--annotations", str(tmp_path / "a.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n")
    res = _write(tmp_path / "res.json", [])
    assert main(["captions", "--results", str(res), "--annotations", str(bad)]) == 1
    assert "neither JSON nor JSONL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bleu", "--results", "r"])
    assert exit_info.value.code == 2
