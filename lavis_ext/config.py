"""Strict checks of a project config, so a typo fails before any data or model is built.

LAVIS returns None for an unknown registry name and fails much later (`TypeError: 'NoneType' object
is not callable`), and it silently ignores unknown keys (a misspelt `max_epochs` trains with the
default). `check_names` runs on the raw YAML (before LAVIS's `Config` resolves model types);
`check_keys` runs on the merged config. Both raise :class:`ConfigError` naming the bad value and the
closest valid ones.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

from lavis_ext import compat

compat.apply()  # LAVIS cannot be imported before its shims
from lavis.common.registry import registry  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lavis_ext import custom_imports  # noqa: E402
from lavis_ext.project_files import load_project_yaml  # noqa: E402,F401  (re-exported: the one reader)


class ConfigError(ValueError):
    """A project config names something that does not exist."""


RUN_KEYS = {
    # what LAVIS's runners and tasks read
    "task", "runner", "lr_sched", "init_lr", "min_lr", "warmup_lr", "warmup_steps", "weight_decay",
    "lr_decay_rate", "beta2", "max_epoch", "max_iters", "iters_per_inner_epoch", "batch_size_train",
    "batch_size_eval", "num_workers", "accum_grad_iters", "max_len", "min_len", "num_beams", "seed",
    "output_dir", "amp", "resume_ckpt_path", "evaluate", "train_splits", "valid_splits", "test_splits",
    "device", "world_size", "dist_url", "distributed", "use_dist_eval_sampler", "log_freq",
    "report_metric", "prompt", "inference_method", "num_ans_candidates", "train_dataset_ratios",
    "k_test", "save_freq",
    "losses",  # retrieval_ext: which stage-1 losses to optimise (itc, itm, itg)
    # ours
    "amp_dtype", "vit_layer_decay", "optimizer_impl", "max_grad_norm", "max_nonfinite_in_row", "val_freq", "constant_baseline", "length_penalty", "dist_timeout_s",
    # resume and checkpoints (lavis_ext.runners.runner_base, docs/distributed.md)
    "resume", "job_id", "save_every_steps", "keep_step_checkpoints", "min_free_disk_mb",
    # sharding (lavis_ext.runners.fsdp)
    "fsdp", "fsdp_param_dtype",
    # written by distributed init
    "rank", "gpu", "dist_backend",
}

MODEL_KEYS = {
    "arch", "model_type", "load_finetuned", "load_pretrained", "pretrained", "finetuned",
    "vit_model", "vit_config", "vit_depth", "image_size", "drop_path_rate", "use_grad_checkpoint", "vit_precision",
    "freeze_vit", "num_query_token", "cross_attention_freq", "embed_dim", "max_txt_len", "prompt",
    "qformer_tokenizer", "qformer_model", "qformer_config",
    "opt_model", "opt_tokenizer", "opt_config", "t5_model", "t5_tokenizer", "t5_config",
    "freeze_llm", "llm_precision", "apply_lemmatizer",
    "decode_impl",  # lean | hf: OPT's decode loop (lavis_ext.models.decode) or transformers' generate
    "decode_impl",  # lean | hf: OPT's decode loop (lavis_ext.models.decode) or transformers' generate
    # training strategy (lavis_ext.models.strategies)
    "freeze_qformer", "lora_llm", "lora_qformer", "qformer_text_input",
    "qformer_grad_checkpoint", "llm_grad_checkpoint",
    # 8/4-bit frozen LLM (lavis_ext.models.llm_specs.QUANTIZATION_DEFAULTS)
    "llm_quantization", "llm_4bit_quant_type", "llm_4bit_double_quant", "llm_4bit_compute_dtype",
}

DATASET_KEYS = {
    "data_type", "build_info", "vis_processor", "text_processor", "shuffle_buffer", "prompt", "type",
    "on_bad_record",  # lavis_ext.datasets.bad_records: skip (count, report) or error
    "sample_ratio",  # mixing several training datasets (lavis_ext.runners.runner_base, LAVIS main's key)
}


def project_config(args):
    """LAVIS's `Config` (model defaults < project file < --options) of the project file with its `_base_`
    chain merged (:func:`load_project_yaml`; LAVIS reads the file itself and would see only the child's
    keys, so its three builders get the merged file instead), with `--options model.model_type=X` (or
    `model.arch=Y`) selecting X's default YAML. LAVIS looks the override up as the flat key
    "model.model_type" in the nested options and never finds it, so it silently merged the project's
    own type's defaults under the override."""
    from lavis.common.config import Config

    project = load_project_yaml(args.cfg_path)

    class _Config(Config):
        @staticmethod
        def build_runner_config(config):
            return Config.build_runner_config(project)

        @staticmethod
        def build_model_config(config, **kwargs):
            config = project
            model_override = kwargs.get("model") or {}
            if model_override:
                config = OmegaConf.merge(config, {"model": model_override})
            return Config.build_model_config(config)

        @staticmethod
        def build_dataset_config(config):
            return Config.build_dataset_config(project)

    return _Config(args)


