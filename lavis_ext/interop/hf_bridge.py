"""Hugging Face ``Blip2ForConditionalGeneration`` <-> our LAVIS-style BLIP-2 (OPT and Flan-T5), both ways.

Why a bridge of our own: Hugging Face's conversion script only converts LAVIS's official checkpoints
(it downloads them through LAVIS) and cannot take a model fine-tuned here; nothing converts back.
Everything a reader needs to check the conversion is in this module:

* :data:`KEY_TABLE`: our state-dict names <-> Hugging Face's, one row per tensor family;
* :func:`hf_config_for` / :func:`model_config_for`: our model config <-> ``Blip2Config``;
* :func:`export_hf` (ours -> a directory ``Blip2ForConditionalGeneration.from_pretrained`` and
  ``Blip2Processor.from_pretrained`` load, with a model card) and :func:`import_hf` / :func:`from_hf`
  (a hub name or local directory -> our model).

Details the two codebases do not share (each one tested in tests/unit/test_hf_bridge.py):

* Hugging Face uses one ``layer_norm_eps`` for every vision LayerNorm; LAVIS's EVA blocks use 1e-6 and
  ``ln_vision`` (HF's ``post_layernorm``) 1e-5. ``Blip2VisionConfig`` cannot say that, so an export keeps
  the blocks' value and the model card records the difference; :func:`from_hf` sets ``ln_vision.eps``
  to Hugging Face's value so the imported model computes what the checkpoint computes there.
* Flan-T5: LAVIS runs T5's feed-forward with exact ``gelu`` (its ``Blip2T5`` overrides the checkpoint's
  ``gelu_new``, and :func:`lavis_ext.models.components.build_llm` does the same); an export writes
  ``dense_act_fn: gelu`` into ``text_config``; :func:`from_hf` restores the checkpoint's activation.
* HF's EVA attention bias is one ``qkv.bias`` whose key third LAVIS does not have: it adds the same
  value to every score of a query row, which softmax ignores, so dropping it changes nothing.
* transformers >= 4.47 places the image in ``input_ids`` as ``num_query_tokens`` copies of an
  ``<image>`` token (``image_token_index``). It takes the first spare row of the LLM vocabulary when
  there is one (the official OPT and Flan-T5 vocabularies have spares: no weight changes, exact);
  otherwise one row is appended and ``generation_config.suppress_tokens`` keeps it out of captions
  (greedy decoding is unchanged; beam search normalises over one more, near-zero-probability token).
* OPT captions stop at "\\n" (LAVIS's convention): the exported ``generation_config`` says so, so that
  stock ``generate`` and ours stop at the same token.
* A Q-Former that reads the question (``qformer_text_input``) has no Hugging Face BLIP-2 equivalent.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lavis_ext.models.llm_specs import SPECS, spec_of
from lavis_ext.precision import DTYPES

logger = logging.getLogger(__name__)

# The CLIP normalisation of LAVIS's `blip_image_eval` processor (and Hugging Face's BLIP-2 processors).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"

# ---- the key mapping ---------------------------------------------------------------------------
# (ours, Hugging Face). `{llm}` is opt/t5; `{i}` a layer index; `{p}` weight|bias; `{m}` query|key|value;
# `{rest}` any dotted tail. The qkv bias row is special-cased in `_to_hf` / `_from_hf` (see module doc).
KEY_TABLE: list[tuple[str, str]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("visual_encoder.blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{i}.attn.{q_bias,v_bias}", "vision_model.encoder.layers.{i}.self_attn.qkv.bias"),
    ("visual_encoder.blocks.{i}.attn.proj.{p}", "vision_model.encoder.layers.{i}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.encoder.layer.{i}.attention.self.{m}.{p}", "qformer.encoder.layer.{i}.attention.attention.{m}.{p}"),
    ("Qformer.bert.encoder.layer.{i}.attention.output.dense.{p}", "qformer.encoder.layer.{i}.attention.output.dense.{p}"),
    ("Qformer.bert.encoder.layer.{i}.attention.output.LayerNorm.{p}", "qformer.encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("Qformer.bert.encoder.layer.{i}.crossattention.self.{m}.{p}", "qformer.encoder.layer.{i}.crossattention.attention.{m}.{p}"),
    ("Qformer.bert.encoder.layer.{i}.crossattention.output.dense.{p}", "qformer.encoder.layer.{i}.crossattention.output.dense.{p}"),
    ("Qformer.bert.encoder.layer.{i}.crossattention.output.LayerNorm.{p}", "qformer.encoder.layer.{i}.crossattention.output.LayerNorm.{p}"),
    ("Qformer.bert.encoder.layer.{i}.intermediate_query.dense.{p}", "qformer.encoder.layer.{i}.intermediate_query.dense.{p}"),
    ("Qformer.bert.encoder.layer.{i}.output_query.dense.{p}", "qformer.encoder.layer.{i}.output_query.dense.{p}"),
    ("Qformer.bert.encoder.layer.{i}.output_query.LayerNorm.{p}", "qformer.encoder.layer.{i}.output_query.LayerNorm.{p}"),
    ("{llm}_proj.{p}", "language_projection.{p}"),
    ("{llm}_model.{rest}", "language_model.{rest}"),  # OPTForCausalLM / T5ForConditionalGeneration as is
]
# Our tensors with no Hugging Face counterpart (a constant buffer).
OURS_ONLY = {"Qformer.bert.embeddings.position_ids"}
_GROUPS = {"i": r"\d+", "p": r"weight|bias", "m": r"query|key|value", "rest": r".+"}


def _compile(template: str, llm: str) -> re.Pattern:
    pattern = re.escape(template.replace("{llm}", llm))
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(f"^{pattern}$")


def _rules(llm: str, reverse: bool) -> list[tuple[re.Pattern, str]]:
    rules = []
    for ours, hf in KEY_TABLE:
        if "{q_bias,v_bias}" in ours:
            continue  # special-cased
        src, dst = (hf, ours) if reverse else (ours, hf)
        rules.append((_compile(src, llm), dst.replace("{llm}", llm)))
    return rules


def _rename(key: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def to_hf_state(state: Mapping[str, torch.Tensor], llm: str) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face ``Blip2ForConditionalGeneration`` names (``llm``: 'opt' or 't5').

    Raises:
        ValueError: a tensor with no Hugging Face counterpart (LoRA not merged, Q-Former text side...).
    """
    lora = [k for k in state if ".lora_" in k or ".base_layer." in k]
    if lora:
        raise ValueError(f"the model holds unmerged LoRA adapters (e.g. {lora[0]}); merge LoRA first "
                         "(lavis_ext.models.strategies.merge_lora; export_hf does it)")
    rules, out, unknown = _rules(llm, reverse=False), {}, []
    qv = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)$")
    for key, value in state.items():
        if key in OURS_ONLY:
            continue
        match = qv.match(key)
        if match:
            if match.group(2) == "q_bias":
                i = match.group(1)
                v_bias = state[f"visual_encoder.blocks.{i}.attn.v_bias"]
                out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        name = _rename(key, rules)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensors have no Hugging Face BLIP-2 counterpart, e.g. {unknown[:3]}; "
            "merge LoRA first (lavis_ext.models.strategies.merge_lora) and use a model without qformer_text_input"
        )
    return out


