"""Training strategies on the tiny models: which tensors train, adapters that save, reload and merge,
gradient checkpointing, and the non-finite guard of the training loop."""
from __future__ import annotations

import math

import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from omegaconf import OmegaConf
from tiny_models import SometimesNaN, images, tiny_model

from lavis_ext.checkpoints import load_trainable, read_checkpoint, save_checkpoint
from lavis_ext.models.strategies import format_parameter_report, merge_lora, parameter_report
from lavis_ext.runners.loop import TrainLoop
from lavis_ext.tasks.captioning import CaptionTaskExt

CAPTIONS = ["a photo of a red circle left of a blue square", "a photo of a green star above a cross"]
FROZEN_ALL = {"freeze_vit": True, "freeze_llm": True}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
NO_DROPOUT = {
    "blip2_opt_ext": {"opt_config": {"dropout": 0.0}, "qformer_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
    "blip2_t5_ext": {"t5_config": {"dropout_rate": 0.0}, "qformer_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
}
LLM = {"blip2_opt_ext": "opt_model", "blip2_t5_ext": "t5_model"}
PROJ = {"blip2_opt_ext": "opt_proj", "blip2_t5_ext": "t5_proj"}


def batch():
    return {"image": images(2), "text_input": list(CAPTIONS)}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, steps=3, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(batch())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


# Which parameters each strategy must train, as a predicate on the parameter name.
def _expected(arch, strategy):
    llm, proj = LLM[arch], PROJ[arch]
    image_side = ("Qformer.", "query_tokens", "ln_vision.", f"{proj}.")

    def rule(name: str) -> bool:
        lora = ".lora_" in name
        if strategy == "qformer_only":
            return name.startswith(image_side)
        if strategy == "vit_unfrozen":
            return name.startswith(image_side + ("visual_encoder.",))
        if strategy == "full":
            return True
        if strategy == "lora_llm":
            return name.startswith(image_side) or (name.startswith(f"{llm}.") and lora)
        if strategy == "lora_both":  # Q-Former base frozen by its adapters; queries and projection train
            return name.startswith(("query_tokens", "ln_vision.", f"{proj}.")) or lora
        raise AssertionError(strategy)

    return rule


STRATEGIES = {
    "qformer_only": FROZEN_ALL,
    "vit_unfrozen": {"freeze_vit": False, "freeze_llm": True},
    "full": {"freeze_vit": False, "freeze_llm": False},
    "lora_llm": {**FROZEN_ALL, "lora_llm": LORA},
    "lora_both": {**FROZEN_ALL, "lora_llm": LORA, "lora_qformer": LORA},
}


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_exactly_its_tensors(synthetic_root, arch, strategy):
    model = tiny_model(arch, **STRATEGIES[strategy])
    expected = _expected(arch, strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if expected(n)}
    before = snapshot(model)
    train_steps(model)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{strategy}: {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"{strategy}: frozen {name} changed"


def test_lora_presets_and_exact_adapter_count(synthetic_root):
    model = tiny_model("blip2_opt_ext", **FROZEN_ALL, lora_llm={"r": 4})
    llm = model.opt_model.config
    per_layer = 4 * 2 * 4 * llm.hidden_size  # q/k/v/out, A and B, r=4, width x width projections
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == llm.num_hidden_layers * per_layer
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "out_proj"}
    t5 = tiny_model("blip2_t5_ext", **FROZEN_ALL, lora_llm={"r": 4})
    t5_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in t5.named_parameters() if ".lora_" in n}
    assert t5_targets == {"q", "k", "v", "o"}


def test_unknown_lora_target_and_key_fail_clearly(synthetic_root):
    with pytest.raises(ValueError, match=r"\['q'\] name no layer of the opt model"):
        tiny_model("blip2_opt_ext", **FROZEN_ALL, lora_llm={"target_modules": ["q"]})
    with pytest.raises(ValueError, match=r"unknown LoRA keys \['rank'\]"):
        tiny_model("blip2_opt_ext", **FROZEN_ALL, lora_llm={"rank": 8})


def test_parameter_report_adds_up(synthetic_root):
    model = tiny_model("blip2_opt_ext", **FROZEN_ALL, lora_llm=LORA)
    rows = {r["module"]: r for r in parameter_report(model)}
    assert sum(r["total"] for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert rows["visual_encoder"]["trainable"] == 0
    assert rows["opt_model"]["trainable"] == 0 and rows["opt_model (LoRA)"]["trainable"] > 0
    assert rows["Qformer"]["trainable"] == rows["Qformer"]["total"]
    text = format_parameter_report(model)
    assert "opt_model (LoRA)" in text and "100.00%" in text and text.splitlines()[-1].startswith("total")


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext"])
def test_adapter_checkpoint_reloads_to_identical_outputs(synthetic_root, tmp_path, arch):
    overrides = {**FROZEN_ALL, "lora_llm": LORA}
    trained = train_steps(tiny_model(arch, seed=0, **overrides))
    path = save_checkpoint(tmp_path / "adapter.safetensors", trained, config={"model": dict(overrides)})
    tensors, meta = read_checkpoint(path)
    # only the trainable tensors: Q-Former side and the adapters, no frozen ViT/LLM weights
    assert all(".lora_" in k or not k.startswith(f"model.{LLM[arch]}.") for k in tensors)
    assert not any(k.startswith("model.visual_encoder.") for k in tensors)
    assert meta["config"]["model"]["lora_llm"]["r"] == 4

    trained.eval()
    fresh = tiny_model(arch, seed=0, **overrides).eval()  # the same base weights, new adapters
    with torch.no_grad():
        assert not torch.equal(fresh(batch())["loss"], trained(batch())["loss"])
        load_trainable(fresh, path)
        assert torch.equal(fresh(batch())["loss"], trained(batch())["loss"])
        # and through the model config, as evaluate.py and serving load it
        via_config = tiny_model(arch, seed=0, **overrides, load_finetuned=True, finetuned=str(path)).eval()
        assert torch.equal(via_config(batch())["loss"], trained(batch())["loss"])
        assert via_config.generate({"image": images(2)}, num_beams=2, max_length=6) == trained.generate(
            {"image": images(2)}, num_beams=2, max_length=6
        )


def test_checkpoint_of_another_strategy_is_refused(synthetic_root, tmp_path):
    lora = train_steps(tiny_model("blip2_opt_ext", **FROZEN_ALL, lora_llm=LORA), steps=1)
    path = save_checkpoint(tmp_path / "lora.safetensors", lora)
    plain = tiny_model("blip2_opt_ext", **FROZEN_ALL)
    with pytest.raises(RuntimeError, match="same strategy and LoRA keys"):
        load_trainable(plain, path)


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext"])
def test_merged_lora_equals_unmerged(synthetic_root, arch):
    model = train_steps(tiny_model(arch, **FROZEN_ALL, lora_llm=LORA, lora_qformer=LORA)).eval()
    with torch.no_grad():
        loss = model(batch())["loss"]
        captions = model.generate({"image": images(2)}, num_beams=2, max_length=6)
        merged = merge_lora(model)
        assert merged > 0
        assert not any(".lora_" in k or "base_layer" in k for k in model.state_dict())
        torch.testing.assert_close(model(batch())["loss"], loss, rtol=1e-5, atol=1e-5)
        assert model.generate({"image": images(2)}, num_beams=2, max_length=6) == captions


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext"])
def test_gradient_checkpointing_gives_the_same_gradients(synthetic_root, arch):
    def grads(**extra):
        model = tiny_model(arch, seed=0, **NO_DROPOUT[arch], freeze_vit=False, freeze_llm=False, **extra).train()
        model(batch())["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    checkpointed = grads(use_grad_checkpoint=True, qformer_grad_checkpoint=True, llm_grad_checkpoint=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- the training loop's guard against non-finite losses ------------------------------------

def run_loop(flags, max_in_row=3):
    model = SometimesNaN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=0.1, init_lr=0.1)
    task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
    loop = TrainLoop(OmegaConf.create({"max_nonfinite_in_row": max_in_row, "max_grad_norm": 1.0}))
    loader = iter([{"x": torch.ones(1), "bad": bad} for bad in flags])
    stats = loop.run_epoch(task, 0, len(flags), model, loader, optimizer, scheduler, log_freq=100)
    return model, loop.state, stats


def test_nonfinite_losses_skip_the_update_and_are_counted():
    model, state, stats = run_loop([True, False, True, True, False])
    assert state.nonfinite_steps == 3 and stats["nonfinite_steps"] == 3
    assert math.isfinite(float(stats["loss"]))
    # two good SGD steps on w^2 from w=1 with lr 0.1, gradient clipped to norm 1: 1 -> 0.9 -> 0.8
    assert model.weight.item() == pytest.approx(0.8)


def test_too_many_nonfinite_losses_in_a_row_stop_the_run():
    with pytest.raises(FloatingPointError, match=r"3 non-finite losses/gradients in a row.*run.max_nonfinite_in_row"):
        run_loop([False, True, True, True, False])


def test_stage2_initialises_from_a_stage1_checkpoint(synthetic_root, tmp_path):
    stage1 = tiny_model("blip2_qformer_ext", seed=1)
    path = save_checkpoint(tmp_path / "stage1.safetensors", stage1)
    stage2 = tiny_model("blip2_opt_ext", seed=2, load_pretrained=True, pretrained=str(path))
    first = stage1.state_dict()
    shared = [k for k in stage2.state_dict() if k.startswith(("Qformer.", "visual_encoder.", "query_tokens"))]
    assert len(shared) > 50
    for name in shared:
        assert torch.equal(stage2.state_dict()[name], first[name]), name
    # stage 2's own parts keep their initialisation
    assert not torch.equal(stage2.opt_proj.weight, tiny_model("blip2_opt_ext", seed=3).opt_proj.weight)


def test_init_from_a_checkpoint_of_another_size_fails_naming_tensors(synthetic_root, tmp_path):
    other = tiny_model("blip2_qformer_ext", num_query_token=8)
    path = save_checkpoint(tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match=r"does not fit this model config: \['query_tokens \(1, 8, 64\) vs \(1, 16, 64\)"):
        tiny_model("blip2_opt_ext", load_pretrained=True, pretrained=str(path))


def test_trainable_tensors_are_fp32_while_frozen_towers_stay_half(synthetic_root):
    lora = tiny_model("blip2_opt_ext", **FROZEN_ALL, llm_precision="fp16", lora_llm=LORA)
    dtypes = {n: p.dtype for n, p in lora.opt_model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.float16}
    full = tiny_model("blip2_opt_ext", freeze_vit=False, freeze_llm=False, llm_precision="fp16")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    t5 = tiny_model("blip2_t5_ext", **FROZEN_ALL, llm_precision="fp16")
    assert {p.dtype for p in t5.t5_model.parameters()} == {torch.bfloat16}  # never fp16


def test_precision_policy(synthetic_root):
    from lavis_ext.precision import resolve_amp_dtype

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    amp = {"amp": True, "amp_dtype": "fp16"}
    assert resolve_amp_dtype(amp, cpu) is None  # fp16 autocast is not a CPU training path: fp32
    assert resolve_amp_dtype({"amp": True, "amp_dtype": "bf16"}, cpu) == torch.bfloat16  # a bf16 recipe on a CPU
    assert resolve_amp_dtype({"amp": False, "amp_dtype": "bf16"}, cpu) is None
    assert resolve_amp_dtype({"amp": False, "amp_dtype": "bf16"}, cuda) is None
    assert resolve_amp_dtype(amp, cuda, tiny_model("blip2_opt_ext")) == torch.float16
    assert resolve_amp_dtype(amp, cuda, tiny_model("blip2_t5_ext")) == torch.bfloat16  # T5 overflows in fp16
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_amp_dtype({"amp": True, "amp_dtype": "fp8"}, cuda)


def test_a_bf16_recipe_computes_in_bf16_on_cpu(synthetic_root):
    """``amp: true, amp_dtype: bf16`` autocasts the training step on a CPU as on a GPU; ``amp: false`` is fp32."""
    from lavis_ext.tasks.captioning import CaptionTaskExt

    model = tiny_model("blip2_opt_ext").float()  # as task.build_model leaves it on a CPU
    seen = []
    model.opt_model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    samples = {"image": torch.randn(2, 3, 64, 64), "text_input": ["a photo of a red circle", "a photo of a blue square"]}
    for amp, want in (({"amp": True, "amp_dtype": "bf16"}, torch.bfloat16), ({"amp": False}, torch.float32)):
        task = CaptionTaskExt(num_beams=1, max_len=5, min_len=1, evaluate=False)
        task.run_cfg = amp
        with task._autocast(torch.device("cpu"), model):
            loss = model(samples)["loss"]
        assert seen[-1] == want and torch.isfinite(loss)
