"""What a run trains: freezing, LoRA (through peft, in place), gradient checkpointing, and a report.

All of it is chosen in the model YAML and composes (e.g. LoRA on the LLM with the ViT unfrozen):

* ``freeze_vit`` / ``freeze_llm`` (LAVIS's keys, applied when the model is built) and ``freeze_qformer``
  (the Q-Former, its query tokens; the projection into the LLM stays trainable);
* ``lora_llm`` / ``lora_qformer``: ``{r, alpha, dropout, bias, target_modules}``; ``target_modules:
  null`` takes the family preset (:data:`LORA_PRESETS`). peft's ``inject_adapter_in_model`` swaps the
  target ``nn.Linear`` layers for LoRA layers inside the existing module, so LAVIS's ``forward`` and our
  ``generate`` run unchanged, and freezes that module's base weights;
* ``use_grad_checkpoint`` (ViT, LAVIS's key), ``qformer_grad_checkpoint``, ``llm_grad_checkpoint``;
* ``llm_quantization: 8bit|4bit`` (loaded by :class:`lavis_ext.models.llm_specs.LLMQuantization`) with
  ``lora_llm``: QLoRA. peft's ``prepare_model_for_kbit_training`` runs before the adapters go in (the
  LLM's unquantised parameters, norms and embeddings, go to fp32 for stable gradients through it), and
  peft then wraps the bitsandbytes layers in its bnb LoRA layers; the adapters are fp32 like every
  trainable tensor (:func:`upcast_trainable`).

Presets as in the paper: Q-Former only (``freeze_vit: true``, ``freeze_llm: true``; stage 2 and
caption fine-tuning without the ViT), ViT unfrozen (``freeze_vit: false``; the ViT then stays fp32,
see :func:`lavis_ext.models.components.vision_kwargs`), LoRA (``lora_llm: {...}``), full
(everything false).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from lavis_ext.models.llm_specs import SPECS, spec_of
from lavis_ext.precision import HALF

logger = logging.getLogger(__name__)

#: target modules per family: the attention projections (peft's and the LoRA paper's default set).
LORA_PRESETS = {"qformer": ["query", "value"], **{f: list(s.lora_targets) for f, s in SPECS.items()}}
LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "bias": "none", "target_modules": None}


def llm_of(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(family, module) of the model's language model; (None, None) for the stage-1 Q-Former."""
    spec = spec_of(model)
    return (None, None) if spec is None else (spec.family, getattr(getattr(model, "module", model), spec.attr))


