"""Build each BLIP-2 component from its real source or from an inline (tiny) config.

LAVIS 1.0.2 hard-codes hub names in its hooks (`BertTokenizer.from_pretrained("bert-base-uncased")`,
`BertConfig.from_pretrained("bert-base-uncased")`) and always loads pretrained EVA/CLIP weights. The
mixin below overrides those hooks, which LAVIS calls through `self`, so the model YAML decides:

* ``qformer_tokenizer`` / ``qformer_model``: a hub name or local dir (real, as LAVIS does), or
  ``qformer_model: null`` with ``qformer_config: {...}`` (random init, e.g. tiny);
* ``vit_model``: ``eva_clip_g`` / ``clip_L`` (LAVIS's builders and URLs), or ``tiny`` with
  ``vit_config: {...}`` (LAVIS's own EVA VisionTransformer class at a small size);
* ``vit_depth``: ``eva_clip_g`` with fewer blocks (:func:`eva_depth`; reduced-depth checks at real width);
* the LLM (``opt_model`` / ``t5_model`` or ``*_config``) is built by its family's spec
  (:mod:`lavis_ext.models.llm_specs`);
* ``pretrained`` / ``finetuned``: our ``.safetensors`` checkpoints, or LAVIS's ``.pth`` releases (URL or
  path) read with ``torch.load(weights_only=True)`` and reported key by key (:meth:`Blip2ComponentsMixin.load_release`).

Every ``model.*`` key a class reads is declared once, with its default, in the class's ``model_options``
(:attr:`Blip2ComponentsMixin.model_options`: the image side, the Q-Former, checkpoints; :data:`LLM_OPTIONS` and
:func:`llm_model_options`: a model with an LLM), and read through :meth:`Blip2ComponentsMixin.options`. The config
check accepts exactly those keys for that class (:func:`lavis_ext.config.model_keys_for`).

The mixin must come before the LAVIS class in the bases so its hooks win.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from lavis_ext.models.llm_specs import QUANTIZATION_DEFAULTS, LLMQuantization, LLMSpec
from lavis_ext.precision import block_autocast

logger = logging.getLogger(__name__)

TINY_VIT_DEFAULTS = {"patch_size": 8, "width": 64, "depth": 2, "heads": 4, "mlp_ratio": 4.0}
QFORMER_CONFIG_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "layer_norm_eps", "initializer_range",
}


def _plain(cfg: Any) -> dict:
    """OmegaConf node or mapping -> plain dict (None -> {})."""
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _plain_value(value: Any) -> Any:
    """An OmegaConf node as a plain container (interpolations resolved); anything else as it is."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class Blip2ComponentsMixin:
    """Config-driven overrides of LAVIS's `init_tokenizer`, `init_Qformer`, `init_vision_encoder`
    and `load_checkpoint_from_config` hooks (see the module docstring), and the model keys they read."""

    # The model.* keys of every BLIP-2 class of ours, with their defaults, stated once: the config check accepts a
    # class's `model_options` and nothing else (lavis_ext.config.model_keys_for); `from_config`, these hooks and
    # lavis_ext.inference / lavis_ext.memory read them through `options` / `config.model_option`.
    model_options: ClassVar[Mapping[str, Any]] = MappingProxyType({
        # written by LAVIS's config machinery (the model-type YAMLs, `Config`); the class reads no arch or type
        "arch": None, "model_type": None,
        # checkpoints (load_checkpoint_from_config, strategies.finish_from_config): a path or LAVIS URL each
        "load_finetuned": False, "load_pretrained": True, "pretrained": None, "finetuned": None,
        # vision encoder: eva_clip_g / clip_L (LAVIS's towers) or tiny (vit_config); vit_depth cuts eva_clip_g
        "vit_model": "eva_clip_g", "vit_config": None, "vit_depth": None, "image_size": 224, "drop_path_rate": 0,
        "use_grad_checkpoint": False, "vit_precision": "fp16", "freeze_vit": True,
        # Q-Former: a hub name or directory (qformer_model: null -> random from qformer_config)
        "num_query_token": 32, "cross_attention_freq": 2, "qformer_tokenizer": "bert-base-uncased",
        "qformer_model": "bert-base-uncased", "qformer_config": None,
        "max_txt_len": 32,  # text tokens: the Q-Former's question and stage 1's captions, the LLM's text
        # the Q-Former's training strategy (lavis_ext.models.strategies)
        "freeze_qformer": False, "lora_qformer": None, "qformer_grad_checkpoint": False,
    })

    @classmethod
    def options(cls, cfg: Mapping | None = None) -> dict:
        """This class's ``model_options``: the config's values over the defaults (OmegaConf nodes as plain
        containers). Keys the class does not declare are not in it."""
        return {key: _plain_value(cfg.get(key, default) if cfg is not None else default)
                for key, default in cls.model_options.items()}

    def _remember_components(self, components: Mapping[str, Any] | None) -> None:
        # Set before nn.Module.__init__ runs (the LAVIS __init__ calls the hooks), so plain object attr.
        object.__setattr__(self, "_components", _plain(components))

    def _component(self, key: str) -> Any:
        """A component key (:data:`COMPONENT_KEYS`) as given to the constructor, else its ``model_options`` default."""
        return getattr(self, "_components", {}).get(key, self.model_options[key])

    # ---- hooks LAVIS calls through self -------------------------------------------------------
    def maybe_autocast(self, dtype=None, block: nn.Module | None = None):
        """The precision module's context for ``block`` (see :mod:`lavis_ext.precision`), not LAVIS's fp16 on
        any GPU. ``dtype`` (what LAVIS's call sites pass) is ignored: storage and the run decide. LAVIS's
        own call sites that we inherit (``Blip2Qformer.extract_features``) wrap the vision encoder, hence the
        default block."""
        return block_autocast(self.visual_encoder if block is None else block)

    def init_tokenizer(self, *args, **kwargs):
        from transformers import BertTokenizer

        from lavis_ext.models import meta

        source = self._component("qformer_tokenizer") or self.model_options["qformer_tokenizer"]  # null: the default
        if meta.meta_build_active():  # a hub name gives the vocabulary-size stand-in (see lavis_ext.models.meta)
            tokenizer = meta.tokenizer_for(source, BertTokenizer.from_pretrained)
        else:
            tokenizer = BertTokenizer.from_pretrained(source)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    def init_Qformer(self, num_query_token, vision_width, cross_attention_freq=2):
        from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
        from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

        from lavis_ext.models import meta

        source = self._component("qformer_model")  # null: random, from qformer_config
        on_meta = meta.meta_build_active()
        if source and on_meta:
            config = meta.llm_config(BertConfig, source)
            if isinstance(self, Blip2Qformer):
                # LAVIS's stage-1 __init__ resizes the embeddings to len(tokenizer) right after this hook;
                # transformers initialises the new rows from the old ones' covariance, which needs values
                # (Tensor.item() on meta). Built at the final size, the parameters are the same.
                config.vocab_size = len(self.tokenizer)
        elif source:
            config = BertConfig.from_pretrained(source)
        else:
            inline = _plain(self._component("qformer_config"))
            unknown = set(inline) - QFORMER_CONFIG_KEYS
            if unknown:
                raise ValueError(
                    f"unknown qformer_config keys {sorted(unknown)}; valid keys: {sorted(QFORMER_CONFIG_KEYS)}"
                )
            config = BertConfig(vocab_size=len(self.tokenizer), **inline)
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        if source and not on_meta:
            qformer = BertLMHeadModel.from_pretrained(source, config=config)
        else:
            qformer = BertLMHeadModel(config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return qformer, query_tokens

    def init_vision_encoder(self, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        if model_name != "tiny":
            from lavis_ext.models import meta

            with eva_depth(model_name, self._component("vit_depth")):
                if meta.meta_build_active():  # the same towers without the weight download
                    from lavis.models.blip2_models.blip2 import LayerNorm

                    visual_encoder = meta.vision_encoder_without_weights(
                        model_name, img_size, drop_path_rate, use_grad_checkpoint, precision
                    )
                    return visual_encoder, LayerNorm(visual_encoder.num_features)
                # eva_clip_g / clip_L: LAVIS's builders, weights from LAVIS's URLs through the timm cache.
                return super().init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
        if self._component("vit_depth") is not None:
            raise ValueError("model.vit_depth applies to vit_model eva_clip_g; a tiny ViT takes vit_config.depth")
        from lavis.models.blip2_models.blip2 import LayerNorm
        from lavis.models.eva_vit import VisionTransformer

        vit = {**TINY_VIT_DEFAULTS, **_plain(self._component("vit_config"))}
        unknown = set(vit) - set(TINY_VIT_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown vit_config keys {sorted(unknown)}; valid keys: {sorted(TINY_VIT_DEFAULTS)}")
        if img_size % vit["patch_size"]:
            raise ValueError(f"image_size {img_size} is not a multiple of vit_config.patch_size {vit['patch_size']}")
        visual_encoder = VisionTransformer(
            img_size=img_size,
            patch_size=vit["patch_size"],
            use_mean_pooling=False,
            embed_dim=vit["width"],
            depth=vit["depth"],
            num_heads=vit["heads"],
            mlp_ratio=vit["mlp_ratio"],
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_grad_checkpoint,
        )
        return visual_encoder, LayerNorm(visual_encoder.num_features)

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """Load `finetuned` (load_finetuned: true) or `pretrained`; nothing when no path is set.

        LAVIS 1.0.2 always calls `load_from_pretrained(None)` when no checkpoint is configured and
        fails with `TypeError: expected string or bytes-like object, got 'NoneType'`
        (common/utils.py:404); training from scratch needs no checkpoint. A meta build
        (:mod:`lavis_ext.models.meta`) has no weights to load into and reads nothing.
        """
        from lavis_ext.models import meta

        if meta.meta_build_active():
            logger.info("meta build: checkpoints are not read")
            return None
        opts = self.options(cfg)
        if opts["load_finetuned"]:
            path = opts["finetuned"]
            if not path:
                raise ValueError("model.load_finetuned is true but model.finetuned is empty; set a path/URL or load_finetuned: false")
            return self.load_checkpoint(url_or_filename=path)
        if opts["load_pretrained"] and opts["pretrained"]:
            return self.load_from_pretrained(url_or_filename=opts["pretrained"], **kwargs)
        logger.info("no pretrained/finetuned checkpoint configured: weights are as initialised")
        return None

    def load_checkpoint(self, url_or_filename):
        """``finetuned:``. Our ``.safetensors`` checkpoints (trainable tensors only, see
        :mod:`lavis_ext.checkpoints`) load without pickle; LAVIS ``.pth`` files and URLs through
        :meth:`load_release`."""
        path = env_path(str(url_or_filename))
        if path.endswith(".safetensors"):
            from lavis_ext.checkpoints import load_trainable

            return load_trainable(self, path, require_all_trainable=False)
        return self.load_release(path)

    def load_from_pretrained(self, url_or_filename):
        """``pretrained:`` may name one of our ``.safetensors`` checkpoints of an earlier stage: the
        tensors that fit are loaded and the rest reported (:func:`lavis_ext.checkpoints.init_from`);
        LAVIS ``.pth`` files and URLs go through :meth:`load_release`."""
        path = env_path(str(url_or_filename))
        if path.endswith(".safetensors"):
            from lavis_ext.checkpoints import init_from

            return init_from(self, path)
        return self.load_release(path)

    def load_release(self, url_or_filename: str) -> dict:
        """Load a LAVIS-format checkpoint (``{"model": state_dict}`` or a bare state dict): a URL as
        LAVIS resolves it (``download_cached_file``: the torch hub cache, a present file is not
        fetched again) or a local ``.pth``, read with ``torch.load(weights_only=True)``.

        Why not LAVIS's ``load_checkpoint`` / ``load_from_pretrained``: they unpickle with plain
        ``torch.load`` (code can run while loading) and only log the missing keys. Loading is
        ``strict=False`` as in LAVIS (the releases hold only what trained, see :func:`load_report`);
        the report is returned, logged and appended to ``self.checkpoint_reports``.

        Raises:
            FileNotFoundError: a URL whose file is neither cached nor downloadable, or a missing path.
            CheckpointPickleError: the pickle needs more than tensors and plain containers.
            ValueError: a checkpoint tensor whose shape does not fit this model.
        """
        path = resolve_release(url_or_filename)
        checkpoint = load_pth(path)
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(
                f"checkpoint {path} is not a LAVIS checkpoint: expected {{'model': state_dict}} or a state dict of "
                "tensors; save it as torch.save({'model': model.state_dict()}, path)"
            )
        own = self.state_dict()
        mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise ValueError(
                f"checkpoint {path} does not fit this model (checkpoint vs model): {mismatched[:3]}; build the model "
                "the checkpoint was trained as (model_type, image_size, LLM)"
            )
        self.load_state_dict(state, strict=False)
        report = load_report(str(url_or_filename), path, state, own)
        self.checkpoint_reports = [*getattr(self, "checkpoint_reports", []), report]  # pretrained, then finetuned
        logger.info(
            "checkpoint %s: %d tensors loaded; model tensors not in it: %s; %d checkpoint tensors unused%s",
            path, report["loaded"], report["missing_by_module"] or "none", len(report["unexpected"]),
            f" (e.g. {report['unexpected'][:4]})" if report["unexpected"] else "",
        )
        return report

    # ---- helpers used by our model classes ----------------------------------------------------
    def _build_vision_and_qformer(
        self, vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit,
        num_query_token, cross_attention_freq, qformer_text_input=False,
    ) -> None:
        """The image side shared by BLIP-2 OPT and Flan-T5 (stage 2): tokenizer, ViT, Q-Former queries.

        The Q-Former's text-side modules are dropped as LAVIS does (stage 2 uses only the query path),
        unless ``qformer_text_input``: the paper's VQA fine-tuning feeds the question to the Q-Former,
        which needs its word/position embeddings and the text feed-forward layers.
        """
        self.qformer_text_input = bool(qformer_text_input)
        self.tokenizer = self.init_tokenizer()
        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision
        )
        if freeze_vit:
            self.visual_encoder = self._freeze(self.visual_encoder, "vision encoder")
        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq
        )
        self.Qformer.cls = None
        if not self.qformer_text_input:
            self.Qformer.bert.embeddings.word_embeddings = None
            self.Qformer.bert.embeddings.position_embeddings = None
            for layer in self.Qformer.bert.encoder.layer:
                layer.output = None
                layer.intermediate = None

    def encode_vision(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> the frozen-ViT features the Q-Former attends to (the costly part worth caching)."""
        with self.maybe_autocast(block=self.visual_encoder):
            return self.ln_vision(self.visual_encoder(image))

    def encode_queries(self, image: torch.Tensor | None = None, questions=None, image_embeds=None) -> torch.Tensor:
        """Image or its cached ``encode_vision`` features (and, with ``qformer_text_input``, the
        question) -> the Q-Former's query outputs."""
        if image_embeds is None:
            image_embeds = self.encode_vision(image)
        image = image_embeds  # device and batch size below
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if getattr(self, "qformer_text_input", False) and questions is not None:
            text = self.tokenizer(
                list(questions), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
            ).to(image.device)
            query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long, device=image.device)
            output = self.Qformer.bert(
                text.input_ids,
                attention_mask=torch.cat([query_atts, text.attention_mask], dim=1),
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
        else:
            output = self.Qformer.bert(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
        return output.last_hidden_state[:, : query_tokens.size(1)]

    def _freeze(self, module: nn.Module, name: str) -> nn.Module:
        from lavis.models.blip2_models.blip2 import disabled_train

        for param in module.parameters():
            param.requires_grad = False
        module = module.eval()
        module.train = disabled_train  # LAVIS's convention: frozen towers stay in eval mode
        logger.info("froze %s", name)
        return module


# ---- from_config helpers: the model keys -> constructor arguments --------------------------------------
COMPONENT_KEYS = ("qformer_tokenizer", "qformer_model", "qformer_config", "vit_config", "vit_depth")
"""Keys the hooks above read (through ``_component``), handed to the constructor as ``components``."""

LLM_OPTIONS: Mapping[str, Any] = MappingProxyType({
    "prompt": "",  # the caption prompt (a VQA question's prompt is the dataset's: datasets.<name>.prompt)
    "freeze_llm": True,
    "llm_precision": None,  # the LLM's storage dtype; null: the family's (LLMSpec.default_storage)
    "qformer_text_input": False,  # the question reaches the Q-Former too (the paper's VQA fine-tuning)
    "lora_llm": None, "llm_grad_checkpoint": False,  # the LLM's training strategy (lavis_ext.models.strategies)
    **QUANTIZATION_DEFAULTS,  # an 8/4-bit frozen LLM (LLMQuantization)
})
"""The keys of every BLIP-2 class with an LLM (OPT, Flan-T5, a new family) beside the shared ones and the family's
``LLMSpec.source_keys``; composed by :func:`llm_model_options`."""
_LLM_ARGUMENTS = ("prompt", "freeze_llm", "llm_precision", "qformer_text_input")  # constructor arguments of that name


def llm_model_options(spec: LLMSpec, **own: Any) -> Mapping[str, Any]:
    """The ``model_options`` of a BLIP-2 class with an LLM of ``spec``'s family: the shared keys
    (:attr:`Blip2ComponentsMixin.model_options`), :data:`LLM_OPTIONS`, the family's sources (``opt_model``,
    ``opt_tokenizer``, ``opt_config``: null by default), then the class's ``own`` keys and defaults."""
    return MappingProxyType({**Blip2ComponentsMixin.model_options, **LLM_OPTIONS, **dict.fromkeys(spec.source_keys),
                             **own})


def vision_kwargs(opts: Mapping) -> dict:
    """Constructor arguments of the image side, from a class's ``options(cfg)``."""
    return {
        "vit_model": opts["vit_model"],
        "img_size": opts["image_size"],
        "drop_path_rate": opts["drop_path_rate"],
        "use_grad_checkpoint": opts["use_grad_checkpoint"],
        "vit_precision": _vit_precision(opts),
        "freeze_vit": opts["freeze_vit"],
        "num_query_token": opts["num_query_token"],
        "cross_attention_freq": opts["cross_attention_freq"],
        "components": {key: opts[key] for key in COMPONENT_KEYS},
    }


def llm_kwargs(opts: Mapping, cfg, spec: LLMSpec) -> dict:
    """Constructor arguments of the LLM side (``opt_model=...``, ``prompt=...``, ``llm_quantization=...``), from a
    class's ``options(cfg)``. The quantisation reads ``cfg`` itself: it tells a 4-bit key set in the project from its
    default (:meth:`LLMQuantization.from_config`)."""
    return {**{key: opts[key] for key in (*_LLM_ARGUMENTS, *spec.source_keys)},
            "llm_quantization": LLMQuantization.from_config(cfg, spec)}


def with_options(cfg, opts: Mapping) -> dict:
    """``cfg`` as a plain dict with a class's ``options(cfg)`` over it: what ``finish_from_config`` gets, so the
    strategy and checkpoint code see the defaults stated here, while a key the class does not declare still reaches
    them (``lora_llm`` on a stage-1 model fails there, as before)."""
    return {**_plain(cfg), **opts}


def _vit_precision(opts: Mapping) -> str:
    """A ViT that trains stays fp32: fp16 ViT training diverges (LAVIS#409), as the paper notes."""
    precision = opts["vit_precision"]
    if precision == "fp16" and not opts["freeze_vit"]:
        logger.info("freeze_vit is false: keeping the ViT in fp32 instead of vit_precision fp16")
        return "fp32"
    return precision


def env_path(value: str | None) -> str | None:
    """Expand ~ and $VARS in a configured path (hub names pass through unchanged)."""
    return os.path.expandvars(os.path.expanduser(value)) if isinstance(value, str) else value


# ---- LAVIS release checkpoints ------------------------------------------------------------------
class CheckpointPickleError(ValueError):
    """A ``.pth`` file that ``torch.load(weights_only=True)`` refuses: its pickle needs more than tensors."""


@contextlib.contextmanager
def eva_depth(model_name: str, depth) -> Iterator[None]:
    """``model.vit_depth``: LAVIS's EVA ViT-g with its first ``depth`` blocks (39 in LAVIS).

    ``create_eva_vit_g`` fixes ``depth=39`` and loads ``eva_vit_g.pth`` with ``strict=False``, so a
    shallower tower built by it takes the file's first blocks and ignores the rest, as LAVIS ignores the
    file's 40th. Here the class it builds is wrapped for the duration of the call (LAVIS calls its module
    global), so the URL, the cache lookup, the position-embedding interpolation and the fp16 conversion
    stay LAVIS's own. Used for reduced-depth runs at real width (tests; quick checks of a recipe).
    """
    if depth is None:
        yield
        return
    if model_name != "eva_clip_g":
        raise ValueError(f"model.vit_depth applies to vit_model eva_clip_g, not {model_name!r}; remove vit_depth")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"model.vit_depth {depth!r} must be a positive integer (LAVIS's EVA ViT-g has 39 blocks)")
    from lavis.models import eva_vit

    lavis_class = eva_vit.VisionTransformer

    def with_depth(*args, **kwargs):
        kwargs["depth"] = depth
        return lavis_class(*args, **kwargs)

    eva_vit.VisionTransformer = with_depth
    try:
        yield
    finally:
        eva_vit.VisionTransformer = lavis_class


def resolve_release(url_or_filename: str) -> str:
    """A checkpoint URL -> the file LAVIS's ``download_cached_file`` keeps it as (fetched only when
    absent); a local path -> itself.

    Raises:
        FileNotFoundError: a local path that does not exist, or a URL not cached and not downloadable.
    """
    from urllib.parse import urlparse

    if urlparse(url_or_filename).scheme in ("http", "https"):
        from lavis.common.dist_utils import download_cached_file

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url_or_filename).path))
        try:
            return download_cached_file(url_or_filename, check_hash=False, progress=False)
        except OSError as error:  # URLError is an OSError
            raise FileNotFoundError(
                f"checkpoint {url_or_filename} is not cached at {cached} and could not be downloaded ({error}); "
                "put the file there (TORCH_HOME moves the cache) or set the model's pretrained/finetuned to a local path"
            ) from error
    if not os.path.isfile(url_or_filename):
        raise FileNotFoundError(f"checkpoint {url_or_filename!r} does not exist; set a valid path or URL")
    return url_or_filename


