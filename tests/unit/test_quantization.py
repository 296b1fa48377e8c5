"""8/4-bit frozen LLM (``model.llm_quantization``, QLoRA): the config checks, the ``BitsAndBytesConfig`` the
build hands to ``from_pretrained``, and real 8/4-bit tiny LLMs trained through LoRA adapters on this CPU.

bitsandbytes (0.50.2 tested) has a CPU backend for its 8-bit and 4-bit linear layers (forward and backward), so
the training tests run here when it is installed (``pip install 'lavis-ext[quant]'``); without it they
skip and the config/build tests still run. The quantised LLM is loaded from a ``save_pretrained``
directory of the tiny LLM: quantisation needs pretrained weights, exactly as with a hub model.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from tiny_models import images, tiny_model

from lavis_ext.models.llm_specs import OPT, QUANTIZATION_DEFAULTS, T5, LLMQuantization

LLM = {"blip2_opt_ext": "opt_model", "blip2_t5_ext": "t5_model"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _bnb_cpu_problem() -> str | None:
    """Why 8/4-bit layers cannot run here (None: they can): a real 4-bit and 8-bit matmul, forward and backward."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'lavis-ext[quant]')"
    try:
        import bitsandbytes as bnb

        x = torch.randn(2, 64, requires_grad=True)
        for layer in (bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32), bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)):
            layer.to("cpu")
            layer(x).sum().backward()
    except Exception as exc:  # any failure means: this bitsandbytes build has no CPU path for these layers
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 8/4-bit linear layers on this CPU: {exc}"
    return None


BNB_PROBLEM = _bnb_cpu_problem()
needs_bnb_cpu = pytest.mark.skipif(BNB_PROBLEM is not None, reason=str(BNB_PROBLEM))


def _batch(arch):
    if arch == "blip2_t5_ext":
        return {"image": images(4), "text_input": ["what colour is the circle?"] * 4, "text_output": ["red"] * 4}
    return {"image": images(4), "text_input": ["a photo of a red circle left of a blue square"] * 4}


@pytest.fixture(scope="module")
def saved_llms(synthetic_root, tmp_path_factory) -> dict:
    """The tiny OPT and T5 LLMs written with ``save_pretrained``: the 'pretrained weights' to quantise."""
    out = {}
    for arch, attr in LLM.items():
        path = tmp_path_factory.mktemp(attr)
        getattr(tiny_model(arch, seed=0), attr).save_pretrained(path)
        out[arch] = str(path)
    return out


def _quantized(arch, saved_llms, quantization, precision, **extra):
    return tiny_model(arch, seed=0, **{
        LLM[arch]: saved_llms[arch], "freeze_llm": True, "llm_precision": precision,
        "llm_quantization": quantization, "lora_llm": LORA, **extra,
    })


# ---- config: values and combinations -------------------------------------------------------------------
def test_defaults_are_stated_once_and_parse():
    assert LLMQuantization.from_config({}, OPT) is None
    q = LLMQuantization.from_config({"llm_quantization": "4bit"}, T5)
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (
        4, QUANTIZATION_DEFAULTS["llm_4bit_quant_type"], QUANTIZATION_DEFAULTS["llm_4bit_double_quant"], None)
    q = LLMQuantization.from_config({"llm_quantization": "4bit", "llm_4bit_quant_type": "fp4",
                                     "llm_4bit_double_quant": False, "llm_4bit_compute_dtype": "bf16"}, OPT)
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("fp4", False, torch.bfloat16)
    assert LLMQuantization.from_config({"llm_quantization": "8bit"}, OPT).bits == 8


