"""Distributed set-up: gloo on CPU, nccl on GPU, and a 1-process group when not launched.

LAVIS's `init_distributed_mode` hard-codes nccl and `torch.cuda.set_device` (RuntimeError: Found no
NVIDIA driver on CPU), and without a launcher leaves no process group, while `runner_base` calls
`dist.barrier()` unconditionally and `Blip2Qformer` calls `dist.get_rank()` (ValueError: Default
process group has not been initialized). So we always create a group: the launcher's when
RANK/WORLD_SIZE are set (torchrun, accelerate), else a private single-process one.
This is the only module that touches `torch.cuda` directly. Rank/world look-ups use LAVIS's
`lavis.common.dist_utils` (`get_rank`, `get_world_size`, `is_main_process`).

Multi-node: torchrun (or `accelerate launch`, or SLURM's srun setting RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT/LOCAL_RANK) sets the environment; the global rank drives data splitting, LOCAL_RANK the GPU.
`run.dist_timeout_s` bounds both the wait for peers at start-up and every collective afterwards.

Fault injection (tests only): ``LAVIS_EXT_FAULT_INJECT=<where>:<global step>[:<rank>]`` kills the
process with SIGKILL once per run directory; see :func:`maybe_inject_fault`.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str | None) -> torch.device:
    """'cuda' when asked for and available, else an error naming the fix; 'cpu' otherwise; 'auto' picks."""
    requested = (requested or "cpu").lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"run.device is {requested!r} but no CUDA device is available; use --options run.device=cpu"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if requested != "cpu":
        raise ValueError(f"unknown run.device {requested!r}; use 'cpu' or 'cuda'")
    return torch.device("cpu")


def init_distributed(run_cfg, timeout_s: int = 1800) -> None:
    """Initialise the process group and record rank/world/gpu/device in ``run_cfg`` (as LAVIS expects).

    A peer that never arrives ends the wait with a timeout error instead of a hang.
    """
    device = resolve_device(run_cfg.get("device", "cpu"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    else:
        rank, world = 0, 1
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = int(run_cfg.get("dist_timeout_s", timeout_s))
    if not dist.is_initialized():
        try:
            kwargs = {"init_method": init_method}
            if launched:
                # torchrun --max-restarts reuses its store across restarts: without a per-attempt prefix, a
                # restarted rank can read the dead round's gloo addresses ("Gloo connectFullMesh failed ...
                # Connection refused") and the restart fails.
                store, _, _ = next(dist.rendezvous(init_method, rank, world, timeout=datetime.timedelta(seconds=timeout)))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                kwargs = {"store": dist.PrefixStore(f"lavis_ext/attempt_{attempt}", store)}
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
                **kwargs,
            )
        except Exception as error:  # DistStoreError / DistNetworkError / RuntimeError, by torch version
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RuntimeError(
                f"rank {rank} of {world}: the process group did not form within run.dist_timeout_s={timeout}s "
                f"(rendezvous at {where}, backend {backend}); a peer never arrived. Check that every node was "
                "launched with the same --nnodes/--nproc_per_node, --master_addr/--master_port (or --rdzv_endpoint), "
                "that the port is reachable from every node, or raise run.dist_timeout_s. "
                f"Cause: {type(error).__name__}: {error}"
            ) from error
    run_cfg.rank = rank
    run_cfg.world_size = world
    run_cfg.gpu = device.index if device.type == "cuda" else None
    run_cfg.device = str(device) if device.type == "cuda" else "cpu"
    run_cfg.distributed = world > 1
    run_cfg.dist_backend = backend
    logger.info("process group: backend=%s rank=%d world=%d device=%s", backend, rank, world, device)


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (identity without a multi-process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` without a multi-process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


FAULT_ENV = "LAVIS_EXT_FAULT_INJECT"


def maybe_inject_fault(where: str, step: int, run_dir, tmp_file: Path | None = None) -> None:
    """Test-only fault injection, off unless ``LAVIS_EXT_FAULT_INJECT`` is set.

    ``LAVIS_EXT_FAULT_INJECT=step:N[:R]``: rank R (default 0) SIGKILLs itself right after the optimizer
    update of global step N (before that step's checkpoint). ``save:N[:R]``: rank R dies while writing
    step N's checkpoint (its temporary file cut to half, before the rename). Each fault fires once per
    run directory (a marker file ``.fault_<where>_<N>_rank<R>`` remembers it), so a run restarted by
    torchrun ``--max-restarts`` and resumed with ``run.resume: auto`` passes that step the second time.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("step", "save"):
        raise ValueError(f"{FAULT_ENV}={spec!r}; expected step:N[:rank] or save:N[:rank]")
    rank = int(parts[2]) if len(parts) == 3 else 0
    if parts[0] != where or int(parts[1]) != int(step) or rank != (dist.get_rank() if dist.is_initialized() else 0):
        return
    marker = Path(run_dir) / f".fault_{where}_{step}_rank{rank}"
    if marker.exists():
        return
    marker.write_text("fault injected\n")
    if tmp_file is not None and Path(tmp_file).exists():
        size = Path(tmp_file).stat().st_size
        with open(tmp_file, "rb+") as handle:
            handle.truncate(size // 2)
    logger.warning("%s: injected fault %r at global step %d: SIGKILL", FAULT_ENV, spec, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def cuda_rng_states() -> list:
    """Every visible GPU's RNG state (none before CUDA is in use), for full-state checkpoints."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state_all()
    return []


def restore_cuda_rng_states(states) -> None:
    """Inverse of :func:`cuda_rng_states`, for the GPUs this process has."""
    if states and torch.cuda.is_available():
        cuda = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in states]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
