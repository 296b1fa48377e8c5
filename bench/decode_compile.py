"""A lever measured and not adopted: the lean OPT decode's single-token step compiled with ``torch.compile``.

Issue 18 lists "a decode loop with a static KV cache and a compiled single-token step". The library's loop
(``lavis_ext.models.decode``) keeps a preallocated cache but hands SDPA the filled part, so every step has new
shapes, which ``torch.compile`` would recompile. This bench carries the prototype that makes the step's shapes
static, so that one compiled graph serves every step:

- the cache is the whole preallocated buffer: the step writes its keys and values with ``index_copy_`` at a position
  given as a tensor, and SDPA attends over all of it with an additive mask that is 0 on the prefix's tokens and the
  tokens written so far and the dtype's min elsewhere (the unwritten tail and left padding); the tail is zeroed
  first (weight 0 times uninitialised memory that happens to hold a NaN is a NaN);
- the same modules as the library's step (``decode._OPTStep`` / ``decode._Layer``: the same linear, layer-norm and
  activation calls), one ``torch.compile(fullgraph=True, dynamic=False)`` per batch shape;
- the prefix and the greedy loop around the step are the library's (``_greedy``'s logic, repeated here).

Sides, all on the same BLIP-2 OPT 256x4 model as ``bench/generation.py``, greedy, 30 new tokens, 1 thread,
interleaved: the library's eager lean loop (the peer), the static step uncompiled (what the static cache costs by
itself), compiled with inductor's defaults, and compiled with ``freezing`` + ``cpp_wrapper`` (weights folded in as
constants and prepacked for oneDNN/MKL; only valid while the weights do not change, so a training run that
evaluates every epoch would recompile each time). Compile time is timed apart (the first call). Token ids are
compared to the eager loop's: "same tokens" is the bit-exact check, not the captions alone.

Why not adopted (the rows give the figures): compiled, with or without freezing, the step is within a few per cent
of the eager loop at batch 16 and no faster at batch 1 (at batch 16 the step is its matmuls, which inductor leaves
to the same MKL calls; at batch 1 the compiled graph's call and guard cost is about the Python it removes), after
seconds of compilation per batch shape; and inductor's fused layer norms are bit-identical to transformers' only by
chance, where the library's loop gives HF's exact tokens by construction. The static-shape cache alone (eager)
is within noise of the library's slices too. On a GPU, where a decode step's cost is kernel launches, this step
with CUDA graphs is the lever to try first; ``bench/gpu.sh`` does not measure it yet.

Usage: python bench/decode_compile.py [--quick] [--runs N] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import add_common_args, interleaved_wall_cpu, require_data, resolve_runs, row, setup_paths, stat, write_json  # noqa: E402

MAX_NEW_TOKENS = 30
BATCHES = (1, 16)
# fx_graph_cache off: the compile time shown is a first compile, not a read of inductor's on-disk cache
COMPILE_OPTIONS = {"compiled": {"fx_graph_cache": False},
                   "compiled + freezing": {"fx_graph_cache": False, "freezing": True, "cpp_wrapper": True}}


def _static_layer(layer, hidden, mask, key_buf, value_buf, index):
    """``decode._Layer.__call__`` with the whole cache buffer and a mask instead of the filled slice."""
    bsz = hidden.shape[0]
    residual = hidden
    h = layer.ln1(hidden)
    query = (layer.q(h) * layer.scaling).view(bsz, -1, layer.heads, layer.head_dim).transpose(1, 2)
    key = layer.k(h).view(bsz, -1, layer.heads, layer.head_dim).transpose(1, 2)
    value = layer.v(h).view(bsz, -1, layer.heads, layer.head_dim).transpose(1, 2)
    key_buf.index_copy_(2, index, key)
    value_buf.index_copy_(2, index, value)
    out = F.scaled_dot_product_attention(query, key_buf, value_buf, attn_mask=mask, dropout_p=0.0, scale=1.0)
    hidden = residual + layer.o(out.transpose(1, 2).reshape(bsz, 1, -1))
    shape = hidden.shape
    hidden = hidden.reshape(-1, hidden.size(-1))
    return (hidden + layer.fc2(layer.act(layer.fc1(layer.ln2(hidden))))).view(shape)


def static_step(step_fn):
    """One decode step over fixed shapes: (tokens, positions, mask, cache buffers, write index) -> last logits."""
    def step(tokens, positions, mask, keys, values, index):
        hidden = step_fn.embed(tokens) + F.embedding(positions + step_fn.offset, step_fn.positions)
        for layer, key_buf, value_buf in zip(step_fn.layers, keys, values):
            hidden = _static_layer(layer, hidden, mask, key_buf, value_buf, index)
        if step_fn.final_ln is not None:
            hidden = step_fn.final_ln(hidden)
        if step_fn.project_out is not None:
            hidden = step_fn.project_out(hidden)
        return step_fn.lm_head(hidden)[:, -1]
    return step


def static_greedy(llm, step, embeds, mask, eos, pad, max_new, min_new):
    """The library's greedy loop (``decode._greedy``) around a static-shape step."""
    from lavis_ext.models import decode

    step_fn = decode._OPTStep(llm)
    rows, prefix = mask.shape
    dtype, total = embeds.dtype, prefix + max_new
    cache = decode.StaticKV(llm.config.num_hidden_layers, total)
    next_pos = mask.long().sum(1, keepdim=True)
    attend = torch.zeros(rows, 1, 1, total, dtype=dtype)
    attend[:, 0, 0, :prefix].masked_fill_(mask == 0, torch.finfo(dtype).min)
    attend[..., prefix:] = torch.finfo(dtype).min
    generated = torch.full((rows, max_new), pad, dtype=torch.long)
    unfinished = torch.ones(rows, dtype=torch.long)
    logits = step_fn(embeds, decode._positions(mask), decode._prefix_mask(mask, dtype), cache, last_only=True)[:, -1]
    for buffer in (*cache.keys, *cache.values):  # the unwritten tail is attended with weight 0: it must be finite
        buffer[:, :, prefix:].zero_()
    for i in range(max_new):
        tokens = torch.argmax(decode._process(logits.float(), generated, i, min_new, eos, None), dim=-1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        generated[:, i] = tokens
        unfinished = unfinished & (tokens != eos).long()
        if i + 1 >= max_new or unfinished.max() == 0:
            return generated[:, :i + 1]
        written = prefix + i
        attend[..., written] = 0
        logits = step(tokens[:, None], next_pos + i, attend, cache.keys, cache.values, torch.tensor([written]))
    return generated


def llm_call(model, pixel):
    """The (inputs_embeds, attention_mask, generate kwargs) that ``model.generate`` hands its LLM for greedy
    captioning of ``pixel`` (the image queries and the tokenised prompt, as the generation bench times them)."""
    seen = {}

    def record(llm, inputs_embeds, attention_mask, **kwargs):
        seen.update(embeds=inputs_embeds, mask=attention_mask, kwargs=kwargs)
        return type(model).llm_generate(model, llm, inputs_embeds, attention_mask, **kwargs)

    model.llm_generate = record
    try:
        model.generate({"image": pixel, "prompt": [model.prompt] * len(pixel)}, num_beams=1,
                       max_length=MAX_NEW_TOKENS, min_length=1)
    finally:
        del model.llm_generate
    return seen["embeds"], seen["mask"], seen["kwargs"]


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), runs=7, quick_runs=4)
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    torch.set_num_threads(1)
    setup_paths()
    require_data()
    from generation import build

    from lavis_ext.models import decode

    ours, _, _ = build()
    llm = ours.opt_model
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in BATCHES:
        pixel = torch.randn(batch, 3, 64, 64, generator=g)
        with torch.no_grad():
            embeds, mask, kwargs = llm_call(ours, pixel)
            eos, pad, min_new = kwargs["eos_token_id"], kwargs["pad_token_id"], kwargs["min_new_tokens"]
            eager = static_step(decode._OPTStep(llm))
            sides = {"lean": lambda: decode.opt_generate(llm, embeds, mask, **kwargs)}
            sides["eager"] = lambda: static_greedy(llm, eager, embeds, mask, eos, pad, MAX_NEW_TOKENS, min_new)
            compile_s = {}
            for name, options in COMPILE_OPTIONS.items():
                torch._dynamo.reset()  # each variant compiles from scratch (freezing folds the weights per graph)
                step = torch.compile(static_step(decode._OPTStep(llm)), fullgraph=True, dynamic=False, options=options)
                start = time.perf_counter()
                static_greedy(llm, step, embeds, mask, eos, pad, MAX_NEW_TOKENS, min_new)
                compile_s[name] = time.perf_counter() - start
                sides[name] = lambda step=step: static_greedy(llm, step, embeds, mask, eos, pad, MAX_NEW_TOKENS, min_new)
            reference = sides["lean"]()
            same = {name: torch.equal(fn(), reference) for name, fn in sides.items()}
            wall, cpu = interleaved_wall_cpu(sides, runs, warmup=0)
        peer = stat("lavis_ext lean decode (eager, cache slices)", [1e3 * t / batch for t in cpu["lean"]])
        for name in ("eager", *COMPILE_OPTIONS):
            label = f"lean decode, static-shape step, {name}"
            extra = f"; compilation (first call) {compile_s[name]:.1f} s" if name in compile_s else ""
            note = (f"same token ids as the eager loop: {same[name]}; greedy, {MAX_NEW_TOKENS} new tokens, {runs} runs "
                    f"per side, alternating, 1 thread{extra}")
            ours_cpu = stat(label, [1e3 * t / batch for t in cpu[name]])
            rows.append(row(f"decode step compiled (lever, not adopted), greedy, batch {batch}, BLIP-2 OPT 256x4: CPU "
                            "ms per caption", "CPU ms/caption", ours_cpu, peer, higher_is_better=False, note=note))
            print(f"batch {batch:2d} {name:20s} {ours_cpu['median']:7.2f} vs lean {peer['median']:7.2f} CPU ms/caption "
                  f"ratio {rows[-1]['ratio']:.3f}  same tokens {same[name]}{extra}", flush=True)
    write_json(args.json, "decode_compile", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