def from_hf_state(state: Mapping[str, torch.Tensor], llm: str) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours (the inverse of :func:`to_hf_state`; the key third of the qkv bias,
    which softmax ignores, is dropped).

    Raises:
        ValueError: a Hugging Face tensor this bridge does not know (another BLIP-2 variant).
    """
    rules, out, unknown = _rules(llm, reverse=True), {}, []
    qkv = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
    for key, value in state.items():
        match = qkv.match(key)
        if match:
            q_bias, _, v_bias = value.chunk(3)
            out[f"visual_encoder.blocks.{match.group(1)}.attn.q_bias"] = q_bias.clone()
            out[f"visual_encoder.blocks.{match.group(1)}.attn.v_bias"] = v_bias.clone()
            continue
        name = _rename(key, rules)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise ValueError(f"{len(unknown)} Hugging Face tensors are not BLIP-2 OPT/Flan-T5 ones, e.g. {unknown[:3]}")
    return out


def mapping_table_markdown() -> str:
    """:data:`KEY_TABLE` as a Markdown table (docs/interop.md carries it)."""
    rows = ["| ours | Hugging Face |", "|---|---|"]
    rows += [f"| `{ours}` | `{hf}` |" for ours, hf in KEY_TABLE]
    return "\n".join(rows)


# ---- config translation ------------------------------------------------------------------------
def llm_kind(model: nn.Module) -> str:
    """The LLM family ('opt', 't5') of our BLIP-2 models; ValueError for anything else."""
    spec = spec_of(model)
    if spec is not None and hasattr(model, f"{spec.family}_proj"):
        return spec.family
    raise ValueError(f"{type(model).__name__} is not a BLIP-2 OPT/Flan-T5 model (blip2_opt_ext / blip2_t5_ext)")


def _check_exportable(model: nn.Module) -> None:
    if getattr(model, "qformer_text_input", False):
        raise ValueError(
            "this model feeds the question to the Q-Former (qformer_text_input: true), which Hugging Face's "
            "Blip2ForConditionalGeneration cannot do; export a model trained with qformer_text_input: false"
        )
    vit = model.visual_encoder
    if getattr(vit, "rel_pos_bias", None) is not None or any(getattr(b.attn, "relative_position_bias_table", None) is not None for b in vit.blocks):
        raise ValueError("the ViT uses relative position bias, which Hugging Face's Blip2VisionModel lacks")
    if any(getattr(b, "gamma_1", None) is not None for b in vit.blocks):
        raise ValueError("the ViT uses layer scale (init_values), which Hugging Face's Blip2VisionModel lacks")
    if vit.blocks[0].attn.q_bias is None:
        raise ValueError("the ViT has no q/v bias (qkv_bias false); Hugging Face's export needs qkv_bias true")


def hf_config_for(model: nn.Module):
    """Our model (its modules, so any vit_model of LAVIS's EVA class works) -> ``Blip2Config``."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    kind = llm_kind(model)
    _check_exportable(model)
    vit, block = model.visual_encoder, model.visual_encoder.blocks[0]
    vision = Blip2VisionConfig(
        hidden_size=vit.embed_dim if hasattr(vit, "embed_dim") else vit.num_features,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        hidden_act="gelu",  # EVA's nn.GELU (exact)
        layer_norm_eps=block.norm1.eps,  # ln_vision's own eps cannot be expressed (module doc)
        attention_dropout=0.0,
        qkv_bias=True,
    )
    bert = model.Qformer.config
    qformer = Blip2QFormerConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        max_position_embeddings=bert.max_position_embeddings,
        initializer_range=bert.initializer_range,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        cross_attention_frequency=bert.cross_attention_freq,
        encoder_hidden_size=bert.encoder_width,
        use_qformer_text_input=False,
    )
    text = getattr(model, f"{kind}_model").config.to_dict()
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text,
        num_query_tokens=model.query_tokens.shape[1],
    )


