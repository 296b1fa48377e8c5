"""Checkpoints as safetensors: the trainable tensors, the resolved config, and the full training state.

Why not LAVIS's ``torch.save``: a pickle needs the classes that wrote it (and runs code when loaded), it
holds every frozen tensor's absence only implicitly, and a crash mid-write leaves a truncated file in
place of the last good one. Here a checkpoint is one ``.safetensors`` file:

* ``model.<name>``: every parameter with ``requires_grad`` (Q-Former, LoRA adapters, ...), so its size
  follows the strategy; the frozen base comes from the model config when loading;
* ``optim.<i>.<key>``: optimizer state tensors (resume only);
* ``rng.<rank>.{torch,cuda.<i>,numpy,python}``: every RNG state of every rank (resume only);
* metadata (JSON strings): ``format``, ``config`` (the resolved run config), ``epoch``, ``param_groups``,
  ``scaler``, ``lr_sched`` (LAVIS's schedulers are plain objects: their attributes), ``train_state``
  (rank 0's :class:`~lavis_ext.runners.loop.LoopState`: epoch, step within the epoch, global step, non-finite
  counters, loss sum; plus the runner's world size and best validation), ``ranks`` (per rank: the data position,
  the non-tensor parts of its RNG states and its own ``loop`` state), any caller ``extra``, and ``sha256``.

``sha256`` is a digest of every tensor (name, dtype, shape, bytes) and every other metadata field,
computed before the write and checked on every read: a truncated or bit-flipped file raises
:class:`CheckpointCorruptError` instead of resuming from garbage.

Writes go to a temporary name in the same directory and are renamed over the target, so a reader
never sees a partial file; :func:`write_latest` then points the ``latest`` file at it (also by rename),
and the previous checkpoint is deleted only after both (see the runner's retention).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from lavis_ext import dist as ext_dist

logger = logging.getLogger(__name__)

FORMAT = "lavis_ext.checkpoint/1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
RNG_PREFIX = "rng."
LATEST = "latest"
_JSON_FIELDS = ("config", "param_groups", "scaler", "extra", "lr_sched", "train_state", "ranks")
_CKPT_NAME = re.compile(r"^checkpoint_(?:\d+|step\d+)\.safetensors$")


class CheckpointCorruptError(ValueError):
    """The file is truncated, not a safetensors file, or its contents do not match the recorded sha256."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their ``state_dict`` names; whole tensors also under FSDP (then a
    collective that every rank must call, see :mod:`lavis_ext.runners.fsdp`)."""
    return {name: full(param.detach()) for name, param in model.named_parameters() if param.requires_grad}


def optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with whole tensors (gathered under FSDP: every rank must call it)."""
    state = optimizer.state_dict()
    return {
        "state": {index: {key: full(value) if torch.is_tensor(value) else value for key, value in entry.items()}
                  for index, entry in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer if isinstance(optimizer, Mapping) else optimizer_state(optimizer)
    tensors = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{OPTIM_PREFIX}{index}.{key}"] = tensor
    return tensors, state["param_groups"]


# ---- RNG states ---------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and (when present) CUDA generator states."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": list(words), "gauss": gauss},
        "numpy": {"kind": kind, "keys": np.asarray(keys, dtype=np.uint32).copy(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": ext_dist.cuda_rng_states(),
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the devices exist)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    ext_dist.restore_cuda_rng_states(state.get("cuda"))


def _rank_tensors(rank: int, rng: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON metadata for one rank's RNG state."""
    p = f"{RNG_PREFIX}{rank}."
    tensors = {
        p + "torch": torch.as_tensor(rng["torch"], dtype=torch.uint8),
        p + "numpy": torch.from_numpy(np.asarray(rng["numpy"]["keys"], dtype=np.uint32).astype(np.int64)),
        p + "python": torch.tensor([int(w) for w in rng["python"]["words"]], dtype=torch.int64),
    }
    for i, s in enumerate(rng.get("cuda") or []):
        tensors[f"{p}cuda.{i}"] = torch.as_tensor(s, dtype=torch.uint8)
    meta = {
        "python": {"version": rng["python"]["version"], "gauss": rng["python"]["gauss"]},
        "numpy": {k: rng["numpy"][k] for k in ("kind", "pos", "has_gauss", "cached")},
        "cuda_devices": len(rng.get("cuda") or []),
    }
    return tensors, meta


def rank_rng_state(tensors: dict[str, torch.Tensor], meta: dict, rank: int) -> dict | None:
    """One rank's RNG state from a read checkpoint (None when the checkpoint has no entry for it)."""
    entries = meta.get("ranks") or []
    if rank >= len(entries) or f"{RNG_PREFIX}{rank}.torch" not in tensors:
        return None
    p, m = f"{RNG_PREFIX}{rank}.", entries[rank]["rng"]
    return {
        "python": {"version": m["python"]["version"], "words": tensors[p + "python"].tolist(), "gauss": m["python"]["gauss"]},
        "numpy": {**m["numpy"], "keys": tensors[p + "numpy"].numpy().astype(np.uint32)},
        "torch": tensors[p + "torch"],
        "cuda": [tensors[f"{p}cuda.{i}"] for i in range(m.get("cuda_devices", 0))],
    }


# ---- lr scheduler ---------------------------------------------------------------------------------
def scheduler_state(scheduler) -> dict:
    """LAVIS's schedulers (lavis/common/optims.py) are plain objects whose lr is a function of
    (epoch, step) and their attributes; those attributes are their whole state."""
    state = {"class": type(scheduler).__name__}
    for key, value in vars(scheduler).items():
        if key != "optimizer" and isinstance(value, (int, float, str, bool, type(None))):
            state[key] = value
    return state


def restore_scheduler(scheduler, state: dict) -> None:
    if state.get("class") != type(scheduler).__name__:
        raise ValueError(f"checkpoint lr scheduler is {state.get('class')!r}, this run builds {type(scheduler).__name__!r}")
    for key, value in state.items():
        if key != "class":
            setattr(scheduler, key, value)


# ---- digest ------------------------------------------------------------------------------------------
def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and every metadata field but
    ``sha256`` itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


# ---- write ---------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    config: dict | None = None,
    optimizer=None,
    scaler=None,
    epoch: int | None = None,
    extra: dict | None = None,
    lr_scheduler=None,
    train_state: dict | None = None,
    rank_states: list[dict] | None = None,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename). Returns the path.

    ``model``: the model, or its :func:`trainable_state` already taken; ``optimizer``: the optimizer, or
    its :func:`optimizer_state` (FSDP gathers both on every rank before rank 0 writes).

    ``rank_states``: one ``{"rng": capture_rng_state(), "position": {...}, "loop": {...}}`` per rank, in
    rank order (``loop``: that rank's ``LoopState.to_dict()``, e.g. its own epoch loss sum).
    ``before_replace(tmp_path)``: called when the temporary file is written, before the rename (fault
    injection in tests).
    """
    from safetensors.torch import save_file

    path = Path(path)
    model_tensors = model if isinstance(model, Mapping) else trainable_state(model)
    tensors = {MODEL_PREFIX + k: v for k, v in model_tensors.items()}
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
    if lr_scheduler is not None:
        metadata["lr_sched"] = json.dumps(scheduler_state(lr_scheduler))
    if train_state is not None:
        metadata["train_state"] = json.dumps(train_state)
    if rank_states is not None:
        ranks = []
        for rank, entry in enumerate(rank_states):
            rng_tensors, rng_meta = _rank_tensors(rank, entry["rng"])
            tensors.update(rng_tensors)
            ranks.append({"rng": rng_meta, "position": entry.get("position"), "loop": entry.get("loop")})
        metadata["ranks"] = json.dumps(ranks)
    # safetensors wants contiguous CPU tensors that share no storage: copy only where that is needed
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    metadata["sha256"] = digest(tensors, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_latest(folder: str | os.PathLike, name: str) -> Path:
    """Point ``<folder>/latest`` at checkpoint ``name`` (a file in the same folder), atomically."""
    folder = Path(folder)
    target = folder / LATEST
    tmp = folder / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, target)
    _fsync_dir(folder)
    return target


def read_latest(folder: str | os.PathLike) -> Path | None:
    target = Path(folder) / LATEST
    if not target.is_file():
        return None
    name = target.read_text().strip()
    return Path(folder) / name if name else None


# ---- read ----------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with JSON fields decoded).

    Raises:
        FileNotFoundError: no such file.
        CheckpointCorruptError (a ValueError): unreadable, truncated, or contents not matching its sha256.
        ValueError: a readable file that is not ours.
    """
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
        raise CheckpointCorruptError(
            f"checkpoint {path!r} is not a readable safetensors file, e.g. truncated by a crash or a full disk ({error})"
        ) from error
    if raw.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {raw.get('format')!r}, expected {FORMAT!r}")
    if verify and "sha256" in raw and digest(tensors, raw) != raw["sha256"]:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} does not match its recorded sha256 (damaged on disk or in transfer); it cannot be used"
        )
    meta: dict[str, Any] = {"format": raw["format"]}
    for key in _JSON_FIELDS:
        if key in raw:
            meta[key] = json.loads(raw[key])
    if "epoch" in raw:
        meta["epoch"] = int(raw["epoch"])
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata only (reads the header, not the tensors; no checksum check)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    meta: dict[str, Any] = {k: v for k, v in raw.items() if k not in _JSON_FIELDS}
    for key in _JSON_FIELDS:
        if key in raw:
            meta[key] = json.loads(raw[key])
    return meta


def _model_state(tensors):
    return {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}


def apply_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], path="checkpoint", require_all_trainable: bool = True) -> int:
    """Load a read checkpoint's model tensors (see :func:`load_trainable`). Returns how many."""
    state = _model_state(tensors)
    params = dict(model.named_parameters())
    state = {k: local_part(v, params[k]) if k in params and is_sharded(params[k]) else v for k, v in state.items()}
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
    return len(state)


