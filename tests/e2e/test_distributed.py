"""Distributed training: a peer that never arrives, DDP and FSDP equal to one process, two nodes on loopback.

The equality tests line up what DDP averages with what one process computes: 1 process x batch 10
against 2 processes x batch 5, where each rank's batch is exactly half of the single process's batch
(`split_by=sample`, no shuffle, one image = 5 captions = one rank's batch), every sequence is cut to
the same number of tokens (`max_txt_len`, so the token-mean loss of each half weighs the same) and
dropout is off (ranks draw from different RNG streams).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis_ext import cli
from lavis_ext import dist as ext_dist
from lavis_ext.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROJECT = str(REPO / "projects/tiny/caption_opt.yaml")
ALIGNED = [
    "run.max_epoch=1", "run.warmup_steps=3", "run.log_freq=5", "run.num_workers=0", "run.constant_baseline=false",
    "run.valid_splits=[]", "run.test_splits=[]",
    "datasets.wds_caption.shuffle_buffer=0", "datasets.wds_caption.build_info.split_by=sample",
    "datasets.wds_caption.build_info.lengths.train=100",  # 10 steps
    "model.max_txt_len=8", "model.opt_config.dropout=0.0", "model.qformer_config.hidden_dropout_prob=0.0",
    "model.qformer_config.attention_probs_dropout_prob=0.0",
    "model.opt_config.num_hidden_layers=1", "model.qformer_config.num_hidden_layers=1", "model.vit_config.depth=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_arrives_is_a_timeout_error_not_a_hang(monkeypatch):
    ext_dist.shutdown()  # an earlier in-process run may have left its 1-process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = OmegaConf.create({"device": "cpu", "dist_timeout_s": 2})
    with pytest.raises(RuntimeError, match=r"rank 0 of 2: the process group did not form within run.dist_timeout_s=2s.*--nnodes"):
        ext_dist.init_distributed(cfg)
    assert not torch.distributed.is_initialized()


def weights(run_dir: Path) -> dict:
    tensors, _ = read_checkpoint(run_dir / "checkpoint_0.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


# Attention key biases add the same number to every logit of a query, which softmax ignores: their true
# gradient is exactly 0, what they get is rounding noise of ~1e-10 that differs with the summation order,
# and AdamW divides it by its own square root, so they move by up to ~lr in a direction set by noise.
KEY_BIASES = (".attention.self.key.bias", ".crossattention.self.key.bias", ".self_attn.k_proj.bias")


# Same global batch, other summation order (2 ranks' all-reduce vs one process's sum): measured 1.7e-6 to 4.4e-6
# after the aligned run (DDP and FSDP, for-loop and fused AdamW, 2026-12-05); a real sharding bug (a rank training
# on the other's samples, a missing all-reduce) moves weights by ~lr = 1e-3 per step. 2e-5 sits between.
TOLERANCE = 2e-5


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith(KEY_BIASES))


def launch(root: Path, out: Path, launcher: list[str], batch: int, extra: tuple = (),
           program: tuple = ("-m", "torch.distributed.run")) -> subprocess.Popen:
    env = {**os.environ, "LAVIS_EXT_DATA": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *program, *launcher, str(REPO / "train.py"), "--cfg-path", PROJECT,
           "--options", *ALIGNED, f"run.batch_size_train={batch}", f"run.output_dir={out}",
           f"datasets.wds_caption.build_info.root={root}", *extra]
    return subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture
def single_process_weights(synthetic_root, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = cli.train(["--cfg-path", PROJECT, "--options", *ALIGNED, "run.batch_size_train=10",
                            f"run.output_dir={tmp_path / 'one'}", f"datasets.wds_caption.build_info.root={synthetic_root}"])
    finally:
        torch.set_num_threads(before)
    return weights(Path(runner.output_dir))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(synthetic_root, tmp_path, single_process_weights):
    out = tmp_path / "two"
    out.mkdir()
    finish(launch(synthetic_root, out, ["--standalone", "--nproc_per_node=2"], batch=5))
    two = weights(only_run(out))
    assert max_difference(two, single_process_weights) < TOLERANCE


@pytest.mark.slow
def test_two_nodes_on_loopback_train_together(synthetic_root, tmp_path, single_process_weights):
    """Two torchrun invocations (--nnodes=2, static rendezvous on 127.0.0.1), one process each."""
    out = tmp_path / "nodes"
    out.mkdir()
    port = free_port()
    nodes = [launch(synthetic_root, out, ["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                          "--master_addr=127.0.0.1", f"--master_port={port}"], batch=5)
             for rank in (0, 1)]
    for proc in nodes:
        finish(proc)
    run_dir = only_run(out)  # one job id, broadcast from rank 0: both nodes wrote into one folder
    assert max_difference(weights(run_dir), single_process_weights) < TOLERANCE


@pytest.mark.slow
def test_accelerate_launch_is_a_launcher_too(synthetic_root, tmp_path, single_process_weights):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; gloo on CPU) trains like torchrun."""
    pytest.importorskip("accelerate")
    out = tmp_path / "accelerate"
    out.mkdir()
    accelerate = ("-m", "accelerate.commands.launch")
    finish(launch(synthetic_root, out, ["--num_processes=2", "--num_machines=1", "--multi_gpu", "--mixed_precision=no",
                                        "--dynamo_backend=no", f"--main_process_port={free_port()}"],
                  batch=5, program=accelerate))
    assert max_difference(weights(only_run(out)), single_process_weights) < TOLERANCE


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_resumes(synthetic_root, tmp_path, single_process_weights):
    """run.fsdp shards every block over 2 ranks: same weights as one process; its checkpoint holds whole
    tensors; a sharded run resumed mid-epoch from its step checkpoint ends bitwise where an uninterrupted one does."""
    out = tmp_path / "fsdp"
    out.mkdir()
    finish(launch(synthetic_root, out, ["--standalone", "--nproc_per_node=2"], batch=5, extra=("run.fsdp=true",)))
    run_dir = only_run(out)
    sharded = weights(run_dir)
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single_process_weights.items()}
    assert max_difference(sharded, single_process_weights) < TOLERANCE

    two_epochs = ("run.fsdp=true", "run.max_epoch=2", "run.save_every_steps=5")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    finish(launch(synthetic_root, straight, ["--standalone", "--nproc_per_node=2"], batch=5, extra=two_epochs))
    mid_epoch = only_run(straight) / "checkpoint_step15.safetensors"  # step 5 of epoch 1
    finish(launch(synthetic_root, resumed, ["--standalone", "--nproc_per_node=2"], batch=5,
                  extra=(*two_epochs, f"run.resume_ckpt_path={mid_epoch}")))
    final = [read_checkpoint(only_run(d) / "checkpoint_1.safetensors")[0] for d in (straight, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
