"""RunnerBaseExt pieces that need no training run: val_freq, the stream loader, the optimizer's LR scales and the
training loop (hooks, a plain LAVIS task, a mid-epoch restore)."""
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

    from lavis_ext.runners.loop import apply_lr_scales

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


# ---- the training loop (lavis_ext.runners.loop) ----------------------------------------------------------
def loop_setup():
    import torch
    from lavis.common.optims import LinearWarmupCosineLRScheduler
    from tiny_models import SometimesNaN

    model = SometimesNaN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=2, min_lr=0.01, init_lr=0.1)
    batches = [{"x": torch.full((1,), 1.0 + k / 10), "bad": False} for k in range(6)]
    return model, optimizer, scheduler, batches


def test_a_plain_lavis_task_trains_and_hooks_run_after_each_optimizer_step():
    """The runner's loop asks the task for train_step only (LAVIS's BaseTask here); test hooks run after each
    optimizer step (end of an accumulation window), before the runner's on_step; production has none."""
    from lavis.tasks.base_task import BaseTask

    from lavis_ext.runners.loop import TrainLoop

    model, optimizer, scheduler, batches = loop_setup()
    calls = []
    loop = TrainLoop({}, on_step=lambda lp: calls.append(("on_step", lp.state.global_step)))
    assert loop.hooks == []
    loop.hooks.append(lambda lp: calls.append(("hook", lp.state.global_step, lp.state.step)))
    stats = loop.run_epoch(BaseTask(), epoch=1, iters_per_epoch=6, model=model, data_loader=batches,
                           optimizer=optimizer, lr_scheduler=scheduler, accum_grad_iters=2)
    assert calls == [("hook", 8, 2), ("on_step", 8), ("hook", 10, 4), ("on_step", 10), ("hook", 12, 6), ("on_step", 12)]
    assert model.weight.item() < 1.0 and stats["nonfinite_steps"] == 0
    assert loop.state.epoch_done and (loop.state.epoch, loop.state.global_step, loop.state.loss_sum) == (1, 12, 0.0)


def test_an_epoch_restored_mid_way_ends_as_the_uninterrupted_one():
    """Stopped after step 2 (a hook raises), the snapshot restored into a new loop: the remaining steps run once,
    and the weights and the epoch's mean loss are those of the epoch never stopped."""
    import pytest
    from lavis.tasks.base_task import BaseTask

    from lavis_ext.runners.loop import LoopState, TrainLoop

    class Scalars(dict):  # the run tracker's one method the loop calls
        def scalar(self, name, value, step):
            self[name] = value

    model, optimizer, scheduler, batches = loop_setup()
    expected = Scalars()
    TrainLoop({}, tracker=expected).run_epoch(BaseTask(), 0, 6, model, iter(batches), optimizer, scheduler)
    expected_weight = model.weight.item()

    model, optimizer, scheduler, batches = loop_setup()
    first = TrainLoop({})
    saved = []

    def stop(loop):
        if loop.state.global_step == 2:
            saved.append(LoopState.from_dict(loop.snapshot().to_dict()))  # through the checkpoint's JSON form
            raise KeyboardInterrupt

    first.hooks.append(stop)
    with pytest.raises(KeyboardInterrupt):
        first.run_epoch(BaseTask(), 0, 6, model, iter(batches), optimizer, scheduler)
    (state,) = saved
    assert (state.epoch, state.step, state.iters_per_epoch) == (0, 2, 6) and state.loss_sum > 0
    logged = Scalars()
    resumed = TrainLoop({}, tracker=logged)
    resumed.restore(state)
    resumed.run_epoch(BaseTask(), 0, 6, model, iter(batches[2:]), optimizer, scheduler)
    assert logged["train/epoch_loss"] == expected["train/epoch_loss"] and model.weight.item() == expected_weight
    assert resumed.state.global_step == 6
    other = TrainLoop({})
    other.restore(state)
    with pytest.raises(ValueError, match=r"checkpoint's epoch has 6 steps, this run's 4"):
        other.run_epoch(BaseTask(), 0, 4, model, iter(batches), optimizer, scheduler)
