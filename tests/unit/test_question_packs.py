"""Question packs: shipped packs are valid data, a pack runs the vision encoder once, the medical notice
travels with the results, and bad packs fail with the reason."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from lavis_ext.apps import question_packs as qp


@pytest.fixture(scope="module")
def vqa_predictor(trained_vqa_run):
    from lavis_ext.inference import load

    return load(trained_vqa_run, device="cpu")


def shapes_example(index: int):
    """A synthetic test-split image (PIL) and its metadata (captions, questions)."""
    import io

    from lavis_ext.datasets.synthetic import make_example

    example = make_example(0, "test", index)
    return Image.open(io.BytesIO(example["jpg"])).convert("RGB"), example["json"]


@pytest.fixture(scope="module")
def shapes_image():
    return shapes_example(3)[0]


def test_every_shipped_pack_loads():
    assert {"document", "chart", "medical"} <= set(qp.shipped_packs())
    for name in qp.shipped_packs():
        pack = qp.load_pack(name)
        assert pack.name == name
        assert len(pack.questions) >= 5
        assert len(set(pack.ids)) == len(pack.ids)
        assert all(question.endswith("?") for _, question in pack.questions)
    assert "NOT FOR CLINICAL USE" in qp.load_pack("medical").notice
    assert qp.load_pack("document").notice is None


def test_pack_reuses_image_features(vqa_predictor, shapes_image):
    pack = qp.load_pack("document")
    calls = []
    hook = vqa_predictor.model.visual_encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    try:
        result = qp.run_pack(vqa_predictor, pack, shapes_image, image_name="scene.png")
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 1  # one ViT pass, on one image, for all questions
    assert [a["id"] for a in result["answers"]] == list(pack.ids)
    assert all(isinstance(a["answer"], str) for a in result["answers"])
    # the same answers as full passes (the ViT re-run for every question)
    full = vqa_predictor.answer([shapes_image] * len(pack.questions), [q for _, q in pack.questions])
    assert [a["answer"] for a in result["answers"]] == full
    assert result["pack"] == "document" and result["notice"] is None and result["image"] == "scene.png"
    json.dumps(result)  # serialisable as is


def test_custom_json_pack(vqa_predictor, tmp_path):
    """A user's pack file (JSON) with the synthetic dataset's own questions about one image."""
    image, meta = shapes_example(5)
    questions = [{"id": q["question_id"], "question": q["question"]} for q in meta["questions"]]
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"name": "shapes", "description": "synthetic", "notice": None, "questions": questions}))
    pack = qp.load_pack(path)
    result = qp.run_pack(vqa_predictor, pack, image)
    assert [a["id"] for a in result["answers"]] == [q["id"] for q in questions]
    assert all(a["answer"].strip() for a in result["answers"])


def test_cli_prints_medical_notice_and_writes_json(trained_vqa_run, shapes_image, tmp_path, capsys):
    image_path = tmp_path / "scan.png"
    shapes_image.save(image_path)
    out = tmp_path / "out" / "medical.json"
    rc = qp.main(["--checkpoint", str(trained_vqa_run), "--device", "cpu", "--pack", "medical",
                  "--num-beams", "1", str(image_path), "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "NOT FOR CLINICAL USE" in captured.err and "NOT FOR CLINICAL USE" in captured.out
    result = json.loads(out.read_text())
    assert result["pack"] == "medical"
    assert result["notice"].startswith("NOT FOR CLINICAL USE")
    assert [a["id"] for a in result["answers"]] == list(qp.load_pack("medical").ids)


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "questions": []}, "non-empty list 'questions'"),
    ({"name": "x", "questions": [{"id": "a", "question": "q?"}], "colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"name": "x", "questions": [{"id": "a", "question": "q?"}, {"id": "a", "question": "r?"}]}, "duplicate id 'a'"),
    ({"name": "x", "questions": [{"id": "a"}]}, "question #1 must have exactly"),
    ({"questions": [{"id": "a", "question": "q?"}]}, "non-empty string 'name'"),
])
def test_bad_packs_are_rejected_with_the_reason(data, match):
    with pytest.raises(qp.PackError, match=match):
        qp.parse_pack(data)


def test_unknown_pack_and_bad_image_are_clear(tmp_path, capsys):
    with pytest.raises(qp.PackError, match="neither a shipped pack"):
        qp.load_pack("recipes")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    assert qp.main(["--checkpoint", str(tmp_path), "--pack", "chart", str(not_image)]) == 2
    assert "is not an image" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qp.open_image(tmp_path / "missing.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    assert qp.open_image(tmp_path / "ok.png").size == (4, 4)
