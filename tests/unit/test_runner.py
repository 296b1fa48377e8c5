"""RunnerBaseExt pieces that need no training run: val_freq and the stream loader."""
from __future__ import annotations

import pytest
from lavis.runners.runner_base import RunnerBase
from omegaconf import OmegaConf

from lavis_ext.runners.loaders import EpochStreamLoader
from lavis_ext.runners.runner_base import RunnerBaseExt


def bare_runner(**run):
    runner = object.__new__(RunnerBaseExt)
    runner.config = OmegaConf.create({"run": {"max_epoch": 10, "evaluate": False, "valid_splits": ["val"], **run}})
    runner.config.run_cfg = runner.config.run
    return runner


@pytest.fixture
def stub_eval(monkeypatch):
    monkeypatch.setattr(RunnerBase, "eval_epoch", lambda self, split_name, cur_epoch, skip_reload=False: {"ran": cur_epoch})


@pytest.mark.parametrize("freq, expected", [(1, list(range(10))), (4, [3, 7, 9]), (20, [9])])
def test_val_freq_validates_every_n_epochs_and_the_last(stub_eval, freq, expected):
    runner = bare_runner(val_freq=freq)
    ran = [e for e in range(10) if runner.eval_epoch("val", e) is not None]
    assert ran == expected


def test_val_freq_never_skips_test_splits(stub_eval):
    runner = bare_runner(val_freq=4)
    assert runner.eval_epoch("test", "best") == {"ran": "best"}
    assert runner.eval_epoch("test", 2) == {"ran": 2}


class _Counting:
    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_stream_loader_has_fixed_length_and_restarts_with_new_epoch():
    dataset = _Counting()
    loader = EpochStreamLoader([1, 2, 3], dataset, steps_per_epoch=2, first_pass=5)
    assert len(loader) == 2
    assert [next(loader) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert dataset.epochs == [5, 6, 7]
