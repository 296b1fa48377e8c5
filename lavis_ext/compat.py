"""The few shims LAVIS 1.0.2 needs to import and run its BLIP-2 code on the current stack.

Each shim names the exact error it fixes and is covered by a test in ``tests/unit/test_compat.py``
that fails without it. Everything else LAVIS gets wrong is fixed by subclassing (models, tasks,
runner), never here. ``apply()`` must run before the first ``import lavis``; ``lavis_ext.register()``
calls it first thing. The one patch of torch itself, :func:`tensors_registered_on`, is scoped to a ``with``
block and to the thread that entered it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
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


# ---- meta builds: module tensors registered on another device ---------------------------------------------
_REGISTER_ON: contextvars.ContextVar = contextvars.ContextVar("lavis_ext_register_on", default=None)
_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict = {}


def _parameter_on_target(module, name, param):
    device = _REGISTER_ON.get()
    if device is not None and param is not None and param.device != device:
        param = type(param)(param.detach().to(device), requires_grad=param.requires_grad)
    _originals["register_parameter"](module, name, param)


def _buffer_on_target(module, name, tensor, persistent=True):
    device = _REGISTER_ON.get()
    if device is not None and tensor is not None and tensor.device != device:
        tensor = tensor.to(device)
    _originals["register_buffer"](module, name, tensor, persistent=persistent)


@contextlib.contextmanager
def tensors_registered_on(device) -> Iterator[None]:
    """Parameters and buffers that modules register inside the block land on ``device`` (``meta``: a real-size
    model without its memory); tensors already there keep their identity, so weight ties survive.

    Why a patch of ``nn.Module.register_parameter`` / ``register_buffer`` and not ``with torch.device("meta")``:
    the device context also moves every factory call, and LAVIS's ViT reads values of such tensors while it
    builds (``torch.linspace(0, drop_path_rate, depth)`` then ``.item()``), which meta tensors cannot give.
    accelerate's ``init_empty_weights`` patches the same two methods, but for every thread at once, and wraps
    parameters already on meta anew (ties made during construction come apart). Here the
    patch is installed while at least one block is open and redirects only the thread (context) that entered
    it, so a model built beside it in a serving or loader thread is untouched.
    """
    import torch
    import torch.nn as nn

    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _originals["register_parameter"] = nn.Module.register_parameter
            _originals["register_buffer"] = nn.Module.register_buffer
            nn.Module.register_parameter = _parameter_on_target
            nn.Module.register_buffer = _buffer_on_target
        _patch_users += 1
    token = _REGISTER_ON.set(torch.device(device))
    try:
        yield
    finally:
        _REGISTER_ON.reset(token)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _originals.pop("register_parameter")
                nn.Module.register_buffer = _originals.pop("register_buffer")