def load_pth(path: str):
    """``torch.load(path, weights_only=True)`` on CPU, refusing pickles that need more, with the fix.

    Raises:
        CheckpointPickleError: the pickle references classes or functions (names the file and the fix).
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise CheckpointPickleError(
            f"refused to load {path}: its pickle needs more than tensors and plain containers ({detail.strip()}), "
            "and lavis-ext reads .pth files with torch.load(weights_only=True) so that loading cannot run code. "
            "If you trust the file, re-save its weights once: "
            "ckpt = torch.load(PATH, weights_only=False); torch.save({'model': ckpt['model']}, NEW_PATH) "
            "(a plain dict of tensors), then point model.pretrained / model.finetuned at NEW_PATH"
        ) from error


def load_report(source: str, path: str, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict:
    """What a ``strict=False`` load of ``state`` into a model with state dict ``own`` did: ``missing``
    (model tensors the checkpoint does not hold: in a LAVIS release, the frozen towers, which come from
    their own weights) and ``unexpected`` (checkpoint tensors the model has no place for), both sorted,
    with per-module counts of the missing ones.

    Computed from the key sets, not from ``load_state_dict``'s result: torch does not count a tensor as
    unexpected when its submodule was set to None (LAVIS's stage-2 ``__init__`` does that to the Q-Former's
    text side), so a stage-1 checkpoint's text layers would be dropped without a word.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    by_module: dict[str, int] = {}
    for key in missing:
        top = key.split(".", 1)[0]
        by_module[top] = by_module.get(top, 0) + 1
    return {
        "source": source,
        "file": path,
        "tensors": len(state),
        "loaded": len(state) - len(unexpected),
        "missing": missing,
        "unexpected": unexpected,
        "missing_by_module": by_module,
    }
