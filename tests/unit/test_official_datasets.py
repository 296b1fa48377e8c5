"""vqa_files (VQAv2 / OK-VQA question + annotation files) and gqa_files (GQA question files): samples, image
paths, splits without answers, loud failures; and evaluate.py on them with the tiny T5 (vqa_ext scores val and
writes the EvalAI submission for test-dev; gqa_ext scores GQA by exact match)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image

from lavis_ext import cli
from lavis_ext.datasets.official import coco_image_dir
from lavis_ext.evaluation.files import read_gqa_questions, read_vqa_files

VAL_IDS = [42, 73, 391895]
TEST_IDS = [1, 57]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), (30 * seed % 255, 90, 200)).save(path)


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


@pytest.fixture()
def vqav2(tmp_path) -> Path:
    """A VQAv2 tree in COCO's layout: val2014 with questions + annotations, test-dev2015 with questions only."""
    root = tmp_path / "vqav2"
    for i, image_id in enumerate(VAL_IDS):
        _image(root / "images" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", i)
    for i, image_id in enumerate(TEST_IDS):
        _image(root / "images" / "test2015" / f"COCO_test2015_{image_id:012d}.jpg", i)
    val_q = [{"image_id": img, "question": f"What is in picture {img}?", "question_id": img * 1000 + j}
             for img in VAL_IDS for j in range(2)]
    _write(root / "v2_OpenEnded_mscoco_val2014_questions.json",
           {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
            "questions": val_q})
    anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what is",
             "answer_type": "other", "multiple_choice_answer": "cat", "answers": _answers(*["cat"] * 7, *["dog"] * 3)}
            for q in val_q]
    _write(root / "v2_mscoco_val2014_annotations.json", {"info": {}, "license": {}, "data_subtype": "val2014",
                                                          "annotations": anns})
    _write(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
           {"data_subtype": "test-dev2015", "questions": [
               {"image_id": img, "question": "Is it red?", "question_id": img * 1000 + 5} for img in TEST_IDS]})
    return root


def _vqa_info(root: Path, **extra) -> dict:
    info = {
        "root": str(root),
        "image_root": "images",
        "questions": {"val": "v2_OpenEnded_mscoco_val2014_questions.json",
                      "test": "v2_OpenEnded_mscoco_test-dev2015_questions.json"},
        "annotations": {"val": "v2_mscoco_val2014_annotations.json"},
    }
    info.update(extra)
    return info


def _build(name: str, **build_info) -> dict:
    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    cfg.vis_processor.eval.image_size = 32
    cfg.vis_processor.train.image_size = 32
    return cls(cfg).build_datasets()


def test_vqa_files_val_split_samples(vqav2):
    datasets = _build("vqa_files", **_vqa_info(vqav2))
    val = datasets["val"]
    assert len(val) == 6 and len(val.entries) == 3
    sample = val[0]
    assert sample["question_id"] == "42000" and sample["image_id"] == "42"
    assert sample["answers"] == ["cat"] * 7 + ["dog"] * 3
    assert sample["question_type"] == "what is" and sample["answer_type"] == "other"
    assert sample["text_input"] == "Question: what is in picture 42? Short answer:"
    assert sample["image"].shape == (3, 32, 32)
    assert val.entries[2].rel == "val2014/COCO_val2014_000000391895.jpg"
    batch = val.collater([val[i] for i in range(len(val))])
    assert isinstance(batch["image"], torch.Tensor) and batch["answers"][5] == sample["answers"]


def test_vqa_files_test_dev_split_has_no_answers(vqav2):
    test = _build("vqa_files", **_vqa_info(vqav2))["test"]
    assert [test[i]["answers"] for i in range(len(test))] == [[], []]
    assert test.entries[0].rel == "test2015/COCO_test2015_000000000001.jpg"  # test-dev images live in test2015
    assert coco_image_dir("test-dev2015") == "test2015" and coco_image_dir("val2014") == "val2014"


def test_vqa_files_train_split_trains_on_weighted_answers(vqav2):
    info = _vqa_info(vqav2)
    info["questions"] = {"train": info["questions"]["val"]}
    info["annotations"] = {"train": info["annotations"]["val"]}
    sample = _build("vqa_files", **info)["train"][0]
    assert sample["text_output"] == "cat" and sample["answers"] == ["cat", "dog"]
    assert sample["weights"] == pytest.approx([0.7, 0.3])


