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


def test_vit_layer_decay_gives_each_block_its_learning_rate(synthetic_root):
    """The paper's layer-wise LR decay (Tables 7-9): block i of L at lr x d^(L - i), embeddings at d^(L + 1)."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from tiny_models import tiny_model

    from lavis_ext.tasks.base import apply_lr_scales

    model = tiny_model("blip2_opt_ext")  # ViT of 3 blocks
    runner = object.__new__(RunnerBaseExt)
    runner._optimizer, runner._model, runner._wrapped_model = None, model, model
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create(
        {"vit_layer_decay": 0.5, "init_lr": 1.0, "weight_decay": 0.05, "distributed": False}))
    optimizer = runner.optimizer
    apply_lr_scales(optimizer)  # the scheduler has just set lr = 1.0 on every group
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["visual_encoder.blocks.2.attn.qkv.weight"])] == 0.5
    assert lr_of[id(named["visual_encoder.blocks.0.attn.qkv.weight"])] == 0.125
    assert lr_of[id(named["visual_encoder.patch_embed.proj.weight"])] == 0.0625
    assert lr_of[id(named["opt_proj.weight"])] == 1.0 and lr_of[id(named["query_tokens"])] == 1.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(named["opt_proj.bias"]) in no_decay and id(named["opt_proj.weight"]) not in no_decay
    assert isinstance(optimizer, torch.optim.AdamW)
