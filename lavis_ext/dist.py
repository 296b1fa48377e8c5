"""Distributed set-up: gloo on CPU, nccl on GPU, and a 1-process group when not launched.

LAVIS's `init_distributed_mode` hard-codes nccl and `torch.cuda.set_device` (RuntimeError: Found no
NVIDIA driver on CPU), and without a launcher leaves no process group, while `runner_base` calls
`dist.barrier()` unconditionally and `Blip2Qformer` calls `dist.get_rank()` (ValueError: Default
process group has not been initialized). So we always create a group: the launcher's when
RANK/WORLD_SIZE are set (torchrun, accelerate), else a private single-process one.
This is the only module that touches `torch.cuda` directly. Rank/world look-ups use LAVIS's
`lavis.common.dist_utils` (`get_rank`, `get_world_size`, `is_main_process`).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str | None) -> torch.device:
    """'cuda' when asked for and available, else an error naming the fix; 'cpu' otherwise."""
    requested = (requested or "cpu").lower()
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
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=int(run_cfg.get("dist_timeout_s", timeout_s))),
        )
    run_cfg.rank = rank
    run_cfg.world_size = world
    run_cfg.gpu = device.index if device.type == "cuda" else None
    run_cfg.device = str(device) if device.type == "cuda" else "cpu"
    run_cfg.distributed = world > 1
    run_cfg.dist_backend = backend
    logger.info("process group: backend=%s rank=%d world=%d device=%s", backend, rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
