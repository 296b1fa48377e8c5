"""One way from a trained checkpoint (or a project YAML) to a ready model with its processors.

Every consumer (the HTTP server, the Gradio demo, the LangChain tools, video captioning, question packs,
export, ``evaluate.py --checkpoint``) goes through :func:`load`, so they all see the same weights, the
same image preprocessing and the same decoding defaults as the run that produced the checkpoint.

Sources:
* a checkpoint ``.safetensors`` written by our runner: its metadata carries the resolved run config, so
  the model, processors, prompts and decoding settings are rebuilt from it; only the trainable tensors
  are stored, the frozen base comes from the config (hub names, local paths, or the tiny inline configs);
* a run directory: its ``checkpoint_best.safetensors``, else the checkpoint ``latest`` points to;
* a project YAML (``--cfg-path`` format) with optional ``--options``: the model as configured (for
  example ``model.finetuned`` set, or the released weights named by ``model_type``).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

import lavis_ext

lavis_ext.register()  # an entry point of its own (server, apps, scripts): shims + registration
from lavis.common.registry import registry  # noqa: E402

from lavis_ext.checkpoints import load_trainable, read_metadata, resolve_checkpoint
from lavis_ext.config import load_config, model_option
from lavis_ext.custom_imports import DIR_KEY as CUSTOM_DIR_KEY
from lavis_ext.custom_imports import KEY as CUSTOM_KEY
from lavis_ext.custom_imports import import_custom_modules
from lavis_ext.images import to_rgb8
from lavis_ext.models.llm_specs import spec_for_arch
from lavis_ext.processors import fuse_image_processor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """Decoding options a caller (HTTP client, UI, agent) may choose, with hard limits so one request
    cannot take the server down (a 50-beam, 500-token request is minutes of compute)."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    use_nucleus_sampling: bool = False
    top_p: float = 0.9
    temperature: float = 1.0

    LIMITS = {
        "num_beams": (1, 10),
        "max_new_tokens": (1, 100),
        "min_new_tokens": (0, 100),
        "length_penalty": (-5.0, 5.0),
        "repetition_penalty": (0.5, 5.0),
        "top_p": (0.01, 1.0),
        "temperature": (0.05, 5.0),
    }

    def __post_init__(self):
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"decoding option {name}={value!r} must be a number in [{low}, {high}]")
            if name in ("num_beams", "max_new_tokens", "min_new_tokens") and int(value) != value:
                raise ValueError(f"decoding option {name}={value!r} must be an integer in [{low}, {high}]")
            if not low <= value <= high:
                raise ValueError(f"decoding option {name}={value!r} is outside [{low}, {high}]; choose a value in range")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}; lower min_new_tokens"
            )

    def with_options(self, **options) -> "Decoding":
        """A copy with ``options`` applied (``None`` values ignored); unknown names fail and are listed."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown decoding option(s) {unknown}; valid: {sorted(known)}")
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def caption_kwargs(self) -> dict:
        """Keyword arguments of the models' LAVIS-style ``generate``."""
        return {
            "num_beams": int(self.num_beams),
            "max_length": int(self.max_new_tokens),
            "min_length": int(self.min_new_tokens),
            "length_penalty": float(self.length_penalty),
            "repetition_penalty": float(self.repetition_penalty),
            "use_nucleus_sampling": bool(self.use_nucleus_sampling),
            "top_p": float(self.top_p),
            "temperature": float(self.temperature),
        }

    def answer_kwargs(self) -> dict:
        """Keyword arguments of the models' ``predict_answers`` (beam search only, as LAVIS)."""
        return {
            "num_beams": int(self.num_beams),
            "max_len": int(self.max_new_tokens),
            "min_len": int(self.min_new_tokens),
            "length_penalty": float(self.length_penalty),
        }

    def to_dict(self) -> dict:
        return asdict(self)


