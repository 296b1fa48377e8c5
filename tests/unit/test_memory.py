"""lavis_ext.memory: the figures computed from a meta build equal a real tiny model's bytes (weights, 8/4-bit
weights with their scales, and the tensors autograd saves for the backward)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import images, tiny_config, tiny_model

from lavis_ext import memory
from lavis_ext.models.llm_specs import OPT, T5, LLMQuantization
from lavis_ext.models.meta import build_on_meta

LLM = {"blip2_opt_ext": "opt_model", "blip2_t5_ext": "t5_model"}
SPEC = {"blip2_opt_ext": OPT, "blip2_t5_ext": T5}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _real_bytes(model) -> int:
    """What the model really holds: each parameter storage once, and for bitsandbytes layers their scales."""
    storages = {}

    def add(t):
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for param in model.parameters():
        add(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            add(state.absmax), add(state.code)
            if state.nested:
                add(state.state2.absmax), add(state.state2.code), add(state.offset)
        add(getattr(param, "SCB", None))
    return sum(storages.values())


@pytest.mark.parametrize("arch, overrides", [
    ("blip2_opt_ext", {}),
    ("blip2_t5_ext", {"freeze_vit": True, "freeze_llm": True, "llm_precision": "bf16"}),
    ("blip2_opt_ext", {"freeze_llm": True, "llm_precision": "fp16", "lora_llm": LORA}),
])
def test_meta_figures_equal_the_real_tiny_model(synthetic_root, arch, overrides):
    real = tiny_model(arch, **overrides)
    on_meta = build_on_meta(tiny_config(arch, **overrides))
    figures = memory.state_bytes(on_meta)
    assert figures["weights"] == _real_bytes(real)
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert figures["trainable"] == trainable
    assert (figures["gradients"], figures["optimizer"]) == (4 * trainable, 8 * trainable)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install 'lavis-ext[quant]')")
@pytest.mark.parametrize("arch, quantization, extra", [
    ("blip2_opt_ext", "4bit", {}),
    ("blip2_t5_ext", "4bit", {"llm_4bit_double_quant": False}),
    ("blip2_t5_ext", "8bit", {}),
    ("blip2_opt_ext", "4bit", {"lora_llm": None}),  # Q-Former only on a 4-bit LLM: no QLoRA fp32 cast
])
def test_quantized_figures_equal_the_bytes_bitsandbytes_holds(synthetic_root, tmp_path, arch, quantization, extra):
    """The meta build knows which layers transformers quantises (T5 keeps ``wo`` in fp32) and their packed size."""
    getattr(tiny_model(arch), LLM[arch]).save_pretrained(tmp_path)
    overrides = {LLM[arch]: str(tmp_path), "freeze_llm": True, "llm_precision": "bf16", "llm_quantization": quantization,
                 "lora_llm": LORA, **extra}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    real = tiny_model(arch, **overrides)
    cfg = tiny_config(arch, **overrides)
    figures = memory.state_bytes(build_on_meta(cfg), LLMQuantization.from_config(cfg, SPEC[arch]))
    assert figures["weights_quantized"] > 0
    assert figures["weights"] == _real_bytes(real)


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext"])
def test_activation_bytes_on_meta_equal_those_saved_on_cpu(synthetic_root, arch):
    """fp32 (no autocast to emulate): the meta forward saves exactly the bytes the real forward saves."""
    overrides = {"freeze_llm": True, "lora_llm": LORA}
    cfg = OmegaConf.create({"model": tiny_config(arch, **overrides), "run": {"batch_size_train": 3, "task": "captioning_ext"}})
    wrap = type("Cfg", (), {"model_cfg": cfg.model, "run_cfg": cfg.run})
    torch.manual_seed(0)
    real = tiny_model(arch, **overrides).train()
    samples = memory.recipe_samples(wrap, device="cpu")
    samples["image"] = images(3)
    expected = memory.saved_activation_bytes(real, samples, None)
    on_meta = build_on_meta(cfg.model).train()
    assert memory.saved_activation_bytes(on_meta, memory.recipe_samples(wrap), None) == expected
    assert expected > 0


def test_emulated_bf16_autocast_is_close_to_cpu_autocast(synthetic_root):
    """bf16: the emulation follows CUDA's cast lists, CPU autocast's differ a little (e.g. layer_norm runs in
    its input dtype on CPU): the two counts agree within 15%."""
    arch, overrides = "blip2_opt_ext", {"freeze_llm": True, "lora_llm": LORA}
    cfg = OmegaConf.create({"model": tiny_config(arch, **overrides), "run": {"batch_size_train": 3, "task": "captioning_ext"}})
    wrap = type("Cfg", (), {"model_cfg": cfg.model, "run_cfg": cfg.run})
    real = tiny_model(arch, **overrides).train()
    samples = memory.recipe_samples(wrap, device="cpu")
    samples["image"] = images(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on_cpu = memory.saved_activation_bytes(real, samples, None)
    emulated = memory.saved_activation_bytes(build_on_meta(cfg.model).train(), memory.recipe_samples(wrap), torch.bfloat16)
    assert abs(emulated - on_cpu) / on_cpu < 0.15, (emulated, on_cpu)


def test_a_real_size_4bit_recipe_is_smaller_than_its_16bit_sibling(synthetic_root):
    base = "projects/blip2/opt6.7b/caption_coco_ft_lora.yaml"
    plain = memory.estimate(base)
    quant = memory.estimate("projects/blip2/opt6.7b/caption_coco_ft_lora_4bit.yaml")
    assert quant["trainable"] == plain["trainable"]
    # OPT-6.7B's linears: 6.4e9 weights, fp16 (2 B) vs NF4 with double-quantised scales (~0.51 B)
    assert 5e9 < plain["weights"] - quant["weights"] < 12e9


@pytest.mark.slow
def test_docs_memory_md_is_current():
    result = subprocess.run([sys.executable, "-m", "lavis_ext.memory", "--table", "--markdown", "docs/memory.md", "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