def model_config_for(hf_config, llm_dir: str, qformer_tokenizer: str, image_size: int | None = None,
                     precision: str = "fp32", prompt: str = "") -> dict:
    """``Blip2Config`` -> our model config (a plain dict for the ``model:`` section of a YAML).

    The ViT and Q-Former are described inline (LAVIS's EVA class at the checkpoint's size); the LLM is
    loaded from ``llm_dir`` (a ``save_pretrained`` directory) so its vocabulary keeps its real size.
    """
    vision, qformer, text = hf_config.vision_config, hf_config.qformer_config, hf_config.text_config
    if getattr(qformer, "use_qformer_text_input", False):
        raise ValueError("this checkpoint's Q-Former reads text (use_qformer_text_input): not a BLIP-2 OPT/Flan-T5 model")
    if vision.hidden_act != "gelu" or not vision.qkv_bias:
        raise ValueError(f"vision tower with hidden_act={vision.hidden_act!r}, qkv_bias={vision.qkv_bias} is not LAVIS's EVA ViT")
    kind = text.model_type if text.model_type in SPECS else None
    if kind is None:
        raise ValueError(f"text_config.model_type {text.model_type!r} is not supported; BLIP-2 OPT and Flan-T5 are")
    # LAVIS's ViT computes int(width * mlp_ratio); half a unit up makes that the exact intermediate size.
    mlp_ratio = (vision.intermediate_size + 0.5) / vision.hidden_size
    return {
        "arch": SPECS[kind].arch,
        "load_finetuned": False,
        "load_pretrained": True,
        "pretrained": None,  # set by the caller to the image-side checkpoint
        "finetuned": None,
        "vit_model": "tiny",  # = "LAVIS's EVA VisionTransformer from vit_config" (any size)
        "vit_config": {"patch_size": vision.patch_size, "width": vision.hidden_size, "depth": vision.num_hidden_layers,
                       "heads": vision.num_attention_heads, "mlp_ratio": mlp_ratio},
        "image_size": int(image_size or vision.image_size),
        "drop_path_rate": 0,
        "use_grad_checkpoint": False,
        "vit_precision": "fp32",
        "freeze_vit": True,
        "num_query_token": hf_config.num_query_tokens,
        "cross_attention_freq": qformer.cross_attention_frequency,
        "qformer_tokenizer": qformer_tokenizer,
        "qformer_model": None,
        "qformer_config": {"hidden_size": qformer.hidden_size, "num_hidden_layers": qformer.num_hidden_layers,
                           "num_attention_heads": qformer.num_attention_heads,
                           "intermediate_size": qformer.intermediate_size,
                           "hidden_dropout_prob": qformer.hidden_dropout_prob,
                           "attention_probs_dropout_prob": qformer.attention_probs_dropout_prob,
                           "max_position_embeddings": qformer.max_position_embeddings,
                           "layer_norm_eps": qformer.layer_norm_eps, "initializer_range": qformer.initializer_range},
        f"{kind}_model": llm_dir,
        "freeze_llm": True,
        "llm_precision": precision,
        "prompt": prompt,
        "max_txt_len": 32,
    }


