"""Entry points: `train.py`, `evaluate.py` and the `lavis-ext` command.

LAVIS's train.py has no hook for third-party modules, hard-codes nccl, and lives outside its wheel,
so this is our own small version of it: parse (LAVIS's `--cfg-path` / `--options`), check the
config strictly, initialise distributed (gloo on CPU, nccl on GPU), seed, build task, datasets and
model, and hand over to the registered runner. Functions take `argv` so tests run the real path
in-process.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

import lavis_ext

lavis_ext.register()  # the entry point: shims + registration before anything LAVIS is resolved
from lavis.common.dist_utils import get_rank, is_main_process

from lavis_ext import dist as ext_dist
from lavis_ext.checkpoints import resolve_checkpoint
from lavis_ext.config import load_config

logger = logging.getLogger("lavis_ext")


def parse_args(argv=None, description="lavis-ext", checkpoint=False):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the project YAML")
    parser.add_argument(
        "--options",
        nargs="+",
        default=None,
        help="override config entries, e.g. --options run.max_epoch=2 run.output_dir=runs/x",
    )
    if checkpoint:
        parser.add_argument(
            "--checkpoint",
            default=None,
            help="a checkpoint or run directory to evaluate (lavis_ext.checkpoints.resolve_checkpoint: best, else latest); "
            "the same as --options model.load_finetuned=True model.finetuned=FILE",
        )
    args = parser.parse_args(argv)
    if getattr(args, "checkpoint", None):
        path = resolve_checkpoint(args.checkpoint)
        args.options = [*(args.options or []), "model.load_finetuned=True", f"model.finetuned={path}"]
    return args


def setup_seeds(seed: int) -> None:
    seed = int(seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging() -> None:
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _add_log_file(output_dir: Path) -> logging.Handler | None:
    if not is_main_process():
        return None
    handler = logging.FileHandler(output_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def build_runner(cfg, job_id: str, resume_path: str | None = None):
    from lavis import tasks
    from lavis.common.registry import registry

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    kwargs = {"resume_path": resume_path} if resume_path is not None else {}
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets, **kwargs)


def _run(argv, description, action, checkpoint=False):
    args = parse_args(argv, description, checkpoint=checkpoint)
    cfg = load_config(args)
    ext_dist.init_distributed(cfg.run_cfg)
    setup_logging()
    setup_seeds(cfg.run_cfg.get("seed", 42))
    # one job id for all ranks and nodes (each used to take its own clock); with run.resume=auto the
    # folder of the checkpoint found (lavis_ext.runners.resume.prepare_resume)
    from lavis_ext.runners.resume import prepare_resume

    job_id, resume_path = prepare_resume(cfg.run_cfg)
    runner = build_runner(cfg, job_id, resume_path)
    handler = _add_log_file(Path(runner.output_dir))
    try:
        result = action(runner)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if is_main_process():
        print(f"run directory: {runner.output_dir}", flush=True)
    return runner, result


def train(argv=None):
    """Train (and validate/test) as the project YAML says. Returns the runner."""
    runner, _ = _run(argv, "Train a model with a LAVIS project file.", lambda r: r.train())
    return runner


def evaluate(argv=None):
    """Evaluate the configured model on `run.test_splits`. Returns (runner, {split: metrics})."""
    return _run(argv, "Evaluate a model with a LAVIS project file.", lambda r: r.evaluate(skip_reload=True), checkpoint=True)


# `lavis-ext NAME ...` -> "module:function"; each function takes the remaining argv and returns an exit code.
# Imported lazily so that one command's dependencies (onnxruntime, FastAPI, Gradio...) never slow another.
SUBCOMMANDS = {
    "data": "lavis_ext.datasets.synthetic:main",
    "shards": "lavis_ext.datasets.to_shards:main",
    "score": "lavis_ext.evaluation.score:main",
    "report": "lavis_ext.report:main",
    "reproduce": "lavis_ext.reproduce:main",
    "hf": "lavis_ext.interop.hf_bridge:main",
    "onnx": "lavis_ext.interop.onnx_export:main",
    "tensorrt": "lavis_ext.interop.tensorrt_build:main",
    "serve": "lavis_ext.serve.server:main",
    "gradio": "lavis_ext.serve.gradio_app:main",
    "video": "lavis_ext.apps.video:main",
    "ask": "lavis_ext.apps.question_packs:main",
    "new": "lavis_ext.scaffold:main",
}


def main(argv=None) -> int:
    """`lavis-ext {train,evaluate,<SUBCOMMANDS>} ...`"""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "evaluate": evaluate}
    if argv and argv[0] in SUBCOMMANDS:
        module, function = SUBCOMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:]) or 0
    if not argv or argv[0] not in commands:
        names = ",".join([*commands, *SUBCOMMANDS])
        print(f"usage: lavis-ext {{{names}}} ...", file=sys.stderr)
        return 2
    commands[argv[0]](argv[1:])
    ext_dist.shutdown()
    return 0
