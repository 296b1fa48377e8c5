"""The few shims LAVIS 1.0.2 needs to import and run its BLIP-2 code on the current stack.

Each shim names the exact error it fixes and is covered by a test in ``tests/unit/test_compat.py``
that fails without it. Everything else LAVIS gets wrong is fixed by subclassing (models, tasks,
runner), never here. ``apply()`` must run before the first ``import lavis``; ``lavis_ext.register()``
calls it first thing.
"""
from __future__ import annotations

import os
from pathlib import Path

_applied = False

# transformers >= 4.41 moved these helpers out of `modeling_utils`.
# Fixes: ImportError: cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'
# (lavis/models/med.py:40, lavis/models/blip2_models/Qformer.py:39, blip_models/nlvr_encoder.py:19).
# No hook exists: the failing statement is a module-level import, so the names go back where LAVIS looks.
MOVED_TRANSFORMERS_NAMES = (
    "apply_chunking_to_forward",
    "find_pruneable_heads_and_indices",
    "prune_linear_layer",
)


def _restore_moved_transformers_names() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in MOVED_TRANSFORMERS_NAMES:
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


def _register_schedulers_and_runners() -> None:
    """`import lavis` registers models, builders, processors and tasks, but not lr schedulers or runners.

    Fixes: TypeError: 'NoneType' object is not callable (lavis/runners/runner_base.py:161,
    `registry.get_lr_scheduler_class(...)` returns None) and a None runner class. LAVIS's own train.py
    imports these two modules by hand; we do it once here.
    """
    import lavis.common.optims  # noqa: F401  (registers linear_warmup_*_lr schedulers)
    import lavis.runners  # noqa: F401  (registers runner_base, runner_iter)


def default_cache_root() -> Path:
    """Where LAVIS-style downloads and caches go: $LAVIS_EXT_CACHE, else ~/.cache/lavis_ext."""
    return Path(os.environ.get("LAVIS_EXT_CACHE", Path.home() / ".cache" / "lavis_ext")).expanduser()


def _redirect_cache_root() -> None:
    """LAVIS registers cache_root as /export/home/.cache/lavis (its configs/default.yaml).

    Fixes: PermissionError / stray directories under /export (e.g. `coco_gt/` created by a failed
    ground-truth download). `registry.register_path` refuses to re-register, so the mapping entry is
    replaced directly.
    """
    from lavis.common.registry import registry

    registry.mapping["paths"]["cache_root"] = str(default_cache_root())


def apply() -> None:
    """Apply every shim once; safe to call repeatedly."""
    global _applied
    if _applied:
        return
    _restore_moved_transformers_names()
    _register_schedulers_and_runners()  # imports lavis
    _redirect_cache_root()
    _applied = True
