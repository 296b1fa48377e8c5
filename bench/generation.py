"""Caption generation: our BLIP-2 OPT ``generate`` vs Hugging Face ``Blip2ForConditionalGeneration.generate``
with identical weights (converted by lavis_ext.interop.hf_bridge) and identical decoding.

Ours runs the lean OPT decode loop (``model.decode_impl: lean``, lavis_ext/models/decode.py: the prefix once per
image, a preallocated KV cache, the layers called without HF's per-step mask/cache/processor Python, batched beam
search); the peer runs transformers' ``generate``. The captions must be identical (the bench stops otherwise).
Each setting gives two rows: captions per wall second and CPU milliseconds per caption (this process's CPU time,
steadier than wall time on a shared machine).

The model is the tiny BLIP-2 OPT with its LLM widened to 256 x 4 layers (the ViT and Q-Former stay tiny),
random weights, CPU. Each setting times both sides alternately (same process, same threads) and checks
that they produce the same captions. Target (issue 18): >= 1.2x, met only when the min-max ranges separate. Both sides tokenise the prompts inside the timing (ours with the
model's tokenizer, the peer with the exported ``Blip2Processor``, which prepends the image tokens) and
decode the output ids.

Usage: python bench/generation.py [--quick] [--runs N] [--threads N] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import (add_common_args, interleaved_wall_cpu, require_data, resolve_runs, row, setup_paths,  # noqa: E402
                    stat, write_json)

WIDE_OPT = {"hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
            "word_embed_proj_dim": 256, "max_position_embeddings": 128, "dropout": 0.0}
SETTINGS = [  # (label, num_beams, batch)
    ("beam 5, batch 1", 5, 1),
    ("beam 5, batch 16", 5, 16),
    ("greedy, batch 1", 1, 1),
    ("greedy, batch 16", 1, 16),
]
MAX_NEW_TOKENS = 30
# Said on rows whose min-max ranges overlap (bench/common.verdict: "within noise").
NOISE_NOTE = "; the min-max ranges overlap on this shared machine: see the CPU-time row of the same setting"
# Profiled 2026-12-06 (torch.profiler + cProfile, 3 batches): why greedy at batch 16 stays near 1.2x.
GREEDY_16_WHY = ("; profile of ours at this setting: the model's matmuls (aten::addmm) are 61% of CPU, SDPA 9%, the "
                 "KV cache copies 12% (HF's cat copies as much; a strided-view cache was 4-5% slower at batch 16 in an "
                 "A/B), so the Python the lean loop removes is a small share of a batch-16 step")


def build(seed: int = 0):
    import lavis_ext
    lavis_ext.register()  # the compat shims must run before anything from LAVIS
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_ext.interop.hf_bridge import to_hf

    cls = registry.get_model_class("blip2_opt_ext")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, {"opt_config": WIDE_OPT})
    torch.manual_seed(seed)
    ours = cls.from_config(cfg).eval()
    ours.ln_vision.eps = ours.visual_encoder.blocks[0].norm1.eps  # one eps, so the two sides agree exactly
    hf_model, processor, _ = to_hf(ours)
    return ours, hf_model.eval(), processor



def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), runs=7, quick_runs=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    torch.set_num_threads(args.threads)

    setup_paths()
    require_data()
    ours, hf_model, processor = build()
    n_query, image_token = hf_model.config.num_query_tokens, hf_model.config.image_token_index
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, beams, batch in SETTINGS:
        pixel = torch.randn(batch, 3, 64, 64, generator=g)
        prompts = [ours.prompt] * batch

        def run_ours(pixel=pixel, beams=beams, prompts=prompts):
            return ours.generate({"image": pixel, "prompt": prompts}, num_beams=beams, max_length=MAX_NEW_TOKENS,
                                 min_length=1)

        def run_peer(pixel=pixel, beams=beams, prompts=prompts):
            # the text half of Blip2Processor: image tokens + tokenised prompt (both sides tokenise inside the timing)
            enc = processor.tokenizer(prompts, return_tensors="pt", padding="longest")
            input_ids = torch.cat([torch.full((len(prompts), n_query), image_token), enc.input_ids], 1)
            mask = torch.cat([torch.ones(len(prompts), n_query, dtype=torch.long), enc.attention_mask], 1)
            out = hf_model.generate(pixel_values=pixel, input_ids=input_ids, attention_mask=mask, num_beams=beams,
                                    max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=1)
            out = out[:, input_ids.shape[1]:]
            return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)], out.shape[1]

        with torch.no_grad():
            captions, (peer_captions, new_tokens) = run_ours(), run_peer()  # also the warm-up
            if captions != peer_captions:
                raise SystemExit(f"{label}: captions differ\n ours {captions}\n peer {peer_captions}")
            wall, cpu = interleaved_wall_cpu({"ours": run_ours, "peer": run_peer}, runs, warmup=0)
        what = (f"caption generation, {label}, max {MAX_NEW_TOKENS} new tokens (BLIP-2 OPT 256x4, CPU {args.threads} "
                "threads)")
        note = f"same captions: True ({batch}/{batch}); {new_tokens} new tokens; {runs} runs per side, alternating"
        o = stat("lavis_ext Blip2OPTExt.generate (lean decode)", [batch / t for t in wall["ours"]])
        p = stat("transformers Blip2ForConditionalGeneration.generate", [batch / t for t in wall["peer"]])
        r = row(what, "captions/s", o, p, target=1.2, note=note)
        r["note"] += NOISE_NOTE if r["verdict"] == "within noise" else ""
        if (beams, batch) == (1, 16):
            r["note"] += GREEDY_16_WHY
        oc = stat("lavis_ext Blip2OPTExt.generate (lean decode)", [1e3 * t / batch for t in cpu["ours"]])
        pc = stat("transformers Blip2ForConditionalGeneration.generate", [1e3 * t / batch for t in cpu["peer"]])
        rc = row(what + ", CPU time", "CPU ms/caption", oc, pc, higher_is_better=False, target=1.2, note=note)
        rows += [r, rc]
        print(f"{label:18s} ours {o['median']:8.2f}  peer {p['median']:8.2f} captions/s  ratio {r['ratio']:.3f} "
              f"({r['verdict']}); CPU ms/caption ours {oc['median']:.1f} peer {pc['median']:.1f} ratio "
              f"{rc['ratio']:.3f} ({rc['verdict']})  same=True", flush=True)
    write_json(args.json, "generation", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