def test_vqa_files_explicit_image_pattern_per_split(vqav2, tmp_path):
    _image(vqav2 / "flat" / "42.png", 0)
    _image(vqav2 / "flat" / "73.png", 1)
    _image(vqav2 / "flat" / "391895.png", 2)
    info = _vqa_info(vqav2, image_root="flat", image_pattern={"val": "{image_id}.png"})
    info["questions"] = {"val": info["questions"]["val"]}
    val = _build("vqa_files", **info)["val"]
    assert [e.rel for e in val.entries] == ["42.png", "73.png", "391895.png"]


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"image_pattern": "../../{image_id}.jpg"}, ValueError, "outside the image root"),
        ({"image_pattern": "{image_id}/{nope}.jpg"}, ValueError, "cannot be formatted"),
        ({"annotations": {"train": "v2_mscoco_val2014_annotations.json"}}, ValueError, "no question file"),
        ({"annotations": {"val": "missing.json"}}, FileNotFoundError, "missing.json"),
        ({"questions": {}}, ValueError, "gives no splits"),
        ({"image_root": "nowhere"}, FileNotFoundError, "nowhere"),
        ({"anotations": {}}, ValueError, "did you mean 'annotations'"),
    ],
)
def test_vqa_files_fail_loudly(vqav2, change, error, match):
    with pytest.raises(error, match=match):
        _build("vqa_files", **_vqa_info(vqav2, **change))


def test_vqa_files_need_a_pattern_without_data_subtype(vqav2):
    q = json.loads((vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    del q["data_subtype"]
    _write(vqav2 / "no_subtype.json", q)
    info = _vqa_info(vqav2, questions={"val": "no_subtype.json"})
    with pytest.raises(ValueError, match="set datasets.vqa_files.build_info.image_pattern"):
        _build("vqa_files", **info)


def test_vqa_files_train_without_answers_is_refused(vqav2):
    info = _vqa_info(vqav2, questions={"train": "v2_OpenEnded_mscoco_test-dev2015_questions.json"}, annotations={})
    with pytest.raises(ValueError, match="training needs answers"):
        _build("vqa_files", **info)


def test_read_vqa_files_checks_that_questions_and_annotations_agree(vqav2, tmp_path):
    anns = json.loads((vqav2 / "v2_mscoco_val2014_annotations.json").read_text())
    _write(tmp_path / "short.json", {"annotations": anns["annotations"][:-1]})
    with pytest.raises(ValueError, match=r"question 391895001 has no entry"):
        read_vqa_files(vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "short.json")
    _write(tmp_path / "extra.json", {"annotations": anns["annotations"] + [{**anns["annotations"][0], "question_id": 5}]})
    with pytest.raises(ValueError, match=r"not in .*e\.g\. \[5\]"):
        read_vqa_files(vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "extra.json")
    with pytest.raises(ValueError, match="not a VQAv2 question file"):
        read_vqa_files(tmp_path / "short.json")


def test_okvqa_files_read_the_same_way(tmp_path):
    """OK-VQA v1.1: same layout; its answers carry raw_answer too (the processed 'answer' is used)."""
    _image(tmp_path / "images" / "val2014" / "COCO_val2014_000000000297.jpg", 0)
    _write(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 297, "question": "What sport can you use this for?", "question_id": 2971}]})
    answers = [{"answer_id": i + 1, "raw_answer": "Racing", "answer_confidence": "yes", "answer": "race"}
               for i in range(10)]
    _write(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"image_id": 297, "question_id": 2971, "question_type": "four", "answer_type": "other", "answers": answers}]})
    test = _build("vqa_files", root=str(tmp_path), image_root="images",
                  questions={"test": "OpenEnded_mscoco_val2014_questions.json"},
                  annotations={"test": "mscoco_val2014_annotations.json"})["test"]
    assert test[0]["answers"] == ["race"] * 10 and test[0]["question_id"] == "2971"


