"""What we know about each LLM family BLIP-2 pairs with, in one place: one :class:`LLMSpec` per family.

Why: the OPT vs Flan-T5 differences (where the model holds its LLM, how it is built, the LoRA targets, the
FSDP units, the default VQA prompt, the fp16 ban, the padding side of generation) used to be spelled in the
strategies, components, precision, FSDP, inference and HF-bridge modules. Those modules now ask the spec.
Adding a family is one spec here plus its model class (see docs/adding_a_model.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# OPT attends through torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on a GPU),
# said explicitly so a transformers default change cannot silently fall back to eager. Hugging Face's T5 has no
# SDPA path (its relative position bias), so T5 keeps transformers' default.
OPT_ATTENTION = "sdpa"


@dataclass(frozen=True)
class LLMSpec:
    family: str  # "opt": the ``{family}_model`` / ``{family}_tokenizer`` / ``{family}_config`` YAML keys
    arch: str  # the registered BLIP-2 class that pairs with it
    lora_targets: tuple[str, ...]  # peft target modules of the LoRA preset (the attention projections)
    vqa_prompt: str  # the paper's zero-shot VQA prompt for this family
    default_storage: torch.dtype  # LAVIS's ``llm_precision`` default
    never_fp16: bool  # fp16 overflows the family: stored and autocast in bf16 instead
    generate_padding_side: str  # how prompts are padded for generation (decoder-only: left)
    blocks: Callable[[nn.Module], list[nn.Module]]  # the transformer blocks (FSDP units)
    _build: Callable[..., tuple[Any, nn.Module]]  # (tokenizer_source, source, inline, dtype, on_meta)

    @property
    def attr(self) -> str:
        """The attribute our model class holds the LLM in (and ``{family}_tokenizer``, ``{family}_proj``)."""
        return f"{self.family}_model"

    def storage_dtype(self, name: str | None) -> torch.dtype:
        """``model.llm_precision`` -> dtype (None: LAVIS's default); fp16 becomes bf16 where it overflows."""
        from lavis_ext.precision import parse_dtype

        dtype = self.default_storage if name is None else parse_dtype(name, "model.llm_precision")
        if dtype == torch.float16 and self.never_fp16:
            logger.warning("llm_precision fp16 overflows %s; storing it in bf16 instead", self.family)
            dtype = torch.bfloat16
        return dtype

    def build(self, source: str | None, tokenizer_source: str | None, inline: Mapping | None, dtype: torch.dtype):
        """(tokenizer, model). ``source`` (hub name or local dir) loads real weights exactly as LAVIS does; with
        no source a randomly initialised model is built from ``inline`` config sized to the tokenizer. In a
        meta build (:mod:`lavis_ext.models.meta`) ``source`` gives only the config (a hub name: its offline
        facts) and no weights are read; a hub tokenizer is the vocabulary-size stand-in."""
        from lavis_ext.models import meta

        tok_source = tokenizer_source or source
        if not tok_source:
            raise ValueError(
                f"{self.family}: set model.{self.family}_model (weights) or model.{self.family}_tokenizer "
                f"(with model.{self.family}_config)"
            )
        from omegaconf import OmegaConf

        inline = OmegaConf.to_container(inline, resolve=True) if OmegaConf.is_config(inline) else dict(inline or {})
        return self._build(tok_source, source, inline, dtype, meta.meta_build_active())


def _build_opt(tok_source, source, inline, dtype, on_meta):
    import transformers

    from lavis_ext.models import meta
    from lavis_ext.models.tokenizers import load_opt_tokenizer  # fast when its ids are the slow one's

    tokenizer = meta.tokenizer_for(tok_source, load_opt_tokenizer) if on_meta else load_opt_tokenizer(tok_source)
    if source and on_meta:
        return tokenizer, transformers.OPTForCausalLM(meta.llm_config(transformers.OPTConfig, source)).to(dtype)
    if source:
        return tokenizer, transformers.OPTForCausalLM.from_pretrained(
            source, torch_dtype=dtype, attn_implementation=OPT_ATTENTION
        )
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation=OPT_ATTENTION, **inline,
    )
    return tokenizer, transformers.OPTForCausalLM(config).to(dtype)


def _build_t5(tok_source, source, inline, dtype, on_meta):
    import transformers

    from lavis_ext.models import meta

    load_tokenizer = transformers.T5TokenizerFast.from_pretrained
    tokenizer = meta.tokenizer_for(tok_source, load_tokenizer) if on_meta else load_tokenizer(tok_source)
    if source:
        config = meta.llm_config(transformers.T5Config, source) if on_meta else transformers.T5Config.from_pretrained(source)
        config.dense_act_fn = "gelu"  # as LAVIS's Blip2T5 does, so its checkpoints behave the same
        if on_meta:
            return tokenizer, transformers.T5ForConditionalGeneration(config).to(dtype)
        return tokenizer, transformers.T5ForConditionalGeneration.from_pretrained(source, config=config, torch_dtype=dtype)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, **inline,
    )
    return tokenizer, transformers.T5ForConditionalGeneration(config).to(dtype)


OPT = LLMSpec(
    family="opt",
    arch="blip2_opt_ext",
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    vqa_prompt="Question: {} Answer:",
    default_storage=torch.float16,
    never_fp16=False,
    generate_padding_side="left",
    blocks=lambda llm: list(llm.model.decoder.layers),
    _build=_build_opt,
)
T5 = LLMSpec(
    family="t5",
    arch="blip2_t5_ext",
    lora_targets=("q", "k", "v", "o"),
    vqa_prompt="Question: {} Short answer:",
    default_storage=torch.bfloat16,
    never_fp16=True,  # T5's activations overflow fp16 (transformers#23918); the paper and LAVIS use bf16
    generate_padding_side="right",
    blocks=lambda llm: list(llm.encoder.block) + list(llm.decoder.block),
    _build=_build_t5,
)
SPECS: dict[str, LLMSpec] = {spec.family: spec for spec in (OPT, T5)}


def spec_of(model: nn.Module) -> LLMSpec | None:
    """The family of ``model``'s language model (DDP's ``.module`` unwrapped); None for the stage-1 Q-Former."""
    core = getattr(model, "module", model)
    for spec in SPECS.values():
        if isinstance(getattr(core, spec.attr, None), nn.Module):
            return spec
    return None


def spec_for_arch(arch: str) -> LLMSpec | None:
    """The family a registered architecture name pairs with (None: no LLM, e.g. ``blip2_qformer_ext``)."""
    return next((spec for spec in SPECS.values() if spec.arch == str(arch)), None)
