"""Checkpoints as safetensors: the trainable tensors, the resolved config, and the training state.

Why not LAVIS's ``torch.save``: a pickle needs the classes that wrote it (and runs code when loaded), it
holds every frozen tensor's absence only implicitly, and a crash mid-write leaves a truncated file in
place of the last good one. Here a checkpoint is one ``.safetensors`` file:

* ``model.<name>``: every parameter with ``requires_grad`` (Q-Former, LoRA adapters, ...), so its size
  follows the strategy; the frozen base comes from the model config when loading;
* ``optim.<i>.<key>``: optimizer state tensors (resume only);
* metadata (JSON strings): ``format``, ``config`` (the resolved run config), ``epoch``, ``param_groups``,
  ``scaler`` and any caller ``extra``.

Writes go to a temporary name in the same directory and are renamed over the target, so a reader
never sees a partial file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

FORMAT = "lavis_ext.checkpoint/1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their ``state_dict`` names."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{OPTIM_PREFIX}{index}.{key}"] = tensor
    return tensors, state["param_groups"]


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    config: dict | None = None,
    optimizer=None,
    scaler=None,
    epoch: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename). Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {MODEL_PREFIX + k: v for k, v in trainable_state(model).items()}
    metadata: dict[str, str] = {"format": FORMAT, "config": json.dumps(config or {})}
    if optimizer is not None:
        optim_tensors, groups = _optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        metadata["param_groups"] = json.dumps(groups)
    if scaler is not None:
        metadata["scaler"] = json.dumps(scaler.state_dict())
    if epoch is not None:
        metadata["epoch"] = str(int(epoch))
    if extra:
        metadata["extra"] = json.dumps(extra)
    # safetensors wants contiguous CPU tensors that share no storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with JSON fields decoded). Raises ValueError for a file that is not ours."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file ({error})") from error
    if raw.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {raw.get('format')!r}, expected {FORMAT!r}")
    meta: dict[str, Any] = {"format": raw["format"]}
    for key in ("config", "param_groups", "scaler", "extra"):
        if key in raw:
            meta[key] = json.loads(raw[key])
    if "epoch" in raw:
        meta["epoch"] = int(raw["epoch"])
    return tensors, meta


def load_trainable(model: nn.Module, path: str | os.PathLike, require_all_trainable: bool = True) -> dict:
    """Load a checkpoint's model tensors onto a model built from the same config.

    Raises:
        RuntimeError: the checkpoint has tensors this model lacks (another config or strategy), or, with
            ``require_all_trainable``, lacks some of the model's trainable tensors.
    """
    tensors, meta = read_checkpoint(path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} has tensors this model lacks, e.g. {result.unexpected_keys[:3]}; "
            "build the model with the config the checkpoint was trained with (same strategy and LoRA keys)"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if require_all_trainable and missing:
        raise RuntimeError(f"checkpoint {path} lacks trainable tensors, e.g. {missing[:3]}")
    logger.info("loaded %d tensors from %s", len(state), path)
    return meta


def init_from(model: nn.Module, path: str | os.PathLike) -> dict:
    """Initialise a model from a checkpoint of another stage or model (stage-1 Q-Former -> stage 2).

    Tensors whose names match are loaded, names the model lacks are reported and ignored (stage 1's
    text heads), and the model's tensors the checkpoint lacks keep their values. A matching name with
    a different shape means the configs disagree and raises ValueError naming the tensors.
    """
    tensors, _ = read_checkpoint(path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"checkpoint {path} does not fit this model config: {mismatched[:3]} (checkpoint vs model)")
    matched = {k: v for k, v in state.items() if k in own}
    unused = sorted(set(state) - set(matched))
    model.load_state_dict(matched, strict=False)
    report = {"loaded": len(matched), "unused": unused, "not_in_checkpoint": len(own) - len(matched)}
    logger.info(
        "initialised from %s: %d tensors loaded, %d in the checkpoint unused (e.g. %s), %d model tensors kept as they were",
        path, report["loaded"], len(unused), unused[:3], report["not_in_checkpoint"],
    )
    return report


def restore_optimizer(optimizer, path: str | os.PathLike, scaler=None) -> dict:
    """Optimizer (and grad scaler) state from a checkpoint written with ``optimizer=``."""
    tensors, meta = read_checkpoint(path)
    if "param_groups" not in meta:
        raise ValueError(f"checkpoint {path} holds no optimizer state (weights only); it cannot resume a run")
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, name = key[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta
