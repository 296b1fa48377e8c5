"""What we know about each LLM family BLIP-2 pairs with, in one place: one :class:`LLMSpec` per family.

Why: the OPT vs Flan-T5 differences (where the model holds its LLM, how it is built, the LoRA targets, the
FSDP units, the default VQA prompt, the fp16 ban, the padding side of generation) used to be spelled in the
strategies, components, precision, FSDP, inference and HF-bridge modules. Those modules now ask the spec.
Adding a family is one spec here plus its model class (see docs/adding_a_model.md).

The frozen LLM can be stored 8- or 4-bit through bitsandbytes (:class:`LLMQuantization`, the
``model.llm_quantization`` keys): FlanT5-XXL's 11B parameters take 22 GB in bf16 and do not fit a 24 GB GPU
with anything else (LAVIS#118 / #294); in 4 bits they take about 6 GB. The figures per recipe are in
docs/memory.md (``python -m lavis_ext.memory``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# OPT attends through torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on a GPU),
# said explicitly so a transformers default change cannot silently fall back to eager. Hugging Face's T5 has no
# SDPA path (its relative position bias), so T5 keeps transformers' default.
OPT_ATTENTION = "sdpa"


# ---- quantised storage of the frozen LLM (bitsandbytes) ---------------------------------------------
#: The model keys and their defaults, stated once. ``llm_4bit_*`` apply to ``llm_quantization: 4bit`` only.
QUANTIZATION_DEFAULTS: dict[str, Any] = {
    "llm_quantization": None,  # null (the LLM in llm_precision) | 8bit (LLM.int8) | 4bit (QLoRA)
    "llm_4bit_quant_type": "nf4",  # nf4 (QLoRA's NormalFloat, for normally distributed weights) | fp4
    "llm_4bit_double_quant": True,  # quantise the per-block scales too: ~0.37 fewer bits per weight (QLoRA)
    "llm_4bit_compute_dtype": None,  # the matmul dtype of 4-bit layers: null = the LLM's storage dtype
}
QUANTIZATION_BITS = {"8bit": 8, "4bit": 4}
QUANT_TYPES = ("nf4", "fp4")
INSTALL_HINT = "pip install 'lavis-ext[quant]' (bitsandbytes)"


@dataclass(frozen=True)
class LLMQuantization:
    """How the frozen LLM is stored: ``bits`` 8 (LLM.int8, per-row scales) or 4 (QLoRA's NF4/FP4, per-64 block
    scales), through transformers' ``BitsAndBytesConfig`` at load time. Only the LLM's ``nn.Linear`` layers are
    quantised; embeddings, norms, the LM head (and T5's ``wo``, transformers keeps it fp32) stay as they are."""

    bits: int
    quant_type: str = QUANTIZATION_DEFAULTS["llm_4bit_quant_type"]
    double_quant: bool = QUANTIZATION_DEFAULTS["llm_4bit_double_quant"]
    compute_dtype: Optional[torch.dtype] = None  # None: the storage dtype of the LLM's other parameters

    @classmethod
    def from_config(cls, cfg: Mapping, spec: "LLMSpec") -> "LLMQuantization | None":
        """The quantisation a model config asks for (None: none), checked against the rest of the config.

        Raises:
            ValueError: an unknown value; 4-bit options without ``llm_quantization: 4bit``; a quantised LLM that
                would be fine-tuned (``freeze_llm: false``); fp16 compute for a family that overflows in fp16.
        """
        get = cfg.get
        name = get("llm_quantization")
        four_bit_set = sorted(k for k in QUANTIZATION_DEFAULTS if k.startswith("llm_4bit_") and get(k) is not None)
        if name in (None, False, "none", "null"):
            if four_bit_set:
                raise ValueError(f"model.{four_bit_set[0]} is set but model.llm_quantization is not 4bit; "
                                 "set model.llm_quantization: 4bit or remove it")
            return None
        if str(name).lower() not in QUANTIZATION_BITS:
            raise ValueError(f"model.llm_quantization {name!r} is not one of null, {', '.join(QUANTIZATION_BITS)}")
        bits = QUANTIZATION_BITS[str(name).lower()]
        if bits != 4 and four_bit_set:
            raise ValueError(f"model.{four_bit_set[0]} applies to 4-bit only but model.llm_quantization is {name}; "
                             "remove it or set model.llm_quantization: 4bit")
        if not get("freeze_llm", True):
            raise ValueError(
                f"model.llm_quantization {name} with model.freeze_llm false: quantised weights take no optimizer "
                "step. Keep model.freeze_llm: true and train LoRA adapters on the quantised LLM (model.lora_llm: "
                "QLoRA), or drop model.llm_quantization for full fine-tuning"
            )
        defaults = QUANTIZATION_DEFAULTS
        quant_type = str(get("llm_4bit_quant_type") or defaults["llm_4bit_quant_type"]).lower()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"model.llm_4bit_quant_type {get('llm_4bit_quant_type')!r} is not one of {list(QUANT_TYPES)}")
        double = get("llm_4bit_double_quant")
        compute_name = get("llm_4bit_compute_dtype")
        compute = None
        if compute_name is not None:
            from lavis_ext.precision import parse_dtype

            compute = parse_dtype(compute_name, "model.llm_4bit_compute_dtype")
            if compute == torch.float16 and spec.never_fp16:
                raise ValueError(
                    f"model.llm_4bit_compute_dtype fp16 overflows {spec.family} (transformers#23918); "
                    "use bf16 (or leave it null: the LLM's storage dtype)"
                )
        return cls(bits, quant_type, defaults["llm_4bit_double_quant"] if double is None else bool(double), compute)

    def bnb_config(self, storage: torch.dtype):
        """transformers' ``BitsAndBytesConfig`` for ``from_pretrained``.

        Raises:
            ImportError: bitsandbytes is not installed (names the extra to install).
        """
        require_bitsandbytes(f"model.llm_quantization {self.bits}bit")
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype or storage,
        )

    def quantized_linears(self, llm: nn.Module) -> dict[str, nn.Module]:
        """The ``nn.Linear`` layers of ``llm`` that bitsandbytes quantises when transformers loads it, by
        dotted name (a LoRA-wrapped layer gives its base layer): transformers' own rule, so a meta build
        knows them. Kept as they are: the tied embeddings and LM head (``get_keys_to_not_convert``) and the
        model's ``_keep_in_fp32_modules`` (T5's ``wo``, which overflows in half precision)."""
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(llm)) + list(getattr(llm, "_keep_in_fp32_modules", None) or [])
        found: dict[str, nn.Module] = {}

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in module.named_children():
                full = prefix + name
                base = child.get_base_layer() if hasattr(child, "get_base_layer") else child
                if isinstance(base, nn.Linear):
                    if name not in skip and not any(k + "." in full or k == full for k in skip):
                        found[full] = base
                    continue
                walk(child, full + ".")

        walk(llm, "")
        return found

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes bitsandbytes holds for one quantised ``out x in`` weight (its bias stays as it was).

        8-bit: int8 values and one fp32 scale per row. 4-bit: two values a byte and per 64-value block one
        absmax, fp32, or with double quantisation uint8 plus one fp32 per 256 blocks, an offset and the
        256-entry fp32 table of the second level; the 16-entry NF4/FP4 table (fp32) per layer.
        """
        n = out_features * in_features
        if self.bits == 8:
            return n + 4 * out_features
        blocks = -(-n // 64)
        scales = blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 if self.double_quant else 4 * blocks
        return (n + 1) // 2 + scales + 4 * 16


def require_bitsandbytes(what: str) -> None:
    """Fail early, before any weights load, when ``what`` needs bitsandbytes and it is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}, or remove {what.split()[0]}")


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
    _build: Callable[..., tuple[Any, nn.Module]]  # (tokenizer_source, source, inline, dtype, on_meta, load_kwargs)

    @property
    def source_keys(self) -> tuple[str, str, str]:
        """The model keys that say where this family's LLM comes from: ``{family}_model`` (hub name or directory of
        weights), ``{family}_tokenizer``, ``{family}_config`` (an inline config: a random LLM). The model class's
        ``model_options`` take them from here (:func:`lavis_ext.models.components.llm_model_options`)."""
        return (f"{self.family}_model", f"{self.family}_tokenizer", f"{self.family}_config")

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

    def build(
        self, source: str | None, tokenizer_source: str | None, inline: Mapping | None, dtype: torch.dtype,
        quantization: LLMQuantization | None = None,
    ):
        """(tokenizer, model). ``source`` (hub name or local dir) loads real weights exactly as LAVIS does; with
        no source a randomly initialised model is built from ``inline`` config sized to the tokenizer. In a
        meta build (:mod:`lavis_ext.models.meta`) ``source`` gives only the config (a hub name: its offline
        facts) and no weights are read; a hub tokenizer is the vocabulary-size stand-in.

        ``quantization`` loads the weights 8/4-bit (transformers places them on the current accelerator, or the
        CPU without one). A meta build stays unquantised: :mod:`lavis_ext.memory` counts the quantised bytes.

        Raises:
            ValueError: no source at all, or quantisation of an LLM without pretrained weights.
            ImportError: quantisation without bitsandbytes.
        """
        from lavis_ext.models import meta

        tok_source = tokenizer_source or source
        if not tok_source:
            raise ValueError(
                f"{self.family}: set model.{self.family}_model (weights) or model.{self.family}_tokenizer "
                f"(with model.{self.family}_config)"
            )
        from omegaconf import OmegaConf

        inline = OmegaConf.to_container(inline, resolve=True) if OmegaConf.is_config(inline) else dict(inline or {})
        on_meta = meta.meta_build_active()
        load_kwargs = {}
        if quantization is not None and not on_meta:
            if not source:
                raise ValueError(
                    f"model.llm_quantization quantises pretrained weights, but model.{self.family}_model is empty "
                    f"(a randomly initialised LLM from model.{self.family}_config); point model.{self.family}_model "
                    "at a hub name or a save_pretrained directory, or remove model.llm_quantization"
                )
            load_kwargs["quantization_config"] = quantization.bnb_config(dtype)
        return self._build(tok_source, source, inline, dtype, on_meta, load_kwargs)


