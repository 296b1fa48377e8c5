"""The precision policy (lavis_ext/precision.py), proven on a CPU by faking the GPU.

The fake: the model reports ``device == cuda`` (the check LAVIS's ``maybe_autocast`` makes) and every CUDA
autocast the code enters (ours through ``torch.autocast``, LAVIS's through ``torch.cuda.amp.autocast``) becomes
the CPU autocast of the same dtype, so it takes effect on CPU tensors. Forward hooks record the dtype the first
linear layer of each block computes in: ViT, Q-Former, LLM.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.eva_vit import convert_weights_to_fp16

from lavis_ext import precision
from lavis_ext.tasks.base import TaskExtMixin
from tiny_models import images, tiny_model

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA = torch.device("cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Models report cuda; CUDA autocast contexts run as CPU autocast of the same dtype."""
    cpu_autocast = torch.amp.autocast_mode.autocast

    def translated(device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        return cpu_autocast("cpu", dtype=dtype, enabled=enabled)

    monkeypatch.setattr(torch, "autocast", translated)
    monkeypatch.setattr(torch.cuda.amp, "autocast", lambda dtype=F16, **kw: translated("cuda", dtype=dtype))
    monkeypatch.setattr(Blip2Base, "device", property(lambda self: CUDA))


def first_linear(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


def llm_of(model):
    return model.opt_model if hasattr(model, "opt_model") else model.t5_model


def compute_dtypes(model, run_cfg: dict) -> dict:
    """One training forward under the run's autocast (as the task enters it) -> dtype per block."""
    seen: dict = {}
    # EVA's attention calls F.linear on its qkv weight (no module call): its MLP's fc1 is watched instead
    blocks = {"vit": model.visual_encoder.blocks[0].mlp, "qformer": model.Qformer, "llm": llm_of(model)}

    def recorder(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is kept
        return hook

    hooks = [first_linear(block).register_forward_hook(recorder(name)) for name, block in blocks.items()]
    task = TaskExtMixin()
    task.run_cfg = run_cfg
    try:
        with task._autocast(CUDA, model):
            model({"image": images(2), "text_input": ["a red circle", "a blue square"]})
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def build(arch: str, frozen_vit: bool, llm_storage: torch.dtype):
    """A tiny model stored as the release recipes store it on a GPU: a frozen ViT halved by LAVIS's own
    converter (norms stay fp32), the LLM in ``llm_precision``; trainable parts in fp32."""
    model = tiny_model(arch, freeze_vit=frozen_vit)
    if frozen_vit:
        convert_weights_to_fp16(model.visual_encoder)
    llm_of(model).to(llm_storage)
    return model


AMP_OFF = {"amp": False}
AMP_BF16 = {"amp": True, "amp_dtype": "bf16"}
AMP_FP16 = {"amp": True, "amp_dtype": "fp16"}

# (arch, frozen ViT stored fp16?, LLM storage, run) -> the dtype ViT / Q-Former / LLM compute in
CASES = [
    # amp off: fp32 everywhere a block is stored fp32 (LAVIS computed all of it in fp16 on a GPU)
    ("blip2_opt_ext", False, F32, AMP_OFF, {"vit": F32, "qformer": F32, "llm": F32}),
    ("blip2_t5_ext", False, F32, AMP_OFF, {"vit": F32, "qformer": F32, "llm": F32}),
    # the paper's storage (frozen fp16 ViT, OPT in fp16, T5 in bf16): half blocks compute in their storage dtype
    ("blip2_opt_ext", True, F16, AMP_OFF, {"vit": F16, "qformer": F32, "llm": F16}),
    ("blip2_t5_ext", True, BF16, AMP_OFF, {"vit": F16, "qformer": F32, "llm": BF16}),
    # amp bf16: the run's dtype reaches every fp32 block (LAVIS overrode it with fp16 in the ViT and the LLM)
    ("blip2_opt_ext", False, F32, AMP_BF16, {"vit": BF16, "qformer": BF16, "llm": BF16}),
    ("blip2_t5_ext", False, F32, AMP_BF16, {"vit": BF16, "qformer": BF16, "llm": BF16}),
    ("blip2_opt_ext", True, F16, AMP_BF16, {"vit": F16, "qformer": BF16, "llm": F16}),
    ("blip2_t5_ext", True, BF16, AMP_BF16, {"vit": F16, "qformer": BF16, "llm": BF16}),
    # amp fp16: OPT in fp16; Flan-T5 overflows in fp16, so its run autocasts in bf16
    ("blip2_opt_ext", False, F32, AMP_FP16, {"vit": F16, "qformer": F16, "llm": F16}),
    ("blip2_t5_ext", False, F32, AMP_FP16, {"vit": BF16, "qformer": BF16, "llm": BF16}),
]


@pytest.mark.parametrize("arch,frozen_vit,llm_storage,run,expected", CASES)
def test_each_block_computes_in_the_dtype_the_policy_names(
    synthetic_root, fake_gpu, arch, frozen_vit, llm_storage, run, expected
):
    model = build(arch, frozen_vit, llm_storage)
    assert compute_dtypes(model, run) == expected


def test_the_fake_gpu_reproduces_lavis_forced_fp16(synthetic_root, fake_gpu, monkeypatch):
    """Guard on the fake itself: with LAVIS's own ``maybe_autocast`` back, a trainable fp32 ViT computes in fp16
    under ``amp: false`` (the bug), so the cases above would catch its return."""
    monkeypatch.setattr(
        type(tiny_model("blip2_opt_ext")), "maybe_autocast",
        lambda self, dtype=F16, block=None: Blip2Base.maybe_autocast(self, dtype=dtype),
    )
    model = build("blip2_opt_ext", frozen_vit=False, llm_storage=F32)
    seen = compute_dtypes(model, AMP_OFF)
    assert seen["vit"] == F16 and seen["llm"] == F16


def test_generation_follows_the_same_policy(synthetic_root, fake_gpu):
    """Decoding outside any run autocast: an fp32 LLM decodes in fp32, an fp16-stored one in fp16."""
    for storage in (F32, F16):
        model = build("blip2_opt_ext", frozen_vit=False, llm_storage=storage).eval()
        seen = []
        hook = first_linear(model.opt_model).register_forward_hook(lambda m, i, out: seen.append(out.dtype) and None)
        with torch.no_grad():
            model.generate({"image": images(1)}, max_length=3, num_beams=1)
        hook.remove()
        assert set(seen) == {storage}


def test_storage_half_dtype_sees_a_partly_halved_block():
    vit = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert precision.storage_half_dtype(vit) is None
    vit[0].half()  # LAVIS's converter halves linear/conv weights only
    assert precision.storage_half_dtype(vit) == F16
    assert isinstance(precision.block_autocast(torch.nn.Linear(2, 2)), contextlib.nullcontext)


def test_dtype_names_have_one_table_and_a_clear_error():
    assert precision.parse_dtype("bfloat16", "k") == BF16 and precision.parse_dtype("fp16", "k") == F16
    with pytest.raises(ValueError, match=r"model.llm_precision 'int4' is not one of \['bf16', 'fp16', 'fp32'\]"):
        precision.parse_dtype("int4", "model.llm_precision")
    assert precision.resolve_amp_dtype({"amp": True, "amp_dtype": "fp32"}, CUDA) is None