class Blip2Predictor:
    """A loaded BLIP-2 with its eval image processor, prompts and decoding defaults.

    ``encode`` runs the vision encoder once; ``caption`` / ``answer`` accept images (PIL) or those
    cached features, so several questions about one image pay for the ViT once.
    """

    def __init__(self, model, vis_processor, config: DictConfig, source: str, device: torch.device):
        self.model = model.eval()
        self.vis_processor = fuse_image_processor(vis_processor)  # same tensors, without ToTensor's copies
        self.config = config
        self.source = source
        self.device = device
        run = config.get("run", {})
        self.caption_prompt = model.prompt if isinstance(getattr(model, "prompt", None), str) else ""
        self.question_prompt = _question_prompt(config)
        # the run's decoding settings over the defaults the tasks state; a run that did not answer questions
        # lends its beams and length penalty, not its caption lengths
        caption = registry.get_task_class("captioning_ext").options(run)
        answer = registry.get_task_class("vqa_ext").options(
            run if _is_vqa(config) else {k: run[k] for k in ("num_beams", "length_penalty") if k in run}
        )
        self.caption_decoding = Decoding(
            num_beams=int(caption["num_beams"]),
            max_new_tokens=int(caption["max_len"]),
            min_new_tokens=int(caption["min_len"]),
        )
        self.answer_decoding = Decoding(
            num_beams=int(answer["num_beams"]),
            max_new_tokens=int(answer["max_len"]),
            min_new_tokens=int(answer["min_len"]),
            length_penalty=float(answer["length_penalty"]),
        )

    # ---- properties callers report ------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.config.model.arch)

    @property
    def image_size(self) -> int:
        return int(model_option(self.config.model, "image_size"))

    def describe(self) -> dict:
        return {
            "source": self.source,
            "arch": self.arch,
            "model_type": self.config.model.get("model_type"),
            "device": str(self.device),
            "image_size": self.image_size,
            "caption_prompt": self.caption_prompt,
            "question_prompt": self.question_prompt,
            "caption_decoding": self.caption_decoding.to_dict(),
            "answer_decoding": self.answer_decoding.to_dict(),
        }

    # ---- the image side -------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images (any mode; 16-bit ones scaled, not clipped: :func:`lavis_ext.images.to_rgb8`) -> the normalised
        batch the model was trained on, on the model's device."""
        if not images:
            raise ValueError("no images given")
        batch = torch.stack([self.vis_processor(to_rgb8(image)) for image in images])
        return batch.to(self.device)

    @torch.no_grad()
    def encode(self, images: Sequence) -> torch.Tensor:
        """The ViT features of ``images`` (reusable by ``caption`` / ``answer`` as ``features=``)."""
        return self.model.encode_vision(self.preprocess(images))

    def _image_side(self, images, features) -> dict:
        if features is not None:
            return {"image_embeds": features}
        return {"image": self.preprocess(images)}

    # ---- tasks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, images: Sequence | None = None, prompt: str | None = None, decoding: Decoding | None = None,
                features: torch.Tensor | None = None) -> list[str]:
        """One caption per image (``decoding.num_beams`` beams; the training prompt unless ``prompt``)."""
        decoding = decoding or self.caption_decoding
        samples = self._image_side(images, features)
        samples["prompt"] = self.caption_prompt if prompt is None else prompt
        return self.model.generate(samples, **decoding.caption_kwargs())

    @torch.no_grad()
    def answer(self, images: Sequence | None, questions: Sequence[str], decoding: Decoding | None = None,
               features: torch.Tensor | None = None) -> list[str]:
        """Answer ``questions[i]`` about image ``i`` (or about the one image / feature row given, repeated)."""
        decoding = decoding or self.answer_decoding
        questions = [str(q) for q in questions]
        if not questions or any(not q.strip() for q in questions):
            raise ValueError("every question must be a non-empty string")
        samples = self._image_side(images, features)
        key = next(iter(samples))
        count = samples[key].size(0)
        if count == 1 and len(questions) > 1:
            samples[key] = samples[key].expand(len(questions), *samples[key].shape[1:])
        elif count != len(questions):
            raise ValueError(f"got {count} images for {len(questions)} questions; give one image or one per question")
        samples["text_input"] = [self.question_prompt.format(q) for q in questions]
        samples["question"] = questions
        return self.model.predict_answers(samples, **decoding.answer_kwargs())


# ---- loading --------------------------------------------------------------------------------------
def checkpoint_config(path: str | Path) -> DictConfig:
    """The resolved run config stored in one of our checkpoints."""
    meta = read_metadata(path)
    config = meta.get("config")
    if isinstance(config, str):
        config = json.loads(config)
    if not config or "model" not in config:
        raise ValueError(
            f"{path} carries no model config in its metadata (not written by lavis_ext's runner?); "
            "load it through a project YAML with --cfg-path and model.finetuned instead"
        )
    return OmegaConf.create(config)


