"""ONNX export of the image path: onnxruntime matches PyTorch (batch 1 and 5), captions from the
onnxruntime prefix equal PyTorch's, the CLIs work on a trained run, and TensorRT says plainly when it
cannot run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import images, tiny_model

from lavis_ext.interop import onnx_export, tensorrt_build

ARCHS = ["blip2_opt_ext", "blip2_t5_ext"]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, synthetic_root, tmp_path_factory):
    model = tiny_model(request.param, seed=1).eval()
    path = onnx_export.export_onnx(model, tmp_path_factory.mktemp("onnx") / "image_path.onnx", image_size=64)
    return model, path


def test_onnxruntime_matches_pytorch_for_batch_1_and_5(exported):
    model, path = exported
    encoder = onnx_export.OnnxImageEncoder(path)
    assert encoder.metadata["num_query_token"] == "16" and encoder.metadata["image_size"] == "64"
    for batch in (1, 5):
        pixel = images(batch, seed=batch)
        with torch.no_grad():
            reference, mask = model.encode_image_for_llm(pixel)
        prefix = encoder(pixel)
        assert prefix.shape == reference.shape == (batch, 16, 64) and prefix.dtype == torch.float32
        assert torch.equal(mask, torch.ones(batch, 16, dtype=torch.long))  # the contract: all ones
        assert (prefix - reference).abs().max().item() < 1e-4


def test_captions_from_the_onnxruntime_prefix_equal_pytorch(exported):
    model, path = exported
    encoder = onnx_export.OnnxImageEncoder(path)
    pixel = images(3, seed=7)
    for beams in (1, 4):
        ours = model.generate({"image": pixel}, num_beams=beams, max_length=8)
        onnx = model.generate({"llm_inputs": encoder(pixel)}, num_beams=beams, max_length=8)
        assert onnx == ours


def test_encoder_rejects_wrong_shapes_and_missing_files(exported, tmp_path):
    _, path = exported
    encoder = onnx_export.OnnxImageEncoder(path)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        encoder(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="lavis-ext onnx export"):
        onnx_export.OnnxImageEncoder(tmp_path / "nope.onnx")


def test_qformer_text_input_is_refused(synthetic_root, tmp_path):
    model = tiny_model("blip2_t5_ext", qformer_text_input=True)
    with pytest.raises(ValueError, match="qformer_text_input"):
        onnx_export.export_onnx(model, tmp_path / "x.onnx", image_size=64)


def test_cli_export_and_caption_on_a_trained_run(trained_caption_run, tmp_path, capsys):
    from lavis_ext.inference import load

    out = tmp_path / "image_path.onnx"
    assert onnx_export.main(["export", str(trained_caption_run), str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_abs_diff_batch1"] < 1e-4 and report["max_abs_diff_batch5"] < 1e-4
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    assert onnx_export.main(["caption", str(out), str(trained_caption_run), *map(str, paths)]) == 0
    printed = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
    predictor = load(trained_caption_run, device="cpu")
    assert printed == predictor.caption([Image.open(p) for p in paths])


def test_tensorrt_says_clearly_when_it_cannot_run(tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    assert tensorrt_build.main([str(onnx_file), str(tmp_path / "m.plan")]) == 2
    assert "does not exist" in capsys.readouterr().err
    onnx_file.write_bytes(b"not checked before the environment")
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the engine build is exercised by the gpu-marked test")
    assert tensorrt_build.main([str(onnx_file), str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "cannot build an engine here" in err and ("tensorrt" in err or "GPU" in err)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.gpu
def test_tensorrt_engine_builds_from_the_exported_file(exported, tmp_path):
    pytest.importorskip("tensorrt")
    _, path = exported
    assert tensorrt_build.main([str(path), str(tmp_path / "m.plan"), "--max-batch", "8"]) == 0
    assert (tmp_path / "m.plan").stat().st_size > 0
