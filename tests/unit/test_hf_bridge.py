"""Hugging Face BLIP-2 bridge: parity both ways on tiny random models (OPT and Flan-T5), bit-exact round
trips, stock-class loading of an exported fine-tuned run, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from release_fixture import release_artifacts  # noqa: F401  (a session fixture)
from tiny_models import images, tiny_model

from lavis_ext.interop import hf_bridge

ARCHS = ["blip2_opt_ext", "blip2_t5_ext"]
DECODINGS = [{"num_beams": 1, "max_new_tokens": 8}, {"num_beams": 5, "max_new_tokens": 8}]


def pil_images(n=3, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size + 7 * i, size, 3), dtype=np.uint8)) for i in range(n)]


def aligned_tiny(arch, seed=0):
    """A tiny model whose ln_vision eps equals its ViT blocks' (1e-6): Hugging Face's config has one vision
    LayerNorm eps, so only such a model can be exported exactly (the module docstring explains)."""
    model = tiny_model(arch, seed).eval()
    model.ln_vision.eps = model.visual_encoder.blocks[0].norm1.eps
    return model


def our_logits(model, image, prompts, decoder_ids=None):
    """The LLM logits of our model on [image prefix; prompt] (T5: for ``decoder_ids``)."""
    kind = hf_bridge.llm_kind(model)
    prefix, atts = model.encode_image_for_llm(image)
    if kind == "opt":
        model.opt_tokenizer.padding_side = "left"
        tok = model.opt_tokenizer(prompts, return_tensors="pt", padding="longest")
        embeds = torch.cat([prefix, model.opt_model.get_input_embeddings()(tok.input_ids)], 1)
        mask = torch.cat([atts, tok.attention_mask], 1)
        return model.opt_model(inputs_embeds=embeds, attention_mask=mask).logits
    embeds, mask = model._prefix_prompts(prefix, atts, prompts)
    return model.t5_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits


def hf_logits(hf_model, processor, pixel_values, prompts, decoder_ids=None):
    enc = processor.tokenizer(prompts, return_tensors="pt", padding="longest")
    n = hf_model.config.num_query_tokens
    ids = torch.cat([torch.full((len(prompts), n), hf_model.config.image_token_index), enc.input_ids], 1)
    mask = torch.cat([torch.ones(len(prompts), n, dtype=torch.long), enc.attention_mask], 1)
    return hf_model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


def hf_captions(hf_model, processor, pil, prompt, **decoding):
    """Stock usage: the processor on PIL images + prompt, then Blip2ForConditionalGeneration.generate."""
    inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
    out = hf_model.generate(**inputs, min_new_tokens=1, **decoding)
    if not hf_model.config.text_config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only: the prompt ids come first
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


def our_captions(model, pixel_values, **decoding):
    return model.generate({"image": pixel_values}, num_beams=decoding["num_beams"],
                          max_length=decoding["max_new_tokens"], min_length=1)


def eval_processor(image_size):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    return BlipImageEvalProcessor(image_size=image_size)


def assert_parity(ours, hf_model, processor):
    """Logits within 1e-4 and equal greedy / beam captions; the processor equals blip_image_eval."""
    pil = pil_images()
    pixel = torch.stack([eval_processor(64)(im) for im in pil])
    hf_pixel = processor(images=pil, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel, hf_pixel, atol=1e-5), (pixel - hf_pixel).abs().max()
    prompts = ["a photo of", "a red", "two"]
    dec = torch.tensor([[0, 5, 9], [0, 7, 7], [0, 1, 3]]) if hf_bridge.llm_kind(ours) == "t5" else None
    with torch.no_grad():
        a = our_logits(ours, pixel, prompts, dec)
        b = hf_logits(hf_model, processor, pixel, prompts, dec)
    vocab = a.shape[-1]
    assert b.shape[-1] in (vocab, vocab + 1)
    assert (a - b[..., :vocab]).abs().max().item() < 1e-4
    for decoding in DECODINGS:
        assert our_captions(ours, pixel, **decoding) == hf_captions(hf_model, processor, pil, ours.prompt, **decoding)


def load_stock(path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    return Blip2ForConditionalGeneration.from_pretrained(path).eval(), Blip2Processor.from_pretrained(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_ours_to_hf_parity_with_stock_classes(synthetic_root, tmp_path, arch):
    ours = aligned_tiny(arch)
    hf_bridge.export_hf(ours, tmp_path / "hf", source_config={"model": {"arch": arch}})
    hf_model, processor = load_stock(tmp_path / "hf")
    assert_parity(ours, hf_model, processor)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"arch: {arch}" in card and "vision post-LayerNorm eps: ours 1e-06" in card


def test_a_spare_vocabulary_row_becomes_the_image_token_without_weight_changes(synthetic_root, tmp_path):
    """The official OPT / Flan-T5 vocabularies have rows beyond their tokenizers: `<image>` takes the first."""
    ours = aligned_tiny("blip2_opt_ext")
    vocab = len(ours.opt_tokenizer)
    ours.opt_model.resize_token_embeddings(vocab + 8)
    _, _, notes = hf_bridge.to_hf(ours)
    assert notes["image_token_index"] == vocab and not notes["appended_image_row"]
    hf_bridge.export_hf(ours, tmp_path / "hf")
    hf_model, processor = load_stock(tmp_path / "hf")
    assert hf_model.config.text_config.vocab_size == vocab + 8
    assert not hf_model.language_model.generation_config.suppress_tokens
    assert_parity(ours, hf_model, processor)


def test_export_records_the_vision_eps_hugging_face_cannot_express(synthetic_root, tmp_path):
    """LAVIS's ln_vision eps (1e-5) differs from its ViT blocks' (1e-6); Blip2VisionConfig has one eps for
    both, so the export keeps the blocks' value and its card states the difference and its measured effect."""
    ours = tiny_model("blip2_opt_ext").eval()
    hf_bridge.export_hf(ours, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "vision post-LayerNorm eps: ours 1e-05, Hugging Face's config 1e-06" in card
    measured = float(card.split("on random images: ")[1].split()[0])
    assert 1e-4 < measured < 0.1  # visible on a random tiny ViT (small feature variance), and reported
    ours.ln_vision.eps = 1e-6
    _, _, notes = hf_bridge.to_hf(ours)
    assert notes["prefix_max_abs_diff"] < 1e-5  # the eps is the whole difference


def random_hf_source(arch, path, seed=1):
    """An independent Hugging Face model (HF's own random init, T5 with its gelu_new), saved as a local
    directory the way a hub checkpoint is laid out."""
    from transformers import Blip2ForConditionalGeneration

    template = aligned_tiny(arch)
    _, processor, _ = hf_bridge.to_hf(template)
    config = hf_bridge.hf_config_for(template)
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids(hf_bridge.IMAGE_TOKEN)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.vision_config.layer_norm_eps = 1e-6
    config.qformer_config.initializer_range = 0.2  # HF's 0.02 makes every caption empty at this width
    config.vision_config.initializer_range = 0.2
    if config.text_config.model_type == "t5":
        config.text_config.dense_act_fn = "gelu_new"  # Flan-T5's own activation
    else:
        config.text_config.eos_token_id = template.eos_token_id  # captions end at "\n", as ours
    torch.manual_seed(seed)
    hf_model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the query tokens start at zero in HF: give them values so images matter
        hf_model.query_tokens.normal_(0, 1)
    hf_model.save_pretrained(path)
    processor.save_pretrained(path)
    return hf_model, processor


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_ours_parity_from_local_directory(synthetic_root, tokenizer_dirs, tmp_path, arch):
    hf_model, processor = random_hf_source(arch, tmp_path / "src")
    ours = hf_bridge.from_hf(str(tmp_path / "src"), qformer_tokenizer=str(tokenizer_dirs["bert"]), prompt="a photo of")
    assert_parity(ours, hf_model, processor)
    if arch == "blip2_t5_ext":
        assert ours.t5_model.config.dense_act_fn == "gelu_new"


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trips_are_bit_exact(synthetic_root, arch):
    ours = tiny_model(arch, seed=3)
    kind = hf_bridge.llm_kind(ours)
    state = {k: v for k, v in ours.state_dict().items() if k not in hf_bridge.OURS_ONLY}
    back = hf_bridge.from_hf_state(hf_bridge.to_hf_state(state, kind), kind)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    hf_model, _, _ = hf_bridge.to_hf(ours)
    hf_state = hf_model.state_dict()
    again = hf_bridge.to_hf_state(hf_bridge.from_hf_state(hf_state, kind), kind)
    assert again.keys() == hf_state.keys()
    assert all(torch.equal(again[k], hf_state[k]) for k in hf_state)


def test_import_cli_writes_a_model_config_that_rebuilds_the_model(synthetic_root, tokenizer_dirs, tmp_path):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    random_hf_source("blip2_opt_ext", tmp_path / "src")
    code = hf_bridge.main(["import", str(tmp_path / "src"), str(tmp_path / "ours"),
                           "--qformer-tokenizer", str(tokenizer_dirs["bert"])])
    assert code == 0
    cfg = OmegaConf.load(tmp_path / "ours" / "model.yaml")
    from lavis_ext.config import model_keys_for

    assert set(cfg.model) <= model_keys_for(cfg.model.arch)
    built = registry.get_model_class(cfg.model.arch).from_config(cfg.model)
    reference = hf_bridge.from_hf(str(tmp_path / "src"), qformer_tokenizer=str(tokenizer_dirs["bert"]), numerics="lavis")
    a, b = built.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built.ln_vision.eps == reference.ln_vision.eps == 1e-5  # the YAML keeps LAVIS's numerics
    with pytest.raises(ValueError, match="numerics"):
        hf_bridge.from_hf(str(tmp_path / "src"), numerics="torch")


def test_export_of_a_trained_run_loads_with_stock_classes(trained_caption_run, tmp_path):
    from lavis_ext.inference import Decoding, load

    assert hf_bridge.main(["export", str(trained_caption_run), str(tmp_path / "hf")]) == 0
    hf_model, processor = load_stock(tmp_path / "hf")
    predictor = load(trained_caption_run, device="cpu")
    pil = pil_images(4, seed=5)
    for beams in (1, 3):
        ours = predictor.caption(pil, decoding=Decoding(num_beams=beams, max_new_tokens=12, min_new_tokens=1))
        assert ours == hf_captions(hf_model, processor, pil, predictor.caption_prompt, num_beams=beams, max_new_tokens=12)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "caption_opt" in card or "captioning" in card  # the source run config is recorded
    assert "max |lavis-ext - this export| of the LLM prefix on random images" in card


def test_lora_is_merged_before_export(synthetic_root, tmp_path):
    ours = aligned_tiny("blip2_opt_ext")
    from lavis_ext.models.strategies import inject_lora

    inject_lora(ours.opt_model, {"r": 4}, "opt", "model.lora_llm").eval()  # (new dropout layers start in train mode)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-trivial adapter
    pixel = images(2)
    with torch.no_grad():
        before = our_logits(ours, pixel, ["a photo of"] * 2)
    with pytest.raises(ValueError, match="merge LoRA"):
        hf_bridge.to_hf_state(ours.state_dict(), "opt")
    hf_bridge.export_hf(ours, tmp_path / "hf")
    hf_model, processor = load_stock(tmp_path / "hf")
    with torch.no_grad():
        after = hf_logits(hf_model, processor, pixel, ["a photo of"] * 2)
    assert (before - after[..., : before.shape[-1]]).abs().max().item() < 1e-4
    assert "LoRA layers merged into their base weights: " in (tmp_path / "hf" / "README.md").read_text()


def test_qformer_text_input_is_refused(synthetic_root):
    model = tiny_model("blip2_t5_ext", qformer_text_input=True)
    with pytest.raises(ValueError, match="qformer_text_input"):
        hf_bridge.hf_config_for(model)


def test_mapping_table_covers_every_tensor(synthetic_root):
    table = hf_bridge.mapping_table_markdown()
    assert table.count("\n") == len(hf_bridge.KEY_TABLE) + 1
    assert "`ln_vision.{p}` | `vision_model.post_layernorm.{p}`" in table


@pytest.mark.slow  # about a minute and 4 GB: real-width OPT-2.7B and ViT-g, exported, imported and rebuilt
def test_import_of_a_release_shaped_hf_checkpoint(release_artifacts, tmp_path):
    """`lavis-ext hf import` of a Salesforce/blip2-opt-2.7b-shaped directory (real widths and vocabulary,
    reduced depth, sharded safetensors + index, processor and tokenizer files) rebuilds the same model."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf
    from release_fixture import hf_blip2_dir, release_model, snapshot_dir

    source = release_model(release_artifacts, "opt2.7b")
    src = hf_blip2_dir(source, tmp_path / "blip2-opt-2.7b")
    config = json.loads((src / "config.json").read_text())
    assert {"vision_config", "qformer_config", "text_config"} <= set(config)
    assert (config["vision_config"]["hidden_size"], config["text_config"]["hidden_size"]) == (1408, 2560)
    assert config["image_token_index"] == 50265  # the first spare row of OPT's 50272, as in the hub repo
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert (src / "preprocessor_config.json").is_file() and (src / "vocab.json").is_file()
    reference = source.state_dict()
    del source
    bert = snapshot_dir(release_artifacts.hf_home, "bert-base-uncased")
    assert hf_bridge.main(["import", str(src), str(tmp_path / "ours"), "--qformer-tokenizer", str(bert)]) == 0
    cfg = OmegaConf.load(tmp_path / "ours" / "model.yaml").model
    built = registry.get_model_class(cfg.arch).from_config(cfg)
    assert len(built.visual_encoder.blocks) == 2 and built.visual_encoder.embed_dim == 1408
    assert built.opt_model.config.vocab_size == 50272 and len(built.opt_tokenizer) == 50266  # + <image>
    ours = built.state_dict()
    assert set(ours) == set(reference)
    different = [k for k in ours if not torch.equal(ours[k].float(), reference[k].float())]
    assert different == [], different[:5]
