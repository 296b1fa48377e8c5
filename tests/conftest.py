"""Shared fixtures: a small synthetic dataset (shards + tokenizers) built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

import lavis_ext

lavis_ext.register()  # shims + registration
from lavis_ext.testing import SMALL_SIZES, synthetic_root  # noqa: E402,F401  (shared with research projects)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """torch on one thread for the test: bitwise comparisons of runs must not depend on how work is split."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dirs(synthetic_root) -> dict:
    return {name: synthetic_root / "tokenizers" / name for name in ("bert", "opt", "t5")}


@pytest.fixture(scope="session")
def trained_caption_run(synthetic_root, tmp_path_factory) -> Path:
    """A tiny BLIP-2 OPT trained one short epoch through `train.py`'s path: the run directory (with its
    checkpoint_best.safetensors), for everything that loads a trained model (serving, export, apps)."""
    return _train_quick("projects/tiny/caption_opt.yaml", tmp_path_factory.mktemp("caption_run"))


@pytest.fixture(scope="session")
def trained_vqa_run(synthetic_root, tmp_path_factory) -> Path:
    """The same for tiny BLIP-2 Flan-T5 VQA (questions, the T5 path)."""
    return _train_quick("projects/tiny/vqa_t5.yaml", tmp_path_factory.mktemp("vqa_run"))


def _train_quick(project: str, out: Path) -> Path:
    from tiny_models import QUICK

    from lavis_ext import cli

    runner = cli.train([
        "--cfg-path", str(REPO / project),
        "--options", *QUICK, f"run.output_dir={out}", "run.valid_splits=[]", "run.test_splits=[]",
    ])
    run_dir = Path(runner.output_dir)
    assert (run_dir / "checkpoint_best.safetensors").is_file() or (run_dir / "latest").is_file(), list(run_dir.iterdir())
    return run_dir
