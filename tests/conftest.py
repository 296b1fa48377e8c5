"""Shared fixtures: a small synthetic dataset (shards + tokenizers) built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import lavis_ext  # noqa: F401  (shims + registration)

REPO = Path(__file__).resolve().parents[1]
SMALL_SIZES = {"train": 128, "val": 32, "test": 32}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset with its tokenizers; LAVIS_EXT_DATA points at it for the whole session."""
    from lavis_ext.datasets.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, seed=0, num_images=SMALL_SIZES, images_per_shard=8, tokenizers=True)
    os.environ["LAVIS_EXT_DATA"] = str(root)
    return root


@pytest.fixture(scope="session")
def tokenizer_dirs(synthetic_root) -> dict:
    return {name: synthetic_root / "tokenizers" / name for name in ("bert", "opt", "t5")}
