"""Hot-path behaviour the benchmarks rely on: the training loop reads the device once per optimizer step
(not once per micro-step or per check), accumulation windows with a non-finite loss are skipped as one step,
and OPT is built with SDPA attention."""
from __future__ import annotations

import json
import math

import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from omegaconf import OmegaConf
from tiny_models import SometimesNaN, train_sometimes_nan

from lavis_ext.models.llm_specs import OPT
from lavis_ext.runners.loop import TrainLoop
from lavis_ext.tasks.captioning import CaptionTaskExt



def run_loop(flags, accum=1, max_grad_norm=1.0):
    model = SometimesNaN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=0.1, init_lr=0.1)
    task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
    loop = TrainLoop(OmegaConf.create({"max_nonfinite_in_row": 5, "max_grad_norm": max_grad_norm}))
    loader = iter([{"x": torch.ones(1), "bad": bad} for bad in flags])
    stats = loop.run_epoch(task, 0, len(flags), model, loader, optimizer, scheduler, log_freq=100,
                           accum_grad_iters=accum)
    return model, loop.state, stats


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every device-to-host read of a tensor value (``.item()``, ``bool()``, ``float()``, ``.tolist()``)."""
    count = {"n": 0}
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_one_host_read_per_optimizer_step(host_reads, max_grad_norm):
    steps = 6
    run_loop([False] * steps, max_grad_norm=max_grad_norm)
    # one per optimizer step (skip or not), plus the last step's log line and the epoch's mean loss
    assert host_reads["n"] == steps + 2


def test_accumulation_reads_once_per_window(host_reads):
    run_loop([False] * 8, accum=4)
    assert host_reads["n"] == 2 + 2


def test_a_nonfinite_loss_skips_its_whole_accumulation_window_once():
    model, state, stats = run_loop([True, False, False, False], accum=2)
    assert state.nonfinite_steps == 1 and stats["nonfinite_steps"] == 1
    assert state.nonfinite_in_row == 0  # the second window stepped
    # one SGD step on the mean of two w^2 gradients (2w/2 each, clipped to norm 1): w = 1 - 0.1 * 1
    assert model.weight.item() == pytest.approx(0.9)
    assert math.isfinite(float(stats["loss"]))


def test_nonfinite_gradient_norm_is_named_and_skipped(caplog):
    class InfGrad(SometimesNaN):
        def forward(self, samples):  # sqrt(w - 1) at w = 1: loss 0, gradient +inf
            return {"loss": (self.weight - samples["x"]).sqrt().sum()}

    model = InfGrad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=0.1, init_lr=0.1)
    task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
    loop = TrainLoop(OmegaConf.create({"max_grad_norm": 1.0}))
    with caplog.at_level("WARNING"):
        loop.run_epoch(task, 0, 1, model, iter([{"x": torch.ones(1), "bad": True}]), optimizer, scheduler)
    assert loop.state.nonfinite_steps == 1 and model.weight.item() == 1.0
    assert "non-finite gradient norm" in caplog.text


# ---- run.nonfinite_check: deferred (the GPU default), forced here on a CPU -------------------------------------

@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_deferred_check_gives_the_weights_and_counts_of_the_per_step_check(max_grad_norm):
    flags = [False, True, False, True, True, False, False, True]
    runs = {check: train_sometimes_nan(flags, check, max_grad_norm=max_grad_norm) for check in ("step", "deferred")}
    (m1, o1, l1, s1), (m2, o2, l2, s2) = runs["step"], runs["deferred"]
    assert torch.equal(m1.weight, m2.weight) and m1.weight.item() != 1.0  # good steps updated, bad ones skipped alike
    st1, st2 = o1.state[m1.weight], o2.state[m2.weight]
    assert st1["step"].item() == st2["step"].item() == 4  # a skipped step does not count as an Adam step
    assert torch.equal(st1["exp_avg"], st2["exp_avg"]) and torch.equal(st1["exp_avg_sq"], st2["exp_avg_sq"])
    assert l1.state == l2.state and l2.state.nonfinite_steps == 4 and l2.state.nonfinite_in_row == 1
    assert s1["nonfinite_steps"] == s2["nonfinite_steps"] == 4


def test_deferred_check_reads_the_device_only_at_log_lines_and_the_epoch_end(host_reads):
    train_sometimes_nan([False] * 12, "deferred", log_freq=4)
    # per log line (3): the skip counts and the loss; at the epoch end: the counts and the mean loss
    assert host_reads["n"] == 3 * 2 + 2


def test_deferred_check_stops_the_run_at_the_next_read_after_too_many_in_a_row():
    with pytest.raises(FloatingPointError, match=r"3 non-finite losses/gradients in a row \(step 8,"):
        train_sometimes_nan([False, True, True, True, False, False, False, False], "deferred", max_in_row=3, log_freq=8)
    model, _, loop, _ = train_sometimes_nan([False, True, True, False] * 2, "deferred", max_in_row=3, log_freq=4)
    assert loop.state.nonfinite_steps == 4  # never 3 in a row: no stop


def test_nonfinite_check_values_and_what_deferred_needs_fail_before_training():
    with pytest.raises(ValueError, match=r"run.nonfinite_check 'later': use one of step, deferred"):
        TrainLoop(OmegaConf.create({"nonfinite_check": "later"}))
    model = SometimesNaN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=0.1, init_lr=0.1)
    loop = TrainLoop(OmegaConf.create({"nonfinite_check": "deferred"}))
    task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
    with pytest.raises(ValueError, match=r"SGD is not torch's fused Adam/AdamW.*run.optimizer_impl"):
        loop.run_epoch(task, 0, 1, model, iter([{"x": torch.ones(1), "bad": False}]), optimizer, scheduler)
    assert model.weight.item() == 1.0  # refused before the first step


def test_opt_is_built_with_sdpa_attention(tmp_path):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    inline = {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "word_embed_proj_dim": 16, "max_position_embeddings": 32}
    _, model = OPT.build(None, str(tmp_path), inline, torch.float32)
    assert model.config._attn_implementation == "sdpa"