@pytest.mark.parametrize("cfg, spec, message", [
    ({"llm_quantization": "3bit"}, OPT, "model.llm_quantization '3bit' is not one of null, 8bit, 4bit"),
    ({"llm_quantization": "4bit", "llm_4bit_quant_type": "nf5"}, OPT, "model.llm_4bit_quant_type 'nf5'"),
    ({"llm_quantization": "8bit", "llm_4bit_quant_type": "nf4"}, OPT, "applies to 4-bit only"),
    ({"llm_4bit_double_quant": False}, OPT, "model.llm_quantization is not 4bit"),
    ({"llm_quantization": "4bit", "freeze_llm": False}, OPT, "model.freeze_llm false"),
    ({"llm_quantization": "4bit", "llm_4bit_compute_dtype": "fp16"}, T5, "fp16 overflows t5"),
    ({"llm_quantization": "4bit", "llm_4bit_compute_dtype": "fp8"}, OPT, "model.llm_4bit_compute_dtype 'fp8'"),
])
def test_bad_values_and_combinations_fail_naming_the_key(cfg, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLMQuantization.from_config(cfg, spec)


def test_full_finetuning_of_a_quantized_llm_fails_before_any_weights_load(synthetic_root, saved_llms):
    with pytest.raises(ValueError, match="lora_llm"):
        tiny_model("blip2_opt_ext", opt_model=saved_llms["blip2_opt_ext"], freeze_llm=False, llm_quantization="4bit")


def test_quantizing_a_randomly_initialised_llm_fails(synthetic_root):
    with pytest.raises(ValueError, match="model.opt_model is empty"):
        tiny_model("blip2_opt_ext", freeze_llm=True, llm_quantization="8bit")


def test_missing_bitsandbytes_names_the_extra(synthetic_root, saved_llms, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"lavis-ext\[quant\]"):
        tiny_model("blip2_t5_ext", t5_model=saved_llms["blip2_t5_ext"], freeze_llm=True, llm_quantization="4bit")


def test_the_project_config_accepts_the_keys(synthetic_root):
    from lavis_ext.config import model_keys_for

    for arch in ("blip2_opt_ext", "blip2_t5_ext"):
        assert set(QUANTIZATION_DEFAULTS) <= model_keys_for(arch)
    assert not set(QUANTIZATION_DEFAULTS) & model_keys_for("blip2_qformer_ext")  # no LLM to quantise


# ---- the build call ------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="BitsAndBytesConfig needs bitsandbytes installed")
@pytest.mark.parametrize("arch, precision, cfg, expect", [
    ("blip2_opt_ext", "fp16", {"llm_quantization": "4bit"},
     {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": torch.float16}),
    ("blip2_t5_ext", "bf16", {"llm_quantization": "4bit", "llm_4bit_quant_type": "fp4", "llm_4bit_double_quant": False},
     {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": torch.bfloat16}),
    ("blip2_opt_ext", "fp16", {"llm_quantization": "8bit"}, {"load_in_8bit": True, "load_in_4bit": False}),
])
def test_from_pretrained_gets_the_bitsandbytes_config(synthetic_root, saved_llms, monkeypatch, arch, precision, cfg, expect):
    import transformers

    cls = transformers.OPTForCausalLM if arch == "blip2_opt_ext" else transformers.T5ForConditionalGeneration
    calls = []
    real = cls.from_pretrained.__func__

    def spy(klass, source, *args, **kwargs):
        calls.append(kwargs)
        return real(klass, source, *args, **{k: v for k, v in kwargs.items() if k != "quantization_config"})

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    tiny_model(arch, **{LLM[arch]: saved_llms[arch], "freeze_llm": True, "llm_precision": precision, **cfg})
    (kwargs,) = calls
    config = kwargs["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert {k: getattr(config, k) for k in expect} == expect
    assert kwargs["torch_dtype"] == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# ---- real 8/4-bit layers on this CPU -------------------------------------------------------------------
@needs_bnb_cpu
@pytest.mark.parametrize("arch, quantization, precision", [
    ("blip2_opt_ext", "4bit", "bf16"), ("blip2_t5_ext", "4bit", "bf16"),
    ("blip2_opt_ext", "8bit", "fp16"), ("blip2_t5_ext", "8bit", "bf16"),
])
def test_lora_on_a_quantized_llm_trains_and_leaves_its_weights(synthetic_root, saved_llms, one_thread, arch, quantization, precision):
    import bitsandbytes as bnb

    model = _quantized(arch, saved_llms, quantization, precision)
    llm = getattr(model, LLM[arch])
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    quantized = [name for name, m in llm.named_modules() if isinstance(m, kind)]
    assert quantized, f"no {kind.__name__} layer in the LLM"
    # QLoRA: adapters trainable and fp32; the LLM's own tensors frozen, unquantised ones upcast to fp32
    adapters = {n: p for n, p in llm.named_parameters() if ".lora_" in n}
    assert adapters and all(p.requires_grad and p.dtype == torch.float32 for p in adapters.values())
    base = {n: p for n, p in llm.named_parameters() if ".lora_" not in n}
    assert not any(p.requires_grad for p in base.values())
    assert {p.dtype for p in base.values()} <= {torch.float32, torch.uint8, torch.int8}
    assert {torch.uint8 if quantization == "4bit" else torch.int8} <= {p.dtype for p in base.values()}

    frozen = {n: p.detach().clone() for n, p in base.items()}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(_batch(arch))["loss"]
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        # every adapter pair gets a gradient through the quantised matmul (B starts at zero, A's gradient then
        # is zero on the first step only)
        assert all(adapters[n].grad is not None and torch.isfinite(adapters[n].grad).all() for n in adapters)
        optimizer.step()
    assert all(torch.equal(frozen[n], p) for n, p in base.items()), "a quantised or frozen LLM tensor changed"
    changed = [n for n in adapters if not torch.equal(before[n], adapters[n])]
    assert len(changed) == len(adapters), f"adapters that did not train: {sorted(set(adapters) - set(changed))[:4]}"


@needs_bnb_cpu
def test_frozen_quantized_llm_without_lora_keeps_its_storage_dtype(synthetic_root, saved_llms, one_thread):
    """Q-Former-only training on a 4-bit LLM: no QLoRA preparation, the LLM computes in its storage dtype
    (bf16 here) and the loss reaches the Q-Former through the 4-bit layers."""
    model = tiny_model("blip2_t5_ext", seed=0, t5_model=saved_llms["blip2_t5_ext"], freeze_llm=True,
                       llm_precision="bf16", llm_quantization="4bit")
    llm = model.t5_model
    assert not any(p.requires_grad for p in llm.parameters())
    assert torch.bfloat16 in {p.dtype for p in llm.parameters()}
    loss = model(_batch("blip2_t5_ext"))["loss"]
    loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0


@needs_bnb_cpu
def test_a_4bit_qlora_run_trains_through_train_py(synthetic_root, saved_llms, tmp_path):
    """The real entry point: a project YAML's model section plus ``--options`` picks 4-bit + LoRA, the runner
    builds, trains an epoch of the small synthetic set (the CPU fp32 cast of the task keeps the packed weights) and saves adapters."""
    from tiny_models import QUICK

    from lavis_ext import cli
    from lavis_ext.checkpoints import read_checkpoint

    runner = cli.train([
        "--cfg-path", "projects/tiny/caption_opt.yaml",
        "--options", *QUICK, f"run.output_dir={tmp_path}",
        "run.valid_splits=[]", "run.test_splits=[]",
        f"model.opt_model={saved_llms['blip2_opt_ext']}", "model.freeze_llm=true", "model.llm_precision=bf16",
        "model.llm_quantization=4bit", "model.lora_llm.r=4", "model.lora_llm.alpha=8",
    ])
    import bitsandbytes as bnb

    llm = getattr(runner.unwrap_dist_model(runner.model), "opt_model")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules())
    saved = list(tmp_path.rglob("checkpoint_*.safetensors"))
    assert saved, list(tmp_path.rglob("*"))
    names = read_checkpoint(saved[0])[0].keys()
    assert any(".lora_A." in n for n in names)