# ---- Hugging Face -> ours ----------------------------------------------------------------------
def _load_hf(source: str):
    """The real loading code for hub names and local directories alike."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    hf_model = Blip2ForConditionalGeneration.from_pretrained(str(source), torch_dtype=torch.float32)
    processor = Blip2Processor.from_pretrained(str(source))
    return hf_model.eval(), processor


def import_hf(source: str, out_dir: str | Path, qformer_tokenizer: str = "bert-base-uncased",
              precision: str = "fp32", prompt: str = "", _loaded=None) -> Path:
    """Write a Hugging Face BLIP-2 checkpoint as our model: ``model.yaml`` (a ``model:`` section to use
    in a project file), ``image_side.safetensors`` (ViT, Q-Former, projection; our checkpoint format,
    loaded through ``pretrained:``) and ``llm/`` (the LLM and its tokenizer). Returns the YAML path.

    ``qformer_tokenizer``: the stage-2 Q-Former reads no text, but LAVIS builds it with a BERT
    tokenizer (its vocabulary sizes the unused word embeddings); LAVIS's default is bert-base-uncased.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from lavis_ext.checkpoints import FORMAT, MODEL_PREFIX, digest

    hf_model, processor = _loaded or _load_hf(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm_dir = out / "llm"
    hf_model.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    size = processor.image_processor.size
    image_size = int(size.get("height", size.get("shortest_edge", hf_model.config.vision_config.image_size)))
    if [round(x, 6) for x in processor.image_processor.image_mean] != [round(x, 6) for x in CLIP_MEAN]:
        logger.warning("the checkpoint's processor does not use CLIP's mean/std; blip_image_eval (ours) does")
    cfg = model_config_for(hf_model.config, str(llm_dir), qformer_tokenizer, image_size, precision, prompt)
    kind = cfg["arch"].split("_")[1]
    ours = from_hf_state(hf_model.state_dict(), kind)
    image_side = {MODEL_PREFIX + k: v.detach().float().contiguous().clone() for k, v in ours.items()
                  if not k.startswith(f"{kind}_model.")}
    metadata = {"format": FORMAT, "config": json.dumps({"model": {**cfg, "source": str(source)}})}
    metadata["sha256"] = digest(image_side, metadata)
    save_file(image_side, str(out / "image_side.safetensors"), metadata=metadata)
    cfg["pretrained"] = str((out / "image_side.safetensors").resolve())
    cfg["ln_vision_eps_hf"] = hf_model.config.vision_config.layer_norm_eps  # informative (see from_hf)
    preprocess = {"vis_processor": {"eval": {"name": "blip_image_eval", "image_size": image_size}},
                  "text_processor": {"eval": {"name": "blip_caption"}}}
    yaml_cfg = {k: v for k, v in cfg.items() if k != "ln_vision_eps_hf"}
    header = (f"# Imported from Hugging Face {source} by `lavis-ext hf import`.\n"
              f"# Hugging Face computes the vision post-LayerNorm with eps={cfg['ln_vision_eps_hf']}"
              " (LAVIS's ln_vision: 1e-5); lavis_ext.interop.hf_bridge.from_hf reproduces HF exactly.\n")
    path = out / "model.yaml"
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"model": yaml_cfg, "preprocess": preprocess})))
    return path


