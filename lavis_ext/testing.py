"""Pytest fixtures for tests of lavis-ext and of research projects built on it (outside the package).

A test module imports the fixtures it uses (``from lavis_ext.testing import synthetic_root``), so a project folder
written by ``lavis-ext new task NAME --project DIR`` tests itself without this repository's ``tests/conftest.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SMALL_SIZES = {"train": 128, "val": 32, "test": 32}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset with its tokenizers; LAVIS_EXT_DATA points at it for the whole session."""
    from lavis_ext.datasets.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, seed=0, num_images=SMALL_SIZES, images_per_shard=8, tokenizers=True)
    os.environ["LAVIS_EXT_DATA"] = str(root)
    return root
