"""Precision: the one owner of which dtype each part of a run stores and computes in.

Why a module of its own: LAVIS's ``Blip2Base.maybe_autocast`` enters CUDA autocast in float16 (``amp.autocast``) on any
non-CPU device. Nested inside the run's autocast it overrode ``run.amp_dtype: bf16``, computed in fp16 under
``amp: false``, and ran a trainable fp32 ViT in fp16 (the divergence LAVIS#409 reports). The rule here:

- the run decides: ``run.amp`` / ``run.amp_dtype`` give one autocast dtype for the whole step
  (:func:`run_autocast`; ``None`` means fp32);
- a block *stored* in half precision (a frozen ViT with ``vit_precision: fp16``, an LLM with
  ``llm_precision: fp16|bf16``) computes in its storage dtype whatever the run says: its weights are already
  half, and autocasting them to another dtype would re-round every weight on every op (:func:`block_autocast`);
- every other block computes in the run's dtype: it adds no autocast of its own.

The models ask :func:`block_autocast` through their ``maybe_autocast`` (``models/components.py``); the training
loop (``runners/loop.py``) and the tasks' evaluation ask :func:`run_autocast`; the runner asks :func:`resolve_amp_dtype` whether a loss scaler is needed; FSDP and
the model builders read dtype names through :func:`parse_dtype`.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
HALF = (torch.float16, torch.bfloat16)
_warned_fp16: set = set()  # families warned about, once per process


def parse_dtype(name, key: str) -> torch.dtype:
    """A config value ('fp16', 'bf16', 'fp32' or the torch spellings) -> the torch dtype, or an error naming
    ``key``, the bad value and the valid ones."""
    text = str(name).lower()
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"{key} {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[text]


def resolve_amp_dtype(run_cfg, device: torch.device, model=None) -> torch.dtype | None:
    """The autocast dtype of a run: None (fp32) with ``amp: false``, else ``amp_dtype``.

    On a CPU only bf16 autocasts (a recipe's ``amp: true, amp_dtype: bf16`` runs as it would on a GPU, e.g. when
    a recipe is checked on a laptop); fp16 autocast is not a CPU training path, so ``fp16`` runs fp32 there.
    A family that overflows in fp16 (``LLMSpec.never_fp16``: Flan-T5, transformers#23918; the paper and LAVIS
    run it in bf16) is autocast in bf16 instead, with a warning.
    """
    if not run_cfg.get("amp", False):
        return None
    dtype = parse_dtype(run_cfg.get("amp_dtype", "bf16"), "run.amp_dtype")
    if dtype == torch.float32:
        return None
    if device.type == "cpu":
        return dtype if dtype == torch.bfloat16 else None
    from lavis_ext.models.llm_specs import spec_of  # the models import this module: resolved at call time

    spec = spec_of(model) if model is not None else None
    if dtype == torch.float16 and spec is not None and spec.never_fp16:
        if spec.family not in _warned_fp16:
            logger.warning("run.amp_dtype fp16 overflows %s; autocasting in bf16 instead", spec.family)
            _warned_fp16.add(spec.family)
        dtype = torch.bfloat16
    return dtype


def run_autocast(run_cfg, device: torch.device, model=None):
    """The context one training or evaluation step runs in (see :func:`resolve_amp_dtype`)."""
    dtype = resolve_amp_dtype(run_cfg or {}, device, model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def storage_half_dtype(block: nn.Module) -> torch.dtype | None:
    """The half dtype ``block``'s weights are stored in, or None for an fp32 block.

    LAVIS's ``convert_weights_to_fp16`` halves a ViT's linear and conv weights but leaves its norms in fp32, so
    one half-precision tensor makes the block a half block.
    """
    for param in block.parameters():
        if param.dtype in HALF:
            return param.dtype
    return None


def block_autocast(block: nn.Module):
    """The context ``block`` (a ViT, a Q-Former, an LLM) computes in: its storage dtype when that is half,
    otherwise whatever the run's autocast says (no context of its own)."""
    dtype = storage_half_dtype(block)
    if dtype is None:
        return contextlib.nullcontext()
    device = next(block.parameters()).device
    return torch.autocast(device_type=device.type, dtype=dtype)