@pytest.fixture()
def gqa(tmp_path) -> Path:
    root = tmp_path / "gqa"
    for i, image_id in enumerate(["n161313", "2354786"]):
        _image(root / "images" / f"{image_id}.jpg", i)
    questions = {
        "20968379": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes.",
                     "isBalanced": True, "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "20968380": {"imageId": "n161313", "question": "What is on the table?", "answer": "t-shirt",
                     "isBalanced": True, "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
        "05451384": {"imageId": "2354786", "question": "Which side is the dog on?", "answer": "left",
                     "isBalanced": True, "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    }
    _write(root / "testdev_balanced_questions.json", questions)
    _write(root / "submission_all_questions.json",
           {k: {key: v for key, v in q.items() if key != "answer"} for k, q in questions.items()})
    return root


def test_gqa_files_samples(gqa):
    test = _build("gqa_files", root=str(gqa), image_root="images",
                  questions={"test": "testdev_balanced_questions.json", "challenge": "submission_all_questions.json"})
    sample = test["test"][0]
    assert sample["question_id"] == "20968379" and sample["image_id"] == "n161313"
    assert sample["answers"] == ["yes"] and sample["question_type"] == "verify" and sample["answer_type"] == "binary"
    assert test["test"][1]["answer_type"] == "open"
    assert test["test"].entries[1].rel == "2354786.jpg"
    assert [test["challenge"][i]["answers"] for i in range(3)] == [[], [], []]


def test_read_gqa_questions_keeps_types_and_flags(gqa):
    records = read_gqa_questions(gqa / "testdev_balanced_questions.json")
    assert records[2] == {"question_id": "05451384", "image_id": "2354786", "question": "Which side is the dog on?",
                          "answers": ["left"], "question_type": "query", "answer_type": "open",
                          "semantic_type": "rel", "is_balanced": True}
    with pytest.raises(ValueError, match="not a GQA question file"):
        read_gqa_questions(_write(gqa / "list.json", [1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py on them, with the tiny Flan-T5 (untrained: the point is the files, not the accuracy)
QUICK_EVAL = ["run.batch_size_eval=4", "run.num_workers=0", "run.num_beams=1", "run.max_len=3", "run.evaluate=true",
              "run.device=cpu", "run.distributed=false", "run.amp=false"]


def _project(tmp_path: Path, dataset: str, task: str, build_info: dict, splits: list[str], image_size=64) -> Path:
    """A project file; ``image_size=None`` leaves the processors at the dataset's defaults (as the README's block)."""
    dcfg = {"build_info": build_info}
    if image_size is not None:
        dcfg["vis_processor"] = {"eval": {"name": "blip_image_eval", "image_size": image_size}}
    project = {
        "model": {"arch": "blip2_t5_ext", "model_type": "tiny"},
        "datasets": {dataset: dcfg},
        "run": {"task": task, "runner": "runner_base", "test_splits": splits, "seed": 1, "output_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{task}.yaml"
    OmegaConf.save(OmegaConf.create(project), path)
    return path


def test_evaluate_py_scores_vqav2_val_and_writes_the_evalai_file_for_test_dev(synthetic_root, vqav2, tmp_path):
    project = _project(tmp_path, "vqa_files", "vqa_ext", _vqa_info(vqav2), ["val", "test"])
    runner, logs = cli.evaluate(["--cfg-path", str(project), "--options", *QUICK_EVAL])
    run_dir = Path(runner.output_dir)
    val = json.loads((run_dir / "val_epochbest_metrics.json").read_text())
    assert val["num_questions"] == 6 and 0.0 <= val["metrics"]["overall"] <= 100.0
    assert val["metrics"]["per_question_type"].keys() == {"what is"}
    assert logs["val"]["agg_metrics"] == val["metrics"]["overall"]
    submission = json.loads((run_dir / "result" / "test_evalai_submission.json").read_text())
    assert [r["question_id"] for r in submission] == [1005, 57005]
    assert all(isinstance(r["answer"], str) for r in submission)
    test = json.loads((run_dir / "test_epochbest_metrics.json").read_text())
    assert test["metrics"] == {} and test["submission_file"].endswith("test_evalai_submission.json")


def test_evaluate_py_scores_gqa_by_exact_match(synthetic_root, gqa, tmp_path):
    info = {"root": str(gqa), "image_root": "images", "questions": {"test": "testdev_balanced_questions.json"}}
    project = _project(tmp_path, "gqa_files", "gqa_ext", info, ["test"])
    runner, _ = cli.evaluate(["--cfg-path", str(project), "--options", *QUICK_EVAL])
    run_dir = Path(runner.output_dir)
    record = json.loads((run_dir / "test_epochbest_metrics.json").read_text())
    metrics = record["metrics"]
    assert metrics["num_questions"] == 3 and metrics["overall"] == pytest.approx(100 * metrics["correct"] / 3)
    assert set(metrics["per_answer_type"]) == {"open", "binary"}
    results = json.loads((run_dir / "result" / "test_gqa_result_epochbest.json").read_text())
    assert {r["question_id"] for r in results} == {"20968379", "20968380", "05451384"}
    assert set(results[0]) == {"question_id", "answer"}
    # the saved results re-score to the same number through the CLI
    from lavis_ext.evaluation.score import score_gqa

    rescored = score_gqa(run_dir / "result" / "test_gqa_result_epochbest.json", gqa / "testdev_balanced_questions.json")
    assert rescored["metrics"]["overall"] == metrics["overall"]


def test_vqa_result_file_is_accepted_by_the_official_vqa_api(synthetic_root, vqav2, tmp_path):
    """The result file carries VQAv2's integer question ids, so the official VQA API (LAVIS ships it) loads it and
    its evaluation gives our number. With string ids: AssertionError: Results do not correspond to current VQA set."""
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    info = _vqa_info(vqav2)
    del info["questions"]["test"]
    project = _project(tmp_path, "vqa_files", "vqa_ext", info, ["val"])
    runner, logs = cli.evaluate(["--cfg-path", str(project), "--options", *QUICK_EVAL])
    result = Path(runner.output_dir) / "result" / "val_vqa_result_epochbest.json"
    ids = [r["question_id"] for r in json.loads(result.read_text())]
    assert ids == [q * 1000 + j for q in VAL_IDS for j in range(2)]  # VQAv2's integers
    questions = str(vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json")
    official = VQA(str(vqav2 / "v2_mscoco_val2014_annotations.json"), questions)
    loaded = official.loadRes(str(result), questions)
    assert sorted(loaded.getQuesIds()) == sorted(official.getQuesIds())
    evaluation = VQAEval(official, loaded, n=2)
    evaluation.evaluate()
    assert evaluation.accuracy["overall"] == pytest.approx(logs["val"]["agg_metrics"], abs=0.01)


def test_files_builders_take_the_image_size_from_the_model(synthetic_root, gqa, tmp_path):
    """The README's block sets no processor: vqa_files / gqa_files default to image_size null, the model's (the tiny
    model's 64 px here, not 224: 'Input image size (224*224) doesn't match model (64*64)')."""
    info = {"root": str(gqa), "image_root": "images", "questions": {"test": "testdev_balanced_questions.json"}}
    runner, logs = cli.evaluate(["--cfg-path", str(_project(tmp_path, "gqa_files", "gqa_ext", info, ["test"], None)),
                                 "--options", *QUICK_EVAL])
    assert runner.datasets["test"][0]["image"].shape == (3, 64, 64)
    assert 0.0 <= logs["test"]["agg_metrics"] <= 100.0


def test_an_image_size_other_than_the_models_fails_before_any_work_naming_the_key(vqav2, tmp_path, monkeypatch):
    project = _project(tmp_path, "vqa_files", "vqa_ext", _vqa_info(vqav2), ["val"], image_size=224)
    from lavis_ext.datasets import official

    monkeypatch.setattr(official, "read_vqa_files", lambda *a: pytest.fail("files were read before the check"))
    key = r"datasets\.vqa_files\.vis_processor\.eval\.image_size"
    with pytest.raises(ValueError, match=rf"{key} is 224, but the model takes 64x64 images .*set {key}=64"):
        cli.evaluate(["--cfg-path", str(project), "--options", *QUICK_EVAL])


def test_a_null_image_size_outside_a_task_names_the_key(vqav2):
    cls = registry.get_builder_class("vqa_files")
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets["vqa_files"]
    cfg.build_info = OmegaConf.merge(cfg.build_info, _vqa_info(vqav2))
    with pytest.raises(ValueError, match=r"datasets\.vqa_files\.vis_processor\.train\.image_size is null"):
        cls(cfg).build_datasets()
