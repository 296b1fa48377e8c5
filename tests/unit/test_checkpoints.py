"""Full-state checkpoints: contents, checksum, atomic writes, `latest`, choosing what to resume, guards."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from lavis_ext import checkpoints as ck
from lavis_ext.runners import resume
from lavis_ext.runners import runner_base as rb
from lavis_ext.runners.loaders import EpochStreamLoader
from lavis_ext.runners.loop import LoopState


def trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


def write(path, step, model=None, optimizer=None, **kw):
    if model is None:
        model, optimizer = trained(step)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=3, min_lr=1e-4, init_lr=1e-2, warmup_steps=7)
    return ck.save_checkpoint(
        path, model, optimizer=optimizer, epoch=0, lr_scheduler=scheduler,
        train_state={"epoch": 0, "step": step, "global_step": step, "epoch_done": False},
        rank_states=[{"rng": ck.capture_rng_state(), "position": {"pass": 0, "batches": step}}], **kw,
    )


def test_full_state_round_trip_and_rng_restore(tmp_path):
    model, optimizer = trained()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    states = [{"rng": ck.capture_rng_state(), "position": {"pass": 0, "batches": 5}}]
    draws = (random.random(), np.random.rand(), torch.rand(2))
    torch.manual_seed(4)
    states.append({"rng": ck.capture_rng_state(), "position": {"pass": 0, "batches": 5}})
    rank1 = torch.rand(2)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=3, min_lr=1e-4, init_lr=1e-2, warmup_steps=7)
    path = ck.save_checkpoint(tmp_path / "c.safetensors", model, optimizer=optimizer, epoch=0, lr_scheduler=scheduler,
                              train_state={"epoch": 0, "step": 5}, rank_states=states)
    tensors, meta = ck.read_checkpoint(path)
    assert meta["lr_sched"] == {"class": "LinearWarmupCosineLRScheduler", "max_epoch": 3, "min_lr": 1e-4,
                                "init_lr": 1e-2, "warmup_steps": 7, "warmup_start_lr": 1e-2}
    assert [r["position"]["batches"] for r in meta["ranks"]] == [5, 5]
    assert len(meta["sha256"] if "sha256" in meta else ck.read_metadata(path)["sha256"]) == 64

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ck.restore_rng_state(ck.rank_rng_state(tensors, meta, 0))
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(2), draws[2])
    ck.restore_rng_state(ck.rank_rng_state(tensors, meta, 1))
    assert torch.equal(torch.rand(2), rank1)
    assert ck.rank_rng_state(tensors, meta, 2) is None

    fresh, fresh_opt = trained(seed=7)
    ck.apply_trainable(fresh, tensors)
    ck.apply_optimizer(fresh_opt, tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    other = LinearWarmupCosineLRScheduler(fresh_opt, max_epoch=9, min_lr=0, init_lr=1)
    ck.restore_scheduler(other, meta["lr_sched"])
    assert (other.max_epoch, other.warmup_steps, other.init_lr) == (3, 7, 1e-2)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_detected(tmp_path, damage):
    path = write(tmp_path / "c.safetensors", 3)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointCorruptError, match="truncated" if damage == "truncate" else "sha256"):
        ck.read_checkpoint(path)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write(tmp_path / "c.safetensors", 3)
    before = path.read_bytes()

    def crash(tmp):
        assert tmp.exists() and tmp.name.startswith(".c.safetensors.tmp-")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "c.safetensors", 4, before_replace=crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_resume_candidates_latest_first_then_by_progress_and_corrupt_ones_skipped(tmp_path):
    run = tmp_path / "runs" / "20260101000000"
    run.mkdir(parents=True)
    for step in (3, 6, 9):
        write(run / f"checkpoint_step{step}.safetensors", step)
    write(run / "checkpoint_best.safetensors", 1)
    ck.write_latest(run, "checkpoint_step6.safetensors")  # e.g. step 9 was written, latest not yet moved
    names = [p.name for p in ck.resume_candidates(run)]
    assert names == ["checkpoint_step6.safetensors", "checkpoint_step9.safetensors", "checkpoint_step3.safetensors"]
    (run / "checkpoint_step6.safetensors").write_bytes(b"\0" * 10)
    found, skipped = resume.find_auto_resume(tmp_path / "runs")
    assert found.name == "checkpoint_step9.safetensors"
    assert len(skipped) == 1 and "checkpoint_step6" in skipped[0]


def test_auto_resume_takes_the_newest_run_folder_or_the_fixed_job_id(tmp_path):
    old, new = tmp_path / "111", tmp_path / "222"
    for folder, step in ((old, 3), (new, 6)):
        folder.mkdir()
        write(folder / f"checkpoint_step{step}.safetensors", step)
        ck.write_latest(folder, f"checkpoint_step{step}.safetensors")
    os.utime(old / "latest", (1, 1))
    assert resume.find_auto_resume(tmp_path)[0] == new / "checkpoint_step6.safetensors"
    assert resume.find_auto_resume(tmp_path, job_id="111")[0] == old / "checkpoint_step3.safetensors"
    assert resume.find_auto_resume(tmp_path / "nothing")[0] is None
    (tmp_path / "empty").mkdir()
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "resume": "auto"})
    assert resume.prepare_resume(cfg) == ("222", str(new / "checkpoint_step6.safetensors"))
    with pytest.raises(ValueError, match="run.resume 'yes'"):
        resume.prepare_resume(OmegaConf.create({"output_dir": str(tmp_path), "resume": "yes"}))


# ---- guards ------------------------------------------------------------------------------------------
def bare_runner(tmp_path, **run):
    runner = object.__new__(rb.RunnerBaseExt)
    runner.config = OmegaConf.create({"run": {"output_dir": str(tmp_path), **run}})
    runner.config.run_cfg = runner.config.run
    runner.job_id = "job"
    runner._model = torch.nn.Linear(1000, 1000)  # 4 MB trainable -> ~13 MB per checkpoint
    return runner


def test_unwritable_output_dir_fails_before_training_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    runner = bare_runner(blocker / "runs")
    with pytest.raises(PermissionError, match=r"a_file/runs/job.*cannot be created or written.*run.output_dir"):
        runner.setup_output_dir()


def test_not_enough_free_disk_fails_before_training(tmp_path, monkeypatch):
    runner = bare_runner(tmp_path)
    runner.setup_output_dir()
    runner.check_free_disk()  # plenty here
    monkeypatch.setattr(rb.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 50 << 20})())
    with pytest.raises(OSError, match=r"not enough free disk .*job.*50 MiB free, [0-9]+ MiB needed.*run.min_free_disk_mb"):
        runner.check_free_disk()


# ---- the loader position ------------------------------------------------------------------------------
class Numbers(IterableDataset):
    """A pass of 11 numbers shuffled by epoch, each with a random draw (like a random augmentation: the
    global torch RNG with num_workers=0, the worker's, seeded from the loader's generator, otherwise)."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(range(11))
        random.Random(self.epoch).shuffle(order)
        for i in order:
            yield torch.tensor([float(i), float(torch.rand(()))])


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_loader_position_restores_the_exact_next_batch(workers):
    def loader():
        dl = DataLoader(Numbers(), batch_size=2, num_workers=workers, generator=torch.Generator())
        return EpochStreamLoader(dl, dl.dataset, steps_per_epoch=4, seed=5)

    torch.manual_seed(0)
    reference = loader()
    ahead = [next(reference) for _ in range(9)]  # crosses the end of pass 0 (6 batches)
    for cut in (0, 3, 6, 7):
        torch.manual_seed(0)
        first = loader()
        for _ in range(cut):
            next(first)
        state, rng = first.state_dict(), ck.capture_rng_state()
        torch.manual_seed(123)
        resumed = loader()
        resumed.load_state_dict(state)
        resumed.fast_forward()  # as the runner does: replay, then this rank's RNG states
        ck.restore_rng_state(rng)
        assert [next(resumed).tolist() for _ in range(9 - cut)] == [b.tolist() for b in ahead[cut:]], cut
    assert reference.state_dict() == {"pass": 1, "batches": 3, "samples": 6, "samples_total": 17}


