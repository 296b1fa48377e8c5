"""The lean OPT decode loop (lavis_ext.models.decode) returns transformers' ``generate`` tokens exactly: greedy and
beam 5, batch 1 and 16, one prompt and left-padded prompts of several lengths, several seeds, min/max length
edges, early EOS (an EOS id the model emits mid-caption), repetition penalty and several returned beams; the model
path (``decode_impl: lean`` vs ``hf``), its fallbacks, the prompt cache and concurrent callers."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from tiny_models import images, tiny_model

from lavis_ext.models import decode, generation


def opt_model(seed=0):
    return tiny_model("blip2_opt_ext", seed).eval()


def prefix(model, batch, prompts, seed):
    """The image + prompt embeddings and mask our generate hands to the LLM (left padding)."""
    with torch.no_grad():
        queries, atts = model.encode_image_for_llm(images(batch, seed))
        ids, mask = model.prompt_tokens(model.opt_tokenizer, prompts, "left")
        return model._prefixed_embeds(queries, ids), torch.cat([atts, mask], 1)


def prompt_sets(batch):
    one = ["a photo of"] * batch
    varied = [("a photo of" + " a red" * (i % 4)).strip() for i in range(batch)]  # 4 lengths: left padding
    return {"one prompt": one, "padded prompts": varied if batch > 1 else ["a red square left of"]}


def both(llm, embeds, mask, **kw):
    with torch.no_grad():
        ref = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
        assert decode.lean_unsupported(llm, kw) is None
        got = decode.opt_generate(llm, embeds, mask, **kw)
    return ref, got


def assert_same(ref, got, what):
    assert ref.shape == got.shape and torch.equal(ref, got), f"{what}: HF {ref.tolist()} vs lean {got.tolist()}"


@pytest.mark.parametrize("beams", [1, 5])
@pytest.mark.parametrize("batch", [1, 16])
def test_lean_tokens_equal_hf_generate(synthetic_root, one_thread, batch, beams):
    for seed in (0, 1, 2):
        model = opt_model(seed)
        llm, pad = model.opt_model, model.opt_tokenizer.pad_token_id
        for label, prompts in prompt_sets(batch).items():
            embeds, mask = prefix(model, batch, prompts, seed)
            ref, _ = both(llm, embeds, mask, eos_token_id=model.eos_token_id, pad_token_id=pad, num_beams=beams,
                          max_new_tokens=12, min_new_tokens=1)
            # an EOS the model does emit mid-caption, so rows stop at different steps (greedy) and beams finish
            # before the limit (the merge of finished hypotheses, the early-stop heuristic)
            early_eos = int(ref[0, min(3, ref.shape[1] - 1)])
            stopped_early = False
            for eos in (model.eos_token_id, early_eos):
                for min_new, max_new in ((1, 12), (0, 1), (0, 6), (5, 5), (3, 20)):
                    # every beam returned: finished hypotheses show, not only the (often longest) best one
                    ref, got = both(llm, embeds, mask, eos_token_id=eos, pad_token_id=pad, num_beams=beams,
                                    max_new_tokens=max_new, min_new_tokens=min_new, num_return_sequences=beams)
                    assert_same(ref, got, f"seed {seed}, {label}, eos {eos}, min {min_new}, max {max_new}")
                    stopped_early |= eos == early_eos and bool((ref == eos).any())
            assert stopped_early  # the early EOS did end captions (hypotheses) before the limit


def test_early_eos_stops_rows_and_pads_them(synthetic_root, one_thread):
    model = opt_model()
    llm, pad = model.opt_model, model.opt_tokenizer.pad_token_id
    embeds, mask = prefix(model, 16, prompt_sets(16)["padded prompts"], 0)
    ref, _ = both(llm, embeds, mask, eos_token_id=model.eos_token_id, pad_token_id=pad, max_new_tokens=10)
    eos = int(ref[0, 2])
    ref, got = both(llm, embeds, mask, eos_token_id=eos, pad_token_id=pad, max_new_tokens=10)
    assert_same(ref, got, "greedy")
    stopped = (got == eos).any(1)
    assert stopped.any()
    for row in got[stopped]:
        at = int((row == eos).nonzero()[0])
        assert (row[at + 1:] == pad).all()  # finished rows are padded, as HF pads them


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.5}, {"num_beams": 5, "repetition_penalty": 1.3},
                                {"num_beams": 5, "num_return_sequences": 3}, {"num_beams": 5, "length_penalty": -1.0},
                                {"num_beams": 3, "length_penalty": 2.0, "min_new_tokens": 4}])
def test_penalties_and_returned_beams_equal_hf(synthetic_root, one_thread, kw):
    model = opt_model(1)
    llm, pad = model.opt_model, model.opt_tokenizer.pad_token_id
    embeds, mask = prefix(model, 4, prompt_sets(4)["padded prompts"], 1)
    ref, _ = both(llm, embeds, mask, eos_token_id=model.eos_token_id, pad_token_id=pad, max_new_tokens=10)
    for eos in (model.eos_token_id, int(ref[0, 2])):
        ref, got = both(llm, embeds, mask, eos_token_id=eos, pad_token_id=pad, max_new_tokens=10, **kw)
        assert_same(ref, got, f"{kw}, eos {eos}")


@pytest.mark.parametrize("beams", [1, 5])
def test_model_generate_and_predict_answers_lean_equal_hf(synthetic_root, one_thread, beams):
    """The model path: captions and VQA answers with ``decode_impl: lean`` equal ``decode_impl: hf``."""
    model = opt_model(2)
    samples = {"image": images(16, 3), "prompt": prompt_sets(16)["padded prompts"]}
    vqa = {"image": images(16, 3), "text_input": [f"what is left of the {c}?" for c in ["red", "blue"] * 8]}

    def run(impl):
        model.decode_impl = impl
        captions = model.generate(samples, num_beams=beams, max_length=12, min_length=1,
                                  num_captions=2 if beams > 1 else 1)
        answers = model.predict_answers(vqa, num_beams=beams, max_len=6, min_len=1, prompt="Question: {} Answer:")
        return captions, answers

    assert run("lean") == run("hf")


def test_fallbacks_to_hf_generate(synthetic_root):
    model = opt_model()
    llm = model.opt_model
    ok = {"eos_token_id": 5, "pad_token_id": 1, "max_new_tokens": 4}
    assert decode.lean_unsupported(llm, ok) is None
    assert decode.lean_unsupported(llm, {**ok, "do_sample": True}) == "sampling"
    assert "synced_gpus" in decode.lean_unsupported(llm, {**ok, "synced_gpus": True})
    assert "num_return_sequences" in decode.lean_unsupported(llm, {**ok, "num_return_sequences": 2})
    assert "eos_token_id" in decode.lean_unsupported(llm, {**ok, "eos_token_id": [5, 6]})
    llm.generation_config.no_repeat_ngram_size = 2
    assert "no_repeat_ngram_size" in decode.lean_unsupported(llm, ok)
    llm.generation_config.no_repeat_ngram_size = 0
    llm.train()
    assert "training" in decode.lean_unsupported(llm, ok)
    llm.eval()
    t5 = tiny_model("blip2_t5_ext").eval()
    assert "OPTForCausalLM" in decode.lean_unsupported(t5.t5_model, ok)  # Flan-T5 keeps HF generate
    # sampling through the model still works (HF's loop)
    torch.manual_seed(0)
    assert len(model.generate({"image": images(2)}, use_nucleus_sampling=True, max_length=5)) == 2


def test_decode_impl_config_key(synthetic_root):
    from tiny_models import tiny_config

    from lavis.common.registry import registry

    cls = registry.get_model_class("blip2_opt_ext")
    assert cls.from_config(tiny_config("blip2_opt_ext")).decode_impl == "lean"
    assert cls.from_config(tiny_config("blip2_opt_ext", decode_impl="hf")).decode_impl == "hf"
    with pytest.raises(ValueError, match="decode_impl 'fast'.*lean, hf"):
        cls.from_config(tiny_config("blip2_opt_ext", decode_impl="fast"))


def test_prompt_cache_equals_the_tokenizer(synthetic_root):
    model = opt_model()
    tok = model.opt_tokenizer
    prompts = ["a photo of", "", "a red square left of a blue circle", "a photo of", "two"]
    for side in ("left", "right"):
        for _ in range(2):  # the second time from the cache
            ids, mask = model.prompt_tokens(tok, prompts, side)
            ref = tok(prompts, return_tensors="pt", padding="longest", padding_side=side)
            assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    assert tok.padding_side == "right"  # never rewritten (shared by serving threads)
    copy.deepcopy(model)  # nothing unpicklable kept on the model


def test_concurrent_generate_calls_equal_serial_ones(synthetic_root):
    """Serving runs generate from worker threads: no shared mutable state in the loop or the prompt cache."""
    model = opt_model()
    jobs = [({"image": images(2, seed), "prompt": [f"a photo of{' a red' * seed}"] * 2}, 1 + 4 * (seed % 2))
            for seed in range(6)]
    with torch.no_grad():
        serial = [model.generate(s, num_beams=b, max_length=8) for s, b in jobs]
    generation._PROMPT_IDS.pop(model.opt_tokenizer, None)  # the threads fill the prompt cache themselves
    results = [None] * len(jobs)

    def work(i):
        with torch.no_grad():
            results[i] = model.generate(jobs[i][0], num_beams=jobs[i][1], max_length=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial
