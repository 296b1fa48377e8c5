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
    # what every run has: LAVIS's runners, the loop, the optimizer and schedule, data loading, distributed init
    "task", "runner", "lr_sched", "init_lr", "min_lr", "warmup_lr", "warmup_steps", "weight_decay",
    "lr_decay_rate", "beta2", "max_epoch", "max_iters", "iters_per_inner_epoch", "batch_size_train",
    "batch_size_eval", "num_workers", "accum_grad_iters", "seed",
    "output_dir", "amp", "resume_ckpt_path", "evaluate", "train_splits", "valid_splits", "test_splits",
    "device", "world_size", "dist_url", "distributed", "use_dist_eval_sampler", "log_freq",
    "train_dataset_ratios", "save_freq",
    # ours
    "amp_dtype", "vit_layer_decay", "optimizer_impl", "compile", "max_grad_norm", "max_nonfinite_in_row", "nonfinite_check",
    "val_freq", "dist_timeout_s",
    # resume and checkpoints (lavis_ext.runners.runner_base, docs/distributed.md)
    "resume", "job_id", "save_every_steps", "keep_step_checkpoints", "min_free_disk_mb",
    # sharding (lavis_ext.runners.fsdp)
    "fsdp", "fsdp_param_dtype",
    # written by distributed init
    "rank", "gpu", "dist_backend",
}
"""Every task accepts these; a task's own options are its class's ``run_options`` (lavis_ext/tasks/)."""

LAVIS_TASK_RUN_KEYS = {
    "max_len", "min_len", "num_beams", "report_metric", "prompt", "inference_method", "num_ans_candidates", "k_test",
}
"""What LAVIS's own tasks (those without ``run_options``: ``captioning``, ``vqa``, ``retrieval``, ...) read."""

RUN_KEY_HINTS = {
    "prompt": "the dataset applies the question prompt once, at training and evaluation alike: set "
              "datasets.<name>.prompt (e.g. \"Question: {} Answer:\"); a run.prompt would be applied a second time",
}

DATASET_KEYS = {
    "data_type", "build_info", "vis_processor", "text_processor", "type",
    "sample_ratio",  # mixing several training datasets (lavis_ext.runners.runner_base, LAVIS main's key)
}
"""Every builder has these (LAVIS's base builder and the runner read them); a builder's own keys are its class's
``dataset_options`` (lavis_ext.datasets.builders.OptionsBuilder)."""

DATASET_KEY_HINTS = {
    "prompt": "a caption prompt belongs to the text processor (text_processor.train.prompt, e.g. \"a photo of \"); "
              "datasets.<name>.prompt is the question prompt of a VQA builder",
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
    """The ``run.*`` keys valid for a task: the shared ones plus the task class's own ``run_options`` (ours, and a
    research project's task, declare them there), or what LAVIS's tasks read for a class without them."""
    own = getattr(_mapping("task_name_mapping").get(task_name), "run_options", None)
    return RUN_KEYS | (set(own) if own is not None else LAVIS_TASK_RUN_KEYS)


def model_keys_for(arch) -> set[str]:
    """The ``model.*`` keys valid for an architecture: its class's ``model_options`` (ours, and a research project's
    model, declare every key they read there: ``t5_model`` on ``blip2_opt_ext`` is refused), or, for LAVIS's own
    classes, which declare none, every key our classes know."""
    own = getattr(_mapping("model_name_mapping").get(arch), "model_options", None)
    if own is not None:
        return set(own)
    ours = [cls.model_options for cls in _mapping("model_name_mapping").values()
            if cls.__module__.startswith("lavis_ext.") and getattr(cls, "model_options", None) is not None]
    return set().union(*ours)


def model_option(model_cfg, key: str):
    """``model.<key>`` of a model config, else the default its arch's class states in ``model_options``.

    LAVIS's own classes state none; they get the default our BLIP-2 classes share
    (:attr:`lavis_ext.models.components.Blip2ComponentsMixin.model_options`). For ``image_size`` (224) and
    ``max_txt_len`` (32) those are the defaults of LAVIS's BLIP-2 constructors too; its BLIP (v1) models default
    to 384 px and 30-40 tokens, which their model-type YAMLs state.

    Raises:
        KeyError: ``key`` is no model option of the arch's class (nor of ours).
    """
    from lavis_ext.models.components import Blip2ComponentsMixin

    arch = model_cfg.get("arch")
    own = getattr(_mapping("model_name_mapping").get(arch), "model_options", None)
    defaults = {**Blip2ComponentsMixin.model_options, **(own or {})}
    if key not in defaults:
        raise KeyError(f"model.{key} is not a model option of {arch!r}; its class's model_options: {sorted(defaults)}")
    return model_cfg.get(key, defaults[key])


def dataset_keys_for(name) -> set[str]:
    """The dataset-level keys valid for a builder: the shared ones plus its class's ``dataset_options``."""
    return DATASET_KEYS | set(getattr(_mapping("builder_name_mapping").get(name), "dataset_options", None) or {})


def _owners(mapping: str, attribute: str, key: str) -> list[str]:
    return sorted(name for name, cls in _mapping(mapping).items() if key in (getattr(cls, attribute, None) or {}))


def check_keys(cfg) -> None:
    """Keys of the merged LAVIS `Config` (run, model, datasets)."""
    task = cfg.run_cfg.get("task")
    run_keys = run_keys_for(task)
    for key in cfg.run_cfg:
        if key in RUN_KEY_HINTS and key not in run_keys:
            raise ConfigError(f"run.{key} is not an option of task {task!r}: {RUN_KEY_HINTS[key]}")
        if key not in run_keys:
            owners = _owners("task_name_mapping", "run_options", key)
            if owners:  # a real option, of other tasks: the project was written for one of them
                raise ConfigError(
                    f"run.{key} is an option of task{'s' * (len(owners) > 1)} {', '.join(map(repr, owners))}, not of "
                    f"{task!r}; remove it "
                    f"from the project (or start from a project written for {task!r})"
                )
            _fail("run key", key, run_keys, f"run.{key} (task {task!r})")
    arch = cfg.model_cfg.get("arch")
    model_keys = model_keys_for(arch)
    for key in cfg.model_cfg:
        if key in model_keys:
            continue
        owners = _owners("model_name_mapping", "model_options", key)
        if owners:  # a real key, of other model classes (another LLM family's, an LLM key on stage 1, ...)
            raise ConfigError(
                f"model.{key} is a key of arch{'s' * (len(owners) > 1)} {', '.join(map(repr, owners))}, not of "
                f"{arch!r}; remove it from the project (or set model.arch to the class that reads it)"
            )
        _fail("model key", key, model_keys, f"model.{key} (arch {arch!r})")
    for name, dcfg in cfg.datasets_cfg.items():
        dataset_keys = dataset_keys_for(name)
        for key in dcfg:
            if key in dataset_keys:
                continue
            owners = _owners("builder_name_mapping", "dataset_options", key)
            if owners:  # a real key, of other builders
                hint = DATASET_KEY_HINTS.get(key, "remove it from the project")
                raise ConfigError(
                    f"datasets.{name}.{key} is a key of builder{'s' * (len(owners) > 1)} {', '.join(map(repr, owners))}, "
                    f"not of {name!r}; {hint}"
                )
            _fail("dataset key", key, dataset_keys, f"datasets.{name}.{key} (builder {name!r})")
    check_run_values(cfg.run_cfg)


def check_run_values(run_cfg) -> None:
    """Run values that can be judged from the config alone, so a bad one fails before data and model are built
    (the modules that own them check again where they are used)."""
    from lavis_ext.runners.compile import compile_mode

    try:
        compile_mode(run_cfg.get("compile"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


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
