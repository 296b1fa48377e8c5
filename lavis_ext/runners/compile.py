"""``run.compile``: ``torch.compile`` of the model's three towers (vision encoder, Q-Former, LLM).

Why the towers and not ``model.forward``: a BLIP-2 forward tokenises text with Python tokenizers and builds its
targets from Python lists, which would break a whole-forward graph at every call; the towers take and return
tensors only. ``nn.Module.compile`` compiles each tower in place, so parameter names, state dicts and checkpoints are
unchanged (``torch.compile(model)`` would wrap the model and prefix every key with ``_orig_mod.``), and DDP / FSDP
wrap the model as before.

Off by default: on a CPU at the tiny size the compiled step is no faster than eager (0.87-0.97x, BENCHMARKS.md,
training step) and the first step costs about a minute of compilation; it is meant for GPUs, where it fuses the
element-wise work between matmuls (not measured yet).
Results equal eager within float rounding (``tests/unit/test_compile.py``); dropout draws its random numbers
from the compiled kernels' own generator, so a training run is not bitwise the eager run.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lavis_ext.models.llm_specs import spec_of

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes; ``run.compile: true`` is ``default``."""


def compile_mode(setting: Any) -> str | None:
    """``run.compile`` -> the torch.compile mode, or None to run eagerly.

    Raises:
        ValueError: anything but a boolean or one of :data:`COMPILE_MODES`.
    """
    if setting is None or setting is False:
        return None
    if setting is True:
        return "default"
    if isinstance(setting, str) and setting in COMPILE_MODES:
        return setting
    raise ValueError(f"run.compile {setting!r}: use true, false or a torch.compile mode ({', '.join(COMPILE_MODES)})")


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The tensor-only blocks the model calls: ``visual_encoder``, ``Qformer.bert`` (BLIP-2 calls the BERT trunk
    directly; the stage-1 LM head calls it too) and the LLM of its family (``opt_model`` / ``t5_model``)."""
    core = getattr(model, "module", model)
    found = {}
    if isinstance(getattr(core, "visual_encoder", None), nn.Module):
        found["visual_encoder"] = core.visual_encoder
    qformer = getattr(core, "Qformer", None)
    if isinstance(getattr(qformer, "bert", None), nn.Module):
        found["Qformer.bert"] = qformer.bert
    spec = spec_of(core)
    if spec is not None:
        found[spec.attr] = getattr(core, spec.attr)
    return found


def compile_towers(model: nn.Module, setting: Any, backend: str = "inductor") -> list[str]:
    """Compile ``model``'s towers in place when ``run.compile`` (``setting``) asks for it; returns their names
    (empty when it does not). ``backend`` is torch.compile's (the tests use ``eager`` to check the wiring fast)."""
    mode = compile_mode(setting)
    if mode is None:
        return []
    blocks = towers(model)
    if not blocks:
        raise ValueError(f"run.compile: {type(model).__name__} has none of the towers it compiles (visual_encoder, "
                         "Qformer.bert, the LLM); set run.compile: false")
    # backend "inductor" takes a mode; other backends (eager, aot_eager) reject one
    options = {"mode": mode} if backend == "inductor" else {}
    for block in blocks.values():
        block.compile(backend=backend, **options)
    logger.info("run.compile (%s): compiled %s; the first steps compile (minutes on a CPU)", mode, ", ".join(blocks))
    return list(blocks)