def from_hf(source: str, qformer_tokenizer: str = "bert-base-uncased", precision: str = "fp32", prompt: str = "",
            numerics: str = "hf"):
    """A Hugging Face ``Blip2ForConditionalGeneration`` (hub name or directory) -> our model.

    ``numerics="hf"`` computes what Hugging Face computes (its vision post-LayerNorm eps and T5
    activation); ``"lavis"`` keeps LAVIS's (ln_vision eps 1e-5, T5 exact gelu), as the model YAML
    written by :func:`import_hf` does, i.e. what the official checkpoints were trained with.
    """
    if numerics not in ("hf", "lavis"):
        raise ValueError(f"numerics {numerics!r}: use 'hf' (match Hugging Face) or 'lavis' (match LAVIS)")
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    loaded = _load_hf(source)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.load(import_hf(source, tmp, qformer_tokenizer, precision, prompt, _loaded=loaded)).model
        model = registry.get_model_class(cfg.arch).from_config(cfg)
    hf_model = loaded[0]
    if numerics == "lavis":
        return model.eval()
    model.ln_vision.eps = hf_model.config.vision_config.layer_norm_eps
    if llm_kind(model) == "t5":
        _set_t5_activation(model.t5_model, hf_model.config.text_config.dense_act_fn)
    return model.eval()


def _set_t5_activation(t5: nn.Module, name: str) -> None:
    """T5 builds its feed-forward activation from ``dense_act_fn`` at construction; set both."""
    from transformers.activations import ACT2FN

    t5.config.dense_act_fn = name
    for module in t5.modules():
        if hasattr(module, "act") and hasattr(module, "wo"):
            module.act = ACT2FN[name]


