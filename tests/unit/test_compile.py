"""``run.compile`` (lavis_ext.runners.compile): which towers compile, that names and checkpoints are unchanged, that a
bad value fails at the config check, and that compiled steps equal eager ones (AOT autograd in the default suite;
inductor's generated kernels, a minute or more each on a CPU, under the ``slow`` marker)."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import images, tiny_model

from lavis_ext.config import ConfigError, load_config
from lavis_ext.runners import runner_base
from lavis_ext.runners.compile import COMPILE_MODES, compile_mode, compile_towers, towers
from lavis_ext.runners.runner_base import RunnerBaseExt, build_optimizer

CAPTIONS = ["a red circle left of a blue square", "two shapes: a green cross", "a big yellow circle", "a blue square"]


def caption_batch(seed=0):
    return {"image": images(4, seed), "text_input": CAPTIONS}


def answer_batch(seed=0):
    return {"image": images(4, seed), "text_input": ["Question: what is it? Short answer:"] * 4, "text_output": CAPTIONS}


@pytest.mark.parametrize("setting, mode", [(None, None), (False, None), (True, "default"),
                                           *[(m, m) for m in COMPILE_MODES]])
def test_compile_setting_gives_the_torch_compile_mode(setting, mode):
    assert compile_mode(setting) == mode


@pytest.mark.parametrize("bad", ["fast", 2, "inductor"])
def test_a_bad_compile_value_fails_at_the_config_check_naming_it(bad):
    args = argparse.Namespace(cfg_path="projects/tiny/caption_opt.yaml", options=[f"run.compile={bad}"])
    with pytest.raises(ConfigError, match=rf"run\.compile {bad!r}: use true, false or a torch\.compile mode \(default, "):
        load_config(args)


@pytest.mark.parametrize("arch, llm", [("blip2_opt_ext", "opt_model"), ("blip2_t5_ext", "t5_model")])
def test_the_three_towers_compile_in_place_and_every_name_stays(synthetic_root, arch, llm):
    model = tiny_model(arch)
    keys = list(model.state_dict())
    assert compile_towers(model, False) == []
    assert compile_towers(model, True, backend="eager") == ["visual_encoder", "Qformer.bert", llm]
    compiled = towers(model)
    assert all(block._compiled_call_impl is not None for block in compiled.values())
    assert compiled["Qformer.bert"] is model.Qformer.bert and compiled[llm] is getattr(model, llm)
    assert list(model.state_dict()) == keys  # checkpoints keep their tensor names (no "_orig_mod." prefix)


def _steps(model, batches):
    """Losses of a few AdamW steps (the runner's optimizer) in train mode with dropout off."""
    optimizer = build_optimizer(model, OmegaConf.create({"init_lr": 1e-3, "weight_decay": 0.05}))
    losses = []
    for batch in batches:
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


NO_DROPOUT = {"qformer_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "opt_config": {"dropout": 0.0}, "t5_config": {"dropout_rate": 0.0}}


def _compiled_pair(arch, backend):
    """A tiny model without dropout (compiled kernels draw other random numbers) and a compiled copy."""
    llm = "opt_config" if "opt" in arch else "t5_config"
    eager = tiny_model(arch, qformer_config=NO_DROPOUT["qformer_config"], **{llm: NO_DROPOUT[llm]}).train()
    compiled = copy.deepcopy(eager)
    compile_towers(compiled, True, backend=backend)
    return eager, compiled


def test_aot_compiled_towers_train_and_caption_as_eager(synthetic_root, one_thread):
    """Dynamo's graphs through AOT autograd (what inductor compiles, run by eager kernels): the same losses over
    three AdamW steps, the same weights after them, the same greedy captions."""
    eager, compiled = _compiled_pair("blip2_opt_ext", "aot_eager")
    batches = [caption_batch(seed) for seed in range(3)]
    torch.testing.assert_close(_steps(compiled, batches), _steps(eager, batches), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    eager.eval(), compiled.eval()
    sample = {"image": images(2, 5)}
    assert compiled.generate(sample, num_beams=1, max_length=8) == eager.generate(sample, num_beams=1, max_length=8)


def test_the_runner_compiles_the_towers_once_as_run_compile_says(synthetic_root, monkeypatch):
    calls = []

    def eager_backend(model, setting):
        calls.append(setting)
        return compile_towers(model, setting, backend="eager")

    monkeypatch.setattr(runner_base, "compile_towers", eager_backend)
    runner = object.__new__(RunnerBaseExt)
    runner.config = OmegaConf.create({"run": {"compile": "max-autotune"}})
    runner.config.run_cfg = runner.config.run
    runner._model, runner._wrapped_model, runner._device = tiny_model("blip2_opt_ext"), None, torch.device("cpu")
    monkeypatch.setattr(RunnerBaseExt, "use_distributed", property(lambda self: False))
    first, second = runner.model, runner.model
    assert first is second is runner._model and calls == ["max-autotune"]
    assert runner._model.opt_model._compiled_call_impl is not None


@pytest.mark.slow
@pytest.mark.parametrize("arch, batch", [("blip2_opt_ext", caption_batch), ("blip2_t5_ext", answer_batch)])
def test_inductor_compiled_training_steps_equal_eager_within_float_rounding(synthetic_root, one_thread, arch, batch):
    """What ``run.compile: true`` runs: inductor's generated C++ kernels, which sum in another order. Every gradient
    of a first backward within 1e-5 (they are 0.1-1 in size), then the losses of three AdamW steps within 1e-5.
    (Weights are not compared after the steps: gradients that are zero in exact arithmetic, the attention key
    biases', are float noise on both sides, and Adam scales noise up to full-size updates.)"""
    eager, compiled = _compiled_pair(arch, "inductor")
    first = batch(0)
    for model in (eager, compiled):
        model(first)["loss"].backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
    batches = [batch(seed) for seed in range(3)]
    torch.testing.assert_close(_steps(compiled, batches), _steps(eager, batches), rtol=1e-5, atol=1e-5)


def test_a_model_without_towers_fails_naming_the_fix():
    assert compile_towers(torch.nn.Linear(2, 2), False) == []
    with pytest.raises(ValueError, match="Linear has none of the towers it compiles .*set run.compile: false"):
        compile_towers(torch.nn.Linear(2, 2), True, backend="eager")
