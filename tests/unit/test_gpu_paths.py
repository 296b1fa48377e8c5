"""What only a CUDA device can show (``gpu`` marker, skipped without one): the training loop's deferred non-finite
check is the default there and gives the per-step check's weights, and the lean decode loop gives transformers'
tokens on the device. The CPU versions of both run in the default suite (test_hot_paths.py, test_decode.py)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import images, tiny_model, train_sometimes_nan

from lavis_ext.models import decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def train_on_cuda(flags, check):
    model, optimizer, loop, _ = train_sometimes_nan(flags, check, device="cuda")
    deferred = loop._deferred is not None  # the check the loop resolved for the epoch (kept until the next one)
    return model, optimizer.state[model.weight], loop.state, deferred


def test_deferred_check_is_the_cuda_default_and_gives_the_per_step_weights():
    flags = [False, True, False, True, True, False, False, True]
    model, adam, state, resolved = train_on_cuda(flags, None)
    ref_model, ref_adam, ref_state, ref_resolved = train_on_cuda(flags, "step")
    assert resolved and not ref_resolved
    assert torch.equal(model.weight, ref_model.weight) and model.weight.item() != 1.0
    assert adam["step"].item() == ref_adam["step"].item() == 4
    assert torch.equal(adam["exp_avg"], ref_adam["exp_avg"]) and torch.equal(adam["exp_avg_sq"], ref_adam["exp_avg_sq"])
    assert state == ref_state and state.nonfinite_steps == 4


@pytest.mark.parametrize("beams", [1, 5])
def test_lean_decode_tokens_equal_hf_generate_on_cuda(synthetic_root, beams):
    model = tiny_model("blip2_opt_ext", 0).eval().to("cuda")
    llm, pad = model.opt_model, model.opt_tokenizer.pad_token_id
    prompts = [("a photo of" + " a red" * (i % 4)).strip() for i in range(16)]  # left padding
    with torch.no_grad():
        queries, atts = model.encode_image_for_llm(images(16, 0).to("cuda"))
        ids, mask = model.prompt_tokens(model.opt_tokenizer, prompts, "left")
        embeds, mask = model._prefixed_embeds(queries, ids.to("cuda")), torch.cat([atts, mask.to("cuda")], 1)
        kw = dict(eos_token_id=model.eos_token_id, pad_token_id=pad, num_beams=beams, max_new_tokens=12,
                  min_new_tokens=1)
        ref = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
        got = decode.opt_generate(llm, embeds, mask, **kw)
    assert ref.shape == got.shape and torch.equal(ref, got), f"HF {ref.tolist()} vs lean {got.tolist()}"