# ---- ours -> Hugging Face ----------------------------------------------------------------------
def _image_processor(image_size: int):
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    # = LAVIS's blip_image_eval: resize to (size, size) bicubic, /255, CLIP mean/std.
    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def to_hf(model: nn.Module, image_size: int | None = None):
    """Our model -> (``Blip2ForConditionalGeneration``, ``Blip2Processor``, notes for the card)."""
    import copy

    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        GenerationConfig,
    )

    kind = llm_kind(model)
    config = hf_config_for(model)
    tokenizer = copy.deepcopy(getattr(model, f"{kind}_tokenizer"))
    tokenizer.padding_side = SPECS[kind].generate_padding_side  # as our generate pads
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side  # what save_pretrained records
    processor = Blip2Processor(_image_processor(image_size or config.vision_config.image_size), tokenizer,
                               num_query_tokens=config.num_query_tokens)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = config.text_config.vocab_size
    appended = image_token_id >= vocab
    if appended:
        config.text_config.vocab_size = image_token_id + 1
    config.image_token_index = image_token_id
    notes = {"image_token_index": image_token_id, "appended_image_row": appended,
             "vision_post_layernorm_eps": {"ours": model.ln_vision.eps, "exported": config.vision_config.layer_norm_eps}}
    # Stock `generate` hands decoding to the LLM, whose generation config comes from text_config.
    if kind == "opt":
        config.text_config.eos_token_id = model.eos_token_id  # captions end at "\n" (LAVIS's convention)
        notes["eos"] = f"\\n (token id {model.eos_token_id}), as LAVIS's BLIP-2 OPT captions"
    if appended:
        config.text_config.suppress_tokens = [image_token_id]
    state = to_hf_state(model.state_dict(), kind)
    if appended:  # the new row: zero (its input embedding is always replaced by a query output)
        for name, tensor in list(state.items()):
            if tensor.dim() == 2 and tensor.shape[0] == vocab and name.startswith("language_model."):
                state[name] = torch.cat([tensor, tensor.new_zeros(image_token_id + 1 - vocab, tensor.shape[1])])
    hf_model = Blip2ForConditionalGeneration(config).eval()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_names(hf_model)]
    if missing or unexpected:
        raise RuntimeError(f"conversion left tensors unset {missing[:5]} or unused {unexpected[:5]} (bridge bug)")
    hf_model.generation_config = GenerationConfig.from_model_config(config.text_config)
    notes["prefix_max_abs_diff"] = _prefix_difference(model, hf_model)
    return hf_model, processor, notes


def _prefix_difference(model: nn.Module, hf_model, batch: int = 2, seed: int = 0) -> float:
    """Max |ours - exported| of the LLM prefix on random images: 0 up to float rounding, unless the
    vision LayerNorm eps could not be carried over (see the module docstring)."""
    size = hf_model.config.vision_config.image_size
    pixel = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    param, training = next(model.parameters()), model.training
    model.eval()
    with torch.no_grad():
        ours = model.encode_image_for_llm(pixel.to(param.device, param.dtype))[0].float().cpu()
        theirs = hf_model.get_image_features(pixel.to(next(hf_model.parameters()).dtype)).float()
    model.train(training)
    return float((ours - theirs).abs().max())


def _tied_names(hf_model) -> set[str]:
    names = set()
    for name in getattr(hf_model, "_tied_weights_keys", None) or []:
        names.add(name)
    names.update({"language_model.lm_head.weight", "language_model.encoder.embed_tokens.weight",
                  "language_model.decoder.embed_tokens.weight"})
    return names