def lora_config(spec: Mapping[str, Any] | None, preset: str):
    """A peft ``LoraConfig`` from a YAML mapping; unknown keys fail naming the valid ones."""
    from peft import LoraConfig

    spec = dict(spec or {})
    unknown = set(spec) - set(LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown LoRA keys {sorted(unknown)}; valid: {sorted(LORA_DEFAULTS)}")
    merged = {**LORA_DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    targets = merged["target_modules"] or LORA_PRESETS[preset]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=int(merged["r"]),
        lora_alpha=float(merged["alpha"]),
        lora_dropout=float(merged["dropout"]),
        bias=str(merged["bias"]),
        target_modules=list(targets),
    )


def inject_lora(module: nn.Module, spec, preset: str, where: str) -> nn.Module:
    """LoRA adapters into ``module`` in place; its base weights become frozen, the adapters trainable."""
    from peft import inject_adapter_in_model

    config = lora_config(spec, preset)
    present = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    missing = sorted(set(config.target_modules) - present)
    if missing:
        raise ValueError(
            f"{where}.target_modules {missing} name no layer of the {preset} model; "
            f"the {preset} preset is {LORA_PRESETS[preset]}"
        )
    inject_adapter_in_model(config, module)
    logger.info("LoRA on %s: r=%d alpha=%s targets=%s", where, config.r, config.lora_alpha, sorted(config.target_modules))
    return module


def prepare_quantized_llm(llm: nn.Module) -> nn.Module:
    """QLoRA's preparation of an 8/4-bit LLM for adapters: peft's ``prepare_model_for_kbit_training``.

    It freezes the LLM and casts its half-precision parameters that bitsandbytes did not quantise (embeddings,
    norms, the LM head) to fp32. Its gradient checkpointing is left to ``llm_grad_checkpoint`` (non-reentrant:
    no input-grad hook needed), and no accelerator cache is emptied (only :mod:`lavis_ext.dist` touches CUDA).
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False, auto_clear_cache=False)


def _set_trainable(params, flag: bool) -> None:
    for param in params:
        param.requires_grad = flag


def apply_training_strategy(model: nn.Module, cfg) -> nn.Module:
    """Apply the strategy keys of a model config (see the module docstring) to a built model.

    Raises:
        ValueError: LoRA on a model without that component, or target modules that do not exist.
    """
    get = cfg.get
    family, llm = llm_of(model)
    if get("freeze_qformer", False):
        _set_trainable(model.Qformer.parameters(), False)
        model.query_tokens.requires_grad = False
    if get("lora_llm"):
        if llm is None:
            raise ValueError(f"lora_llm is set but {type(model).__name__} has no language model")
        if get("llm_quantization"):
            prepare_quantized_llm(llm)
        inject_lora(llm, get("lora_llm"), family, "model.lora_llm")
    if get("lora_qformer"):
        inject_lora(model.Qformer, get("lora_qformer"), "qformer", "model.lora_qformer")
    upcast_trainable(model)
    if get("qformer_grad_checkpoint", False):
        # LAVIS's BertEncoder checks this flag on its config in training mode.
        model.Qformer.config.gradient_checkpointing = True
    if get("llm_grad_checkpoint", False):
        if llm is None:
            raise ValueError(f"llm_grad_checkpoint is set but {type(model).__name__} has no language model")
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def upcast_trainable(model: nn.Module) -> int:
    """Keep every trainable tensor in fp32 (frozen towers may stay in half precision).

    AdamW updates on fp16/bf16 master weights lose small steps; autocast does the half-precision
    compute. peft's ``inject_adapter_in_model`` gives adapters the base layer's dtype (only
    ``PeftModel`` upcasts them), and a trainable LLM loaded in ``llm_precision`` fp16 needs the same.
    """
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in HALF:
            param.data = param.data.float()
            count += 1
    return count


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back; returns the count.

    peft's ``merge_and_unload`` lives on the tuner object, which ``inject_adapter_in_model`` does not
    keep; the per-layer ``merge`` plus swapping in ``get_base_layer()`` is the same operation.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


# ---- report -------------------------------------------------------------------------------------
def parameter_report(model: nn.Module) -> list[dict]:
    """Trainable and total parameters per top-level submodule (LoRA adapters counted separately)."""
    rows: dict[str, dict] = {}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        if ".lora_" in name:
            top = f"{top} (LoRA)"
        row = rows.setdefault(top, {"module": top, "trainable": 0, "total": 0})
        row["total"] += param.numel()
        if param.requires_grad:
            row["trainable"] += param.numel()
    return list(rows.values())


def format_parameter_report(model: nn.Module) -> str:
    """peft's ``print_trainable_parameters``, per submodule of the whole BLIP-2."""
    rows = parameter_report(model)
    trainable = sum(r["trainable"] for r in rows)
    total = sum(r["total"] for r in rows)
    width = max([len(r["module"]) for r in rows] + [len("total")])
    lines = [f"{'module':<{width}}  {'trainable':>15}  {'total':>15}  {'% trainable':>11}"]
    for row in rows + [{"module": "total", "trainable": trainable, "total": total}]:
        pct = 100.0 * row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append(f"{row['module']:<{width}}  {row['trainable']:>15,}  {row['total']:>15,}  {pct:>10.2f}%")
    return "\n".join(lines)


def finish_from_config(model: nn.Module, cfg) -> nn.Module:
    """The end of every ``from_config``: pretrained base weights, then the strategy, then the
    fine-tuned overlay.

    The order matters: a pretrained checkpoint names the plain layers, LoRA then wraps them, and our
    fine-tuned checkpoints (trainable tensors only) name the wrapped ones.
    """
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    finetuned = plain.get("finetuned") if plain.get("load_finetuned", False) else None
    if plain.get("load_finetuned", False) and not finetuned:
        raise ValueError("model.load_finetuned is true but model.finetuned is empty; set a path/URL or load_finetuned: false")
    model.load_checkpoint_from_config({**plain, "load_finetuned": False})
    apply_training_strategy(model, plain)
    if finetuned:
        model.load_checkpoint(url_or_filename=finetuned)
    return model