# ---- the loop state ------------------------------------------------------------------------------------
# Rank 0's train_state and the per-rank loop entries as RunnerBaseExt.save_state wrote them before LoopState
# existed (commit 44758b8): the task's counters flat in train_state, each rank's counters and loss sum under "loop".
OLD_MID_EPOCH = {"epoch": 1, "step": 3, "iters_per_epoch": 8, "global_step": 11, "epoch_done": False, "world_size": 2,
                 "best_agg_metric": 0.5, "best_epoch": 0, "nonfinite_steps": 2, "nonfinite_in_row": 1, "loss_sum": 7.5}
OLD_RANKS = [{"position": {"pass": 0, "batches": 11}, "loop": {"nonfinite_steps": 2, "nonfinite_in_row": 1, "loss_sum": 7.5}},
             {"position": {"pass": 0, "batches": 11}, "loop": {"nonfinite_steps": 2, "nonfinite_in_row": 1, "loss_sum": 6.25}}]
OLD_EPOCH_END = {"epoch": 1, "step": 8, "iters_per_epoch": 8, "global_step": 16, "epoch_done": True, "world_size": 1,
                 "best_agg_metric": 0.5, "best_epoch": 0, "nonfinite_steps": 2, "nonfinite_in_row": 0}  # no loss sum