def export_hf(model: nn.Module, out_dir: str | Path, source_config: Mapping | None = None,
              image_size: int | None = None, source: str = "") -> Path:
    """Write ``model`` (LoRA merged first where present) as a Hugging Face BLIP-2 directory: weights,
    config, ``generation_config.json``, the processor (image processor + LLM tokenizer) and a model card
    (README.md) recording ``source_config``."""
    from lavis_ext.models.strategies import merge_lora

    merged = merge_lora(model)
    hf_model, processor, notes = to_hf(model, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    processor.save_pretrained(out)
    notes["lora_layers_merged"] = merged
    (out / "README.md").write_text(_model_card(hf_model, notes, source_config, source))
    return out


def _model_card(hf_model, notes: dict, source_config: Mapping | None, source: str) -> str:
    import yaml

    cfg = hf_model.config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-to-text", "tags: [blip-2, lavis-ext]", "---", "",
        f"# BLIP-2 ({cfg.text_config.model_type}) exported by lavis-ext", "",
        f"Source: `{source}`" if source else "Source: an in-memory lavis-ext model", "",
        "```python",
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "model = Blip2ForConditionalGeneration.from_pretrained(PATH)",
        "processor = Blip2Processor.from_pretrained(PATH)",
        "inputs = processor(images=image, text=PROMPT, return_tensors='pt')",
        "out = model.generate(**inputs, num_beams=5, max_new_tokens=30)",
        "```", "",
        "## Conversion notes", "",
        f"- {cfg.num_query_tokens} query tokens; image placeholder `{IMAGE_TOKEN}` = token id {notes['image_token_index']}"
        + (" (a row appended to the vocabulary, suppressed in generation_config)" if notes["appended_image_row"] else
           " (a spare vocabulary row; no weight changed)"),
        (f"- vision post-LayerNorm eps: ours {notes['vision_post_layernorm_eps']['ours']}, Hugging Face's config "
         f"{notes['vision_post_layernorm_eps']['exported']} (one eps for every vision LayerNorm)"),
        f"- LoRA layers merged into their base weights: {notes['lora_layers_merged']}",
        f"- max |lavis-ext - this export| of the LLM prefix on random images: {notes['prefix_max_abs_diff']:.2e}",
    ]
    if "eos" in notes:
        lines.append(f"- generation stops at {notes['eos']}; OPT's generate output starts with the prompt ids")
    lines += ["", "## Source config", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(source_config or {}, default=str)),
                                                                    sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def export_run(source: str | Path, out_dir: str | Path) -> Path:
    """A run directory or checkpoint of ours -> Hugging Face directory (see :func:`export_hf`)."""
    from omegaconf import OmegaConf

    from lavis_ext.inference import load

    predictor = load(source, device="cpu")
    config = OmegaConf.to_container(predictor.config, resolve=True)
    return export_hf(predictor.model.float(), out_dir, source_config=config, image_size=predictor.image_size,
                     source=str(source))


# ---- CLI ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lavis-ext hf", description="Hugging Face BLIP-2 <-> lavis-ext conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face checkpoint (hub name or directory) -> our model.yaml + weights")
    imp.add_argument("source", help="e.g. Salesforce/blip2-opt-2.7b or a local save_pretrained directory")
    imp.add_argument("out_dir")
    imp.add_argument("--qformer-tokenizer", default="bert-base-uncased",
                     help="BERT tokenizer LAVIS builds the Q-Former with (hub name or directory)")
    imp.add_argument("--precision", default="fp32", choices=sorted(DTYPES), help="LLM storage dtype")
    imp.add_argument("--prompt", default="", help="the model's caption prompt")
    exp = sub.add_parser("export", help="our run directory or checkpoint -> Hugging Face BLIP-2 directory")
    exp.add_argument("source", help="run directory or .safetensors checkpoint")
    exp.add_argument("out_dir")
    sub.add_parser("table", help="print the key mapping table")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            path = import_hf(args.source, args.out_dir, args.qformer_tokenizer, args.precision, args.prompt)
            print(f"wrote {path} (use its model: section in a project file)")
        elif args.command == "export":
            out = export_run(args.source, args.out_dir)
            print(f"wrote {out}: Blip2ForConditionalGeneration.from_pretrained / Blip2Processor.from_pretrained load it")
        else:
            print(mapping_table_markdown())
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"lavis-ext hf {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