def load_trainable(model: nn.Module, path: str | os.PathLike, require_all_trainable: bool = True) -> dict:
    """Load a checkpoint's model tensors onto a model built from the same config.

    Raises:
        RuntimeError: the checkpoint has tensors this model lacks (another config or strategy), or, with
            ``require_all_trainable``, lacks some of the model's trainable tensors.
    """
    tensors, meta = read_checkpoint(path)
    apply_trainable(model, tensors, path, require_all_trainable)
    return meta


def init_from(model: nn.Module, path: str | os.PathLike) -> dict:
    """Initialise a model from a checkpoint of another stage or model (stage-1 Q-Former -> stage 2).

    Tensors whose names match are loaded, names the model lacks are reported and ignored (stage 1's
    text heads), and the model's tensors the checkpoint lacks keep their values. A matching name with
    a different shape means the configs disagree and raises ValueError naming the tensors.
    """
    tensors, _ = read_checkpoint(path)
    state = _model_state(tensors)
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


def apply_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict, path="checkpoint", scaler=None) -> None:
    if "param_groups" not in meta:
        raise ValueError(f"checkpoint {path} holds no optimizer state (weights only); it cannot resume a run")
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, name = key[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
    _shard_like_params(optimizer, state)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])


def _shard_like_params(optimizer, state: dict[int, dict]) -> None:
    """Under FSDP, keep this rank's shard of each whole per-parameter state tensor (moments)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        param = params[index] if index < len(params) else None
        if param is None or not is_sharded(param):
            continue
        for name, tensor in entry.items():
            if tensor.shape == param.shape:
                entry[name] = local_part(tensor, param)


def restore_optimizer(optimizer, path: str | os.PathLike, scaler=None) -> dict:
    """Optimizer (and grad scaler) state from a checkpoint written with ``optimizer=``."""
    tensors, meta = read_checkpoint(path)
    apply_optimizer(optimizer, tensors, meta, path, scaler)
    return meta


# ---- choosing what to resume from -------------------------------------------------------------------
def _progress(path: Path) -> tuple:
    """Sort key of a checkpoint by how far its run got (header only)."""
    try:
        meta = read_metadata(path)
    except Exception:
        return (-1, -1.0)
    state = meta.get("train_state") or {}
    step = state.get("global_step")
    if step is None:
        step = (int(meta.get("epoch", -1)) + 1) * 10**12  # old epoch-only checkpoints: after any step of that epoch
    return (int(step), path.stat().st_mtime)


def resume_candidates(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints a run in ``folder`` can resume from, best first: the one ``latest`` points at,
    then every ``checkpoint_<epoch>`` / ``checkpoint_step<N>`` by training progress (newest first).
    ``checkpoint_best`` is not a resume point (it is older than the run's position)."""
    folder = Path(folder)
    found = sorted((p for p in folder.glob("checkpoint_*.safetensors") if _CKPT_NAME.match(p.name)), key=_progress, reverse=True)
    latest = read_latest(folder)
    if latest is not None and latest.is_file():
        found = [latest] + [p for p in found if p != latest]
    return found


def first_valid(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The first candidate whose checksum verifies, and a message for each one skipped."""
    skipped = []
    for path in candidates:
        try:
            read_checkpoint(path)
            return path, skipped
        except (CheckpointCorruptError, ValueError, OSError) as error:
            skipped.append(f"{path}: {error}")
    return None, skipped


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory -> its best (else latest) checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        best = path / "checkpoint_best.safetensors"
        if best.is_file():
            return best
        latest = read_latest(path)
        if latest is not None and latest.is_file():
            return latest
        runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "checkpoint_best.safetensors").is_file())
        if runs:  # an output_dir holding job folders: the newest job
            return runs[-1] / "checkpoint_best.safetensors"
        raise FileNotFoundError(f"{path} holds no checkpoint_best.safetensors nor a 'latest' pointer; train first or name a file")
    raise FileNotFoundError(f"checkpoint or run directory {str(path)!r} does not exist")


# ---- full tensors of FSDP2 shards (DTensor), for checkpoints --------------------------------------------------------------------
def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(full_tensor: torch.Tensor, like) -> torch.Tensor:
    """This rank's shard of ``full_tensor``, laid out as the sharded ``like`` (no communication: every
    rank has read the full tensor from the checkpoint)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full_tensor.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