def _build_opt(tok_source, source, inline, dtype, on_meta, load_kwargs):
    import transformers

    from lavis_ext.models import meta
    from lavis_ext.models.tokenizers import load_opt_tokenizer  # fast when its ids are the slow one's

    tokenizer = meta.tokenizer_for(tok_source, load_opt_tokenizer) if on_meta else load_opt_tokenizer(tok_source)
    if source and on_meta:
        return tokenizer, transformers.OPTForCausalLM(meta.llm_config(transformers.OPTConfig, source)).to(dtype)
    if source:
        return tokenizer, transformers.OPTForCausalLM.from_pretrained(
            source, torch_dtype=dtype, attn_implementation=OPT_ATTENTION, **load_kwargs
        )
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation=OPT_ATTENTION, **inline,
    )
    return tokenizer, transformers.OPTForCausalLM(config).to(dtype)


def _build_t5(tok_source, source, inline, dtype, on_meta, load_kwargs):
    import transformers

    from lavis_ext.models import meta

    load_tokenizer = transformers.T5TokenizerFast.from_pretrained
    tokenizer = meta.tokenizer_for(tok_source, load_tokenizer) if on_meta else load_tokenizer(tok_source)
    if source:
        config = meta.llm_config(transformers.T5Config, source) if on_meta else transformers.T5Config.from_pretrained(source)
        config.dense_act_fn = "gelu"  # as LAVIS's Blip2T5 does, so its checkpoints behave the same
        if on_meta:
            return tokenizer, transformers.T5ForConditionalGeneration(config).to(dtype)
        return tokenizer, transformers.T5ForConditionalGeneration.from_pretrained(
            source, config=config, torch_dtype=dtype, **load_kwargs
        )
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
