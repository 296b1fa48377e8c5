"""Model-type tables: LAVIS's real types (resolved to its packaged YAMLs) plus our tiny ones."""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def lavis_model_types(lavis_cls) -> dict:
    """LAVIS's PRETRAINED_MODEL_CONFIG_DICT with absolute paths, so the real types
    (e.g. ``pretrain_opt2.7b``) load LAVIS's own YAMLs (hub names, checkpoint URLs) from our class."""
    import lavis

    root = os.path.dirname(os.path.abspath(lavis.__file__))
    return {name: os.path.join(root, rel) for name, rel in lavis_cls.PRETRAINED_MODEL_CONFIG_DICT.items()}


def tiny_config_path(filename: str) -> str:
    return str(CONFIG_DIR / filename)
