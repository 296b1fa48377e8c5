"""Tiny BLIP-2 OPT and Flan-T5: build from inline configs, train a step, generate every way."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import images, tiny_model

ARCHS = ["blip2_opt_ext", "blip2_t5_ext"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, synthetic_root):
    return tiny_model(request.param)


def test_forward_backward_reaches_every_trainable_part(model):
    model.train()
    samples = {"image": images(2), "text_input": ["a photo of a red circle", "a photo of a blue square left of a star"]}
    loss = model(samples)["loss"]
    assert torch.isfinite(loss) and loss.item() > 0
    model.zero_grad()
    loss.backward()
    llm = model.opt_model if hasattr(model, "opt_model") else model.t5_model
    for part in (model.visual_encoder, model.Qformer, llm):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__
    assert model.query_tokens.grad is not None


def test_everything_is_fp32_on_cpu(model):
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_greedy_and_beam_agree_in_shape(model):
    model.eval()
    x = {"image": images(3)}
    greedy = model.generate(x, num_beams=1, max_length=6, min_length=1)
    beam = model.generate(x, num_beams=3, max_length=6, min_length=1)
    assert len(greedy) == len(beam) == 3
    assert all(isinstance(c, str) for c in greedy + beam)


def test_several_captions_per_image(model):
    model.eval()
    torch.manual_seed(0)
    sampled = model.generate({"image": images(2)}, use_nucleus_sampling=True, num_captions=3, max_length=5)
    assert len(sampled) == 6
    beams = model.generate({"image": images(2)}, num_beams=3, num_captions=2, max_length=5)
    assert len(beams) == 4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one(model, num_beams):
    model.eval()
    batch = images(3, seed=1)
    together = model.generate({"image": batch}, num_beams=num_beams, max_length=6)
    alone = [model.generate({"image": batch[i : i + 1]}, num_beams=num_beams, max_length=6)[0] for i in range(3)]
    assert together == alone


def test_predict_answers(model):
    model.eval()
    questions = ["Question: what color is the circle? Short answer:", "Question: how many shapes are there? Short answer:"]
    answers = model.predict_answers({"image": images(2), "text_input": questions}, num_beams=2, max_len=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_cached_image_side_gives_the_same_outputs(model):
    """Serving and ONNX reuse the image side: ViT features or the finished LLM prefix decode exactly as the image."""
    model.eval()
    x = images(2, seed=3)
    with torch.no_grad():
        embeds = model.encode_vision(x)
        prefix, _ = model.encode_image_for_llm(x)
    direct = model.generate({"image": x}, num_beams=2, max_length=6)
    assert model.generate({"image_embeds": embeds}, num_beams=2, max_length=6) == direct
    assert model.generate({"llm_inputs": prefix}, num_beams=2, max_length=6) == direct
    questions = ["Question: what color is the circle? Short answer:"] * 2
    answers = model.predict_answers({"image": x, "text_input": questions}, num_beams=1, max_len=4)
    assert model.predict_answers({"image_embeds": embeds, "text_input": questions}, num_beams=1, max_len=4) == answers


def test_prefix_cannot_be_reused_when_it_depends_on_the_question(synthetic_root):
    model = tiny_model("blip2_t5_ext", qformer_text_input=True).eval()
    prefix, _ = model.encode_image_for_llm(images(1), ["what color?"])
    with pytest.raises(ValueError, match="image_embeds"):
        model.predict_answers({"llm_inputs": prefix, "text_input": ["what color?"]}, max_len=3)


def test_vqa_training_contract_t5(synthetic_root):
    model = tiny_model("blip2_t5_ext")
    loss = model({"image": images(2), "text_input": ["Question: what color? Short answer:"] * 2, "text_output": ["red", "blue"]})["loss"]
    assert torch.isfinite(loss)


def test_frozen_llm_and_vit_have_no_trainable_params(synthetic_root):
    model = tiny_model("blip2_opt_ext", freeze_vit=True, freeze_llm=True)
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    assert not any(p.requires_grad for p in model.opt_model.parameters())
    assert any(p.requires_grad for p in model.Qformer.parameters())


def test_lavis_load_model_and_preprocess_works_for_our_models(synthetic_root):
    from lavis.models import load_model_and_preprocess

    model, vis_processors, text_processors = load_model_and_preprocess("blip2_opt_ext", "tiny", is_eval=True, device="cpu")
    from PIL import Image

    image = vis_processors["eval"](Image.new("RGB", (80, 80), (200, 30, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 64, 64)
    assert len(model.generate({"image": image}, num_beams=2, max_length=4)) == 1


def test_inline_config_typos_fail_loudly(synthetic_root):
    with pytest.raises(ValueError, match="widht"):
        tiny_model("blip2_opt_ext", vit_config={"widht": 32})


def test_missing_finetuned_path_fails_clearly(synthetic_root):
    with pytest.raises(ValueError, match="finetuned"):
        tiny_model("blip2_opt_ext", load_finetuned=True, finetuned=None)


def test_stage1_qformer_builds_and_trains(synthetic_root):
    import torch.distributed as dist

    from lavis_ext.dist import init_distributed

    if not dist.is_initialized():
        init_distributed(OmegaConf.create({"device": "cpu"}))
    model = tiny_model("blip2_qformer_ext")
    out = model({"image": images(4), "text_input": ["a red circle", "a blue square", "a green star", "two shapes"]})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