def _fail(kind: str, value, valid: Iterable[str], where: str) -> None:
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"valid: {', '.join(valid[:30])}"
    raise ConfigError(f"unknown {kind} {value!r} at {where}; {hint}")


def _mapping(name: str) -> dict:
    return registry.mapping[name]


def check_names(raw) -> None:
    """Registry names in a project YAML (an OmegaConf node with model/datasets/run)."""
    model = raw.get("model") or {}
    arch = model.get("arch")
    if arch is None:
        raise ConfigError("model.arch is missing; e.g. arch: blip2_opt_ext")
    if arch not in _mapping("model_name_mapping"):
        _fail("model arch", arch, _mapping("model_name_mapping"), "model.arch")
    model_cls = _mapping("model_name_mapping")[arch]
    model_type = model.get("model_type")
    if model_type is not None and model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        _fail(f"model_type for {arch}", model_type, model_cls.PRETRAINED_MODEL_CONFIG_DICT, "model.model_type")
    datasets = raw.get("datasets") or {}
    if not datasets:
        raise ConfigError("no datasets: the project needs a `datasets:` section")
    for name, dcfg in datasets.items():
        if name not in _mapping("builder_name_mapping"):
            _fail("dataset builder", name, _mapping("builder_name_mapping"), f"datasets.{name}")
        _check_processors(dcfg or {}, f"datasets.{name}")
    run = raw.get("run") or {}
    for key, mapping, default in (
        ("task", "task_name_mapping", None),
        ("runner", "runner_name_mapping", "runner_base"),
        ("lr_sched", "lr_scheduler_name_mapping", None),
    ):
        value = run.get(key, default)
        if value is None and key == "lr_sched" and run.get("evaluate", False):
            continue  # evaluation-only runs build no optimizer
        if value is None:
            raise ConfigError(f"run.{key} is missing; valid: {', '.join(sorted(_mapping(mapping)))}")
        if value not in _mapping(mapping):
            _fail(f"run.{key}", value, _mapping(mapping), f"run.{key}")


def _check_processors(dcfg, where: str) -> None:
    for kind in ("vis_processor", "text_processor"):
        for split, pcfg in (dcfg.get(kind) or {}).items():
            name = (pcfg or {}).get("name")
            if name is not None and name not in _mapping("processor_name_mapping"):
                _fail("processor", name, _mapping("processor_name_mapping"), f"{where}.{kind}.{split}.name")


def run_keys_for(task_name) -> set[str]:
    """The ``run.*`` keys valid for a task: the shared ones plus the task class's own ``run_keys`` (a task in a
    research project declares its options there instead of editing this file)."""
    task_cls = _mapping("task_name_mapping").get(task_name)
    return RUN_KEYS | set(getattr(task_cls, "run_keys", ()))


def check_keys(cfg) -> None:
    """Keys of the merged LAVIS `Config` (run, model, datasets)."""
    run_keys = run_keys_for(cfg.run_cfg.get("task"))
    for key in cfg.run_cfg:
        if key not in run_keys:
            _fail("run key", key, run_keys, f"run.{key}")
    for key in cfg.model_cfg:
        if key not in MODEL_KEYS:
            _fail("model key", key, MODEL_KEYS, f"model.{key}")
    for name, dcfg in cfg.datasets_cfg.items():
        for key in dcfg:
            if key not in DATASET_KEYS:
                _fail("dataset key", key, DATASET_KEYS, f"datasets.{name}.{key}")


def load_config(args):
    """A project file as ``train.py`` loads it (``args``: ``cfg_path`` and ``options``, as parsed by the CLI):
    the project's ``custom_imports``, the strict names check on the raw YAML, LAVIS's 3-level merge, then the
    strict keys check."""
    cfg_path = Path(args.cfg_path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--cfg-path {args.cfg_path!r} does not exist")
    raw = OmegaConf.merge(load_project_yaml(cfg_path), OmegaConf.from_dotlist(list(args.options or [])))
    custom = raw.get(custom_imports.KEY)
    custom_imports.import_custom_modules(custom, cfg_path.parent)  # before the names check: they register names
    check_names(raw)
    cfg = project_config(args)
    check_keys(cfg)
    if custom:  # kept in the run's saved config, so a checkpoint loads with the same modules
        cfg.config[custom_imports.KEY] = list(custom) if not isinstance(custom, str) else [custom]
        cfg.config[custom_imports.DIR_KEY] = str(cfg_path.parent.resolve())
    return cfg
