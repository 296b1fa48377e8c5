"""Exact resume: a run interrupted at any step and resumed ends with the same bits as one never stopped.

In-process runs (the default suite) interrupt through the fault-injection hook; the slow tests SIGKILL
real processes (mid-epoch, during a checkpoint write) and let torchrun --max-restarts recover one.
All runs use one torch thread: bitwise comparisons need the same reduction order, and two processes
with two threads each crawl on a 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis_ext import cli
from lavis_ext import dist as ext_dist
from lavis_ext.checkpoints import read_checkpoint, read_latest

REPO = Path(__file__).resolve().parents[2]
PROJECT = str(REPO / "projects/tiny/caption_opt.yaml")

# 2 train shards = 80 captions = 10 batches of 8 per pass, 8 steps per epoch: the second epoch crosses a
# pass boundary, and checkpoints fall mid-pass, mid-epoch and at the epoch's end.
SMALL = [
    "run.max_epoch=2", "run.batch_size_train=8", "run.warmup_steps=5", "run.log_freq=4",
    "run.constant_baseline=false", "run.valid_splits=[]", "run.test_splits=[]", "run.save_every_steps=3",
    "datasets.wds_caption.build_info.shards.train=train/shard-{000000..000001}.tar",
    "datasets.wds_caption.build_info.lengths.train=64",
    "model.opt_config.num_hidden_layers=1", "model.qformer_config.num_hidden_layers=1", "model.vit_config.depth=1",
]


def options(root: Path, out: Path, workers: int = 0, *extra: str) -> list[str]:
    return ["--cfg-path", PROJECT, "--options", *SMALL, f"run.num_workers={workers}",
            f"datasets.wds_caption.build_info.root={root}", f"run.output_dir={out}", *extra]


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, where: str, step: int):
    """Stop the run in-process where LAVIS_EXT_FAULT_INJECT would SIGKILL it: a hook on the runner's loop
    (``step``: after that optimizer step, before its checkpoint) or on its checkpoint writes (``save``: the
    temporary file half-written, before the rename). Production runs have neither hook."""
    real = cli.build_runner

    def stop(at, tmp_file=None):
        if at == step:
            if tmp_file is not None:
                Path(tmp_file).write_bytes(Path(tmp_file).read_bytes()[:100])  # a half-written file
            raise Interrupted(f"{where} {step}")

    def build_runner(*args, **kwargs):
        runner = real(*args, **kwargs)
        if where == "step":
            runner.loop.hooks.append(lambda loop: stop(loop.state.global_step))
        else:
            runner.save_hooks.append(stop)
        return runner

    monkeypatch.setattr(cli, "build_runner", build_runner)


def final_state(run_dir: Path, epoch: int = 1) -> dict:
    tensors, _ = read_checkpoint(run_dir / f"checkpoint_{epoch}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def the_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_mid_epoch_then_resumed_is_bitwise_identical(synthetic_root, tmp_path, monkeypatch, one_thread, workers):
    reference = cli.train(options(synthetic_root, tmp_path / "a", workers))
    expected = final_state(Path(reference.output_dir))

    # stopped right after step 11 (epoch 1, step 3): the last checkpoint is step 9 (epoch 1, step 1)
    interrupt_at(monkeypatch, "step", 11)
    with pytest.raises(Interrupted):
        cli.train(options(synthetic_root, tmp_path / "b", workers))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    assert read_latest(run_dir).name == "checkpoint_step9.safetensors"
    assert {p.name for p in run_dir.glob("checkpoint_*")} == {
        "checkpoint_step6.safetensors", "checkpoint_step9.safetensors", "checkpoint_0.safetensors"}
    _, meta = read_checkpoint(run_dir / "checkpoint_step9.safetensors")
    assert meta["train_state"]["epoch"] == 1 and meta["train_state"]["step"] == 1
    assert meta["ranks"][0]["position"] == {"pass": 0, "batches": 9, "samples": 72, "samples_total": 72}
    assert meta["lr_sched"]["class"] == "LinearWarmupCosineLRScheduler"

    resumed = cli.train(options(synthetic_root, tmp_path / "b", workers, "run.resume=auto"))
    assert Path(resumed.output_dir) == run_dir  # auto resume continues in the same folder
    assert_bitwise_equal(final_state(run_dir), expected)
    _, meta = read_checkpoint(run_dir / "checkpoint_1.safetensors")
    assert meta["ranks"][0]["position"] == {"pass": 1, "batches": 6, "samples": 48, "samples_total": 128}


def test_killed_during_a_checkpoint_write_and_a_truncated_latest_fall_back(synthetic_root, tmp_path, monkeypatch, one_thread, capfd):
    reference = cli.train(options(synthetic_root, tmp_path / "a"))
    expected = final_state(Path(reference.output_dir))

    # dies while writing step 12's checkpoint: the half-written temporary file never replaces anything
    interrupt_at(monkeypatch, "save", 12)
    with pytest.raises(Interrupted):
        cli.train(options(synthetic_root, tmp_path / "b"))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    assert read_latest(run_dir).name == "checkpoint_step9.safetensors"
    assert not list(run_dir.glob(".*tmp*"))
    # and then the newest checkpoint gets damaged on disk: the checksum catches it, the previous one is used
    latest = run_dir / "checkpoint_step9.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size - 1000])
    capfd.readouterr()
    cli.train(options(synthetic_root, tmp_path / "b", 0, "run.resume=auto"))
    log = capfd.readouterr().err
    assert "skipping corrupt checkpoint" in log and "checkpoint_step9.safetensors" in log and "truncated" in log
    assert "resumed from" in log and "checkpoint_0.safetensors" in log  # the intact previous one
    assert_bitwise_equal(final_state(run_dir), expected)


def test_explicit_corrupt_checkpoint_is_refused_naming_an_intact_one(synthetic_root, tmp_path, one_thread):
    first = cli.train(options(synthetic_root, tmp_path / "a", 0, "run.max_epoch=1"))
    run_dir = Path(first.output_dir)
    target = run_dir / "checkpoint_0.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the payload: still a readable file, wrong checksum
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"does not match its recorded sha256.*checkpoint_step6.safetensors"):
        cli.train(options(synthetic_root, tmp_path / "b", 0, f"run.resume_ckpt_path={target}"))


# ---- real processes ------------------------------------------------------------------------------
def subprocess_env(root: Path, **extra) -> dict:
    env = {**os.environ, "LAVIS_EXT_DATA": str(root), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


def train_process(root: Path, out: Path, *extra: str, fault: str | None = None, torchrun: list[str] | None = None):
    env = subprocess_env(root, **({ext_dist.FAULT_ENV: fault} if fault else {}))
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    cmd = [*launcher, str(REPO / "train.py"), *options(root, out, 0, *extra)]
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["step:13", "save:9"])
def test_sigkill_then_resume_is_bitwise_identical(synthetic_root, tmp_path, one_thread, fault):
    reference = cli.train(options(synthetic_root, tmp_path / "a"))
    expected = final_state(Path(reference.output_dir))
    killed = train_process(synthetic_root, tmp_path / "b", fault=fault)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = the_run_dir(tmp_path / "b")
    assert not (run_dir / "checkpoint_1.safetensors").exists()
    resumed = train_process(synthetic_root, tmp_path / "b", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert the_run_dir(tmp_path / "b") == run_dir
    assert_bitwise_equal(final_state(run_dir), expected)


@pytest.mark.slow
def test_torchrun_max_restarts_recovers_a_worker_that_dies_once(synthetic_root, tmp_path, one_thread):
    """Two workers (4 steps per epoch); rank 1 SIGKILLs itself after global step 7; torchrun restarts
    both, which resume from step 6 (epoch 1, step 2) on their own (run.resume=auto) and finish with the
    weights of a run that never failed."""
    launch = ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    clean = train_process(synthetic_root, tmp_path / "a", torchrun=launch)
    assert clean.returncode == 0, clean.stderr[-3000:]
    proc = train_process(synthetic_root, tmp_path / "b", "run.resume=auto", fault="step:7:1", torchrun=launch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "will restart worker group" in proc.stderr.lower() or "restart" in proc.stderr.lower(), proc.stderr[-3000:]
    run_dir = the_run_dir(tmp_path / "b")
    assert (run_dir / ".fault_step_7_rank1").exists()
    log = (run_dir / "run.log").read_text()
    assert "run.resume=auto: continuing" in proc.stderr or "resumed from" in log
    assert "checkpoint_step6.safetensors" in log and "continuing after step 2" in log
    assert_bitwise_equal(final_state(run_dir), final_state(the_run_dir(tmp_path / "a")))