def project_file_config(cfg_path: str | Path, options: Iterable[str] = ()) -> DictConfig:
    """A project YAML resolved as `train.py` does (model defaults < file < options), strictly checked."""
    cfg = load_config(argparse.Namespace(cfg_path=str(cfg_path), options=list(options) or None))
    return cfg.config


def load(source: str | Path | None = None, *, cfg_path: str | Path | None = None, options: Iterable[str] = (),
         device: str | torch.device | None = None) -> Blip2Predictor:
    """Checkpoint / run directory (``source``) or project YAML (``cfg_path`` + ``options``) -> predictor."""

    if (source is None) == (cfg_path is None):
        raise ValueError("give exactly one of a checkpoint/run directory or cfg_path (a project YAML)")
    from lavis_ext.dist import resolve_device

    device = resolve_device(str(device) if device is not None else "auto")
    checkpoint = None
    if source is not None:
        checkpoint = resolve_checkpoint(source)
        config = checkpoint_config(checkpoint)
        if options:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(options)))
        described = str(checkpoint)
    else:
        config = project_file_config(cfg_path, options)
        described = str(cfg_path)
    project_dir = config.get(CUSTOM_DIR_KEY) or (Path(cfg_path).parent if cfg_path is not None else None)
    import_custom_modules(config.get(CUSTOM_KEY), *([project_dir] if project_dir else []))
    model_cfg = OmegaConf.merge(config.model, {"load_finetuned": False})
    model_cls = registry.get_model_class(model_cfg.arch)
    if model_cls is None:
        raise ValueError(
            f"model arch {model_cfg.arch!r} is not registered; list the module that registers it under "
            "custom_imports in the project YAML"
        )
    model = model_cls.from_config(model_cfg)
    if checkpoint is not None:
        load_trainable(model, checkpoint, require_all_trainable=False)
    elif config.model.get("load_finetuned") and config.model.get("finetuned"):
        model.load_checkpoint(config.model.finetuned)
    model = model.to(device).eval()
    vis_processor = _eval_processor(config)
    logger.info("loaded %s (%s) on %s", described, model_cfg.arch, device)
    return Blip2Predictor(model, vis_processor, config, described, device)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` | ``--cfg-path`` (+ ``--options``) and ``--device``: the model source of every command
    that loads a trained model (serve, gradio, video, ask)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint .safetensors or a run directory (its best, else latest)")
    source.add_argument("--cfg-path", help="a project YAML (e.g. with model.finetuned set) instead of a checkpoint")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, e.g. run.num_beams=3")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def load_from_args(args: argparse.Namespace) -> Blip2Predictor:
    """:func:`load` from the arguments :func:`add_source_arguments` defined."""
    if args.checkpoint:
        return load(args.checkpoint, options=args.options, device=args.device)
    return load(cfg_path=args.cfg_path, options=args.options, device=args.device)


def _dataset_configs(config) -> list:
    datasets = config.get("datasets") or {}
    return [datasets[name] for name in datasets]


def _eval_processor(config):
    """The eval image processor the run used (its dataset's, else `preprocess`, else BLIP's default)."""

    candidates = [d.get("vis_processor") for d in _dataset_configs(config)]
    candidates.append((config.get("preprocess") or {}).get("vis_processor"))
    for proc in candidates:
        if proc is not None and proc.get("eval") is not None:
            cfg = proc.eval
            return registry.get_processor_class(cfg.name).from_config(cfg)
    size = int(model_option(config.model, "image_size"))
    return registry.get_processor_class("blip_image_eval").from_config(OmegaConf.create({"image_size": size}))


def _question_prompt(config) -> str:
    """The VQA prompt the run trained or evaluated with: its dataset's, or that builder's default (the builder
    owns it, :class:`lavis_ext.datasets.builders.OptionsBuilder`); "{}" (the question alone) when none is set."""
    datasets = config.get("datasets") or {}
    for name in datasets:
        options = getattr(registry.get_builder_class(name), "dataset_options", None) or {}
        if "prompt" in options:
            prompt = datasets[name].get("prompt", options["prompt"])
            return str(prompt) if prompt else "{}"
    spec = spec_for_arch(config.model.arch)
    return spec.vqa_prompt if spec is not None else "{}"


def _is_vqa(config) -> bool:
    return "vqa" in str((config.get("run") or {}).get("task", "")) or "gqa" in str((config.get("run") or {}).get("task", ""))

