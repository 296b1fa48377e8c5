"""The runner's AdamW (``build_optimizer``): LAVIS's groups, ``run.optimizer_impl`` (fused by default where torch
has the kernel) with the same update as torch's per-tensor loop, and the implementation kept across a resume."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lavis.runners.runner_base import RunnerBase
from omegaconf import OmegaConf

from lavis_ext.runners.runner_base import build_optimizer, keep_optimizer_impl, resolve_optimizer_impl


def run_cfg(**extra):
    return OmegaConf.create({"init_lr": 1e-3, "weight_decay": 0.05, **extra})


@pytest.fixture
def model(synthetic_root):
    from tiny_models import tiny_model

    return tiny_model("blip2_opt_ext").float()


def test_default_is_fused_for_cpu_floats_and_bad_values_name_the_fix():
    floats = [torch.zeros(2, requires_grad=True)]
    assert resolve_optimizer_impl(floats) == "fused"
    assert resolve_optimizer_impl(floats, "for_loop") == "for_loop"
    assert resolve_optimizer_impl(floats, "foreach") == "foreach"
    with pytest.raises(ValueError, match="run.optimizer_impl 'apex': use one of fused, foreach, for_loop"):
        resolve_optimizer_impl(floats, "apex")
    ints = [torch.zeros(2, dtype=torch.int64)]
    assert resolve_optimizer_impl(ints) == "foreach"  # unset: the fastest one that runs
    with pytest.raises(ValueError, match="dtype torch.int64.*set run.optimizer_impl: foreach"):
        resolve_optimizer_impl(ints, "fused")


def test_plain_groups_are_lavis_groups_in_lavis_order(model):
    ours = build_optimizer(model, run_cfg())
    stock = RunnerBase.optimizer.fget(SimpleNamespace(_optimizer=None, model=model, config=SimpleNamespace(run_cfg=run_cfg())))
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == [[id(p) for p in g["params"]] for g in stock.param_groups]
    assert [g["weight_decay"] for g in ours.param_groups] == [0.05, 0]
    assert ours.defaults["fused"] is True and stock.defaults["fused"] is None  # torch's loop on a CPU


def test_unknown_impl_fails_before_training(model):
    with pytest.raises(ValueError, match="run.optimizer_impl 'fast'"):
        build_optimizer(model, run_cfg(optimizer_impl="fast"))


def _train(model, impl: str, steps: int = 4) -> tuple[list[float], torch.nn.Module]:
    from tiny_models import images

    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(model, run_cfg(optimizer_impl=impl))
    # captions carry the model's prompt, as the caption datasets write them (the prompt tokens are not scored)
    captions = ["a red circle left of a blue square", "a green cross", "two small shapes", "a big yellow triangle"]
    batch = {"image": images(4), "text_input": [f"{model.prompt}{c}" for c in captions]}
    losses = []
    torch.manual_seed(0)  # the same dropout draws on every side
    for _ in range(steps):
        loss = model(dict(batch))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_fused_and_foreach_update_as_the_per_tensor_loop(model, one_thread):
    """foreach is bitwise the loop; fused orders the same arithmetic differently (~5e-8 on a weight after 4 steps).
    Attention key biases are left out of the weight check: their true gradient is 0 (softmax ignores a shift shared
    by all keys), so AdamW turns the rounding of a ~0 gradient into steps of ~lr whose sign is noise."""
    loop_losses, loop_model = _train(model, "for_loop")
    assert loop_losses[-1] < loop_losses[0]  # it did train
    foreach_losses, foreach_model = _train(model, "foreach")
    assert foreach_losses == loop_losses
    assert all(torch.equal(a, b) for a, b in zip(foreach_model.parameters(), loop_model.parameters()))
    fused_losses, fused_model = _train(model, "fused")
    assert fused_losses == pytest.approx(loop_losses, rel=1e-6, abs=0)
    worst = max((a - b).abs().max().item() for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters())
                if not name.endswith(("key.bias", "k_proj.bias")))
    assert worst < 1e-6


def test_resume_keeps_the_configured_impl(model):
    """``load_state_dict`` restores the saved groups' flags; the run's own choice wins afterwards."""
    saved = build_optimizer(copy.deepcopy(model), run_cfg(optimizer_impl="for_loop")).state_dict()
    optimizer = build_optimizer(model, run_cfg())
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["fused"] is False
    keep_optimizer_impl(optimizer)
    assert all(g["fused"] is True and g["foreach"] is False for g in optimizer.param_groups)