def test_checkpoints_written_before_loop_state_resume_the_same(tmp_path):
    model, optimizer = trained()
    path = ck.save_checkpoint(tmp_path / "old.safetensors", model, optimizer=optimizer, epoch=0, train_state=OLD_MID_EPOCH,
                              rank_states=[{"rng": ck.capture_rng_state(), **entry} for entry in OLD_RANKS])
    _, meta = ck.read_checkpoint(path)
    rank0, rank1 = (LoopState.from_checkpoint(meta["train_state"], entry) for entry in meta["ranks"])
    assert rank1 == LoopState(epoch=1, step=3, iters_per_epoch=8, global_step=11, nonfinite_steps=2,
                              nonfinite_in_row=1, loss_sum=6.25)  # its own loss sum
    assert rank0.loss_sum == 7.5 and not rank0.epoch_done
    done = LoopState.from_checkpoint(OLD_EPOCH_END, {"loop": {"nonfinite_steps": 2, "nonfinite_in_row": 0}})
    assert done.epoch_done and (done.epoch, done.global_step, done.loss_sum) == (1, 16, 0.0)
    assert LoopState.from_checkpoint(OLD_EPOCH_END, None) == done  # a rank of another world size: train_state alone


def test_loop_state_round_trips_and_keeps_the_keys_readers_use(tmp_path):
    state = LoopState(epoch=2, step=5, iters_per_epoch=8, global_step=21, nonfinite_steps=1, loss_sum=3.125)
    model, optimizer = trained()
    path = ck.save_checkpoint(tmp_path / "c.safetensors", model, optimizer=optimizer, epoch=1,
                              train_state={**state.to_dict(), "world_size": 1},
                              rank_states=[{"rng": ck.capture_rng_state(), "loop": state.to_dict()}])
    _, meta = ck.read_checkpoint(path)
    assert LoopState.from_checkpoint(meta["train_state"], meta["ranks"][0]) == state
    # what checkpoints carried before LoopState is still there (resume_candidates sorts by global_step)
    assert set(OLD_MID_EPOCH) - {"best_agg_metric", "best_epoch"} <= set(meta["train_state"])
    assert meta["train_state"]["epoch_done"] is False
