"""GPU training-step and caption-generation throughput of real-size BLIP-2, ours against Hugging Face (+ peft).

Run by ``bench/gpu.sh`` on a CUDA machine (no weights and no network needed: random init at the real sizes).
Cases (bf16 autocast, batch 16, 224 px, 32 queries, captions of the synthetic dataset tokenised by its tokenizers):

- ``opt_lora``: BLIP-2 OPT-2.7B, ViT frozen, Q-Former trained, LoRA r=16 on OPT q/k/v/out (``caption_coco_ft_lora``).
- ``opt_qformer``: BLIP-2 OPT-2.7B, only the Q-Former (+ queries, projection) trained.
- ``t5_qformer``: BLIP-2 Flan-T5-XL, only the Q-Former (+ queries, projection) trained.

Ours: the project's recipe (``projects/blip2/...``) built through ``lavis_ext.models.meta.build_on_meta`` (real
construction path, offline hub facts), materialised on the GPU with random weights, trained by our task loop
(``TaskExtMixin._train_inner_loop``, ``run.amp_dtype: bf16``; LAVIS's forward keeps its own fp16 autocast for the
ViT and OPT, as in a real run). Peer: ``transformers.Blip2ForConditionalGeneration`` built from a ``Blip2Config``
with exactly our dimensions (vision = our ViT, Q-Former = ours, text = our LLM config), random init, peft
``LoraConfig`` on the same OPT projections, trained by the plain loop an HF user writes (autocast bf16, backward,
AdamW step). Both sides: frozen weights in bf16, trainable weights in fp32, AdamW, same batch.

Per case: samples/s (median of runs of ``--steps`` steps, CUDA-synchronised), model FLOP utilisation (FLOPs of one
step counted by ``torch.utils.flop_counter.FlopCounterMode`` / step time / the GPU's dense bf16 peak) and peak
memory (``torch.cuda.max_memory_allocated``). Generation: captions/s at batch 1 and 16, beam 5, exactly 30 new
tokens (min = max, so random weights do the same work on both sides), ours ``model.generate`` against HF ``generate``.

``--size tiny --device cpu`` runs the same code on the tiny models (a smoke test; no figures to publish).
Usage: python bench/gpu_step.py [--size real|tiny] [--device cuda] [--cases opt_lora,opt_qformer,t5_qformer]
       [--steps 5] [--runs 3] [--json bench/results/gpu.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_rows, row, setup_paths, stat, write_json  # noqa: E402

CASES = {
    "opt_lora": ("projects/blip2/opt2.7b/caption_coco_ft_lora.yaml", "blip2_opt_ext", True),
    "opt_qformer": ("projects/blip2/opt2.7b/caption_coco_ft.yaml", "blip2_opt_ext", False),
    "t5_qformer": ("projects/blip2/flant5xl/caption_coco_ft.yaml", "blip2_t5_ext", False),
}
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other GPUs report no MFU rather than a guess.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
CAPTIONS = ["a red circle left of a blue square", "two shapes: a green cross and a yellow triangle",
            "the blue square is above the red circle", "there is a small green triangle"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build_ours(case: str, size: str, device, tokenizers: Path):
    """Our model for ``case``: the real recipe on meta then random weights on ``device``, or the tiny model."""
    import torch
    import transformers

    cfg_path, arch, lora = CASES[case]
    if size == "tiny":
        from tiny_models import tiny_model

        overrides = {"freeze_vit": True, "freeze_llm": True}
        if lora:
            overrides["lora_llm"] = {"r": 16, "alpha": 32, "dropout": 0.05}
        return tiny_model(arch, seed=0, **overrides).to(device)
    from lavis_ext.models import meta

    options = ["model.image_size=224", "model.freeze_vit=true", "model.vit_precision=fp16", "model.use_grad_checkpoint=false"]
    model = meta.build_on_meta(meta.load_project(REPO / cfg_path, options).model_cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)  # norm scales
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if not name.endswith("position_ids"):
                raise RuntimeError(f"buffer {name} has no known initial value after to_empty")
            b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
    # MetaTokenizer stand-ins cannot tokenise text: the synthetic tokenizers do (ids fit the real vocabularies).
    model.tokenizer = transformers.BertTokenizer.from_pretrained(str(tokenizers / "bert"))
    if arch == "blip2_opt_ext":
        model.opt_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizers / "opt"), use_fast=False)
        model.prompt_length = model.opt_tokenizer(model.prompt, return_tensors="pt").attention_mask.sum(1)
        model.eos_token_id = model.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
    else:
        model.t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(str(tokenizers / "t5"))
    return model


def build_peer(ours, arch: str, lora: bool, device):
    """HF Blip2ForConditionalGeneration with our dimensions (random init), peft LoRA on the same projections."""
    import torch
    import transformers

    vit = ours.visual_encoder
    block = vit.blocks[0]
    qf = ours.Qformer.config
    llm = ours.opt_model if arch == "blip2_opt_ext" else ours.t5_model
    text_config = copy.deepcopy(llm.config)
    config = transformers.Blip2Config(
        vision_config={"hidden_size": vit.embed_dim, "intermediate_size": block.mlp.fc1.out_features,
                       "num_hidden_layers": len(vit.blocks), "num_attention_heads": block.attn.num_heads,
                       "image_size": vit.patch_embed.img_size[0], "patch_size": vit.patch_embed.patch_size[0],
                       "qkv_bias": True, "layer_norm_eps": 1e-6},
        qformer_config={"hidden_size": qf.hidden_size, "num_hidden_layers": qf.num_hidden_layers,
                        "num_attention_heads": qf.num_attention_heads, "intermediate_size": qf.intermediate_size,
                        "cross_attention_frequency": qf.cross_attention_freq, "encoder_hidden_size": vit.embed_dim,
                        "vocab_size": qf.vocab_size},
        text_config=text_config.to_dict(),
        num_query_tokens=ours.query_tokens.shape[1],
    )
    config.image_token_id = config.text_config.vocab_size - 1
    with torch.device(device):
        peer = transformers.Blip2ForConditionalGeneration(config)
    for p in peer.parameters():
        p.requires_grad = False
    for module in (peer.qformer, peer.language_projection):
        for p in module.parameters():
            p.requires_grad = True
    peer.query_tokens.requires_grad = True
    if lora:
        import peft

        lora_cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS)
        peft.inject_adapter_in_model(lora_cfg, peer.language_model)
    return peer


def mixed_precision(model, dtype):
    """Frozen weights in ``dtype``, trainable ones in fp32 (the same rule on both sides)."""
    import torch

    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    return model


def our_batch(arch, batch, size, device, g):
    import torch

    side = 224 if size == "real" else 64
    sample = {"image": torch.randn(batch, 3, side, side, generator=g).to(device),
              "text_input": [CAPTIONS[j % len(CAPTIONS)] for j in range(batch)]}
    if arch == "blip2_t5_ext":
        sample["text_output"] = sample["text_input"]
        sample["text_input"] = ["Question: what is in the picture? Short answer:"] * batch
    return sample


def peer_batch(peer, ours, arch, sample):
    """The same images and text for HF: image placeholder tokens, then the prompt and caption (OPT), or the
    question with labels = the caption (T5)."""
    import torch

    n = peer.config.num_query_tokens
    image_ids = [peer.config.image_token_id] * n
    device = sample["image"].device
    if arch == "blip2_opt_ext":
        texts = [ours.prompt + " " + t for t in sample["text_input"]]
        ids = ours.opt_tokenizer(texts, padding="longest", truncation=True, max_length=ours.max_txt_len).input_ids
        width = max(len(r) for r in ids)
        pad = ours.opt_tokenizer.pad_token_id
        input_ids = torch.tensor([image_ids + r + [pad] * (width - len(r)) for r in ids], device=device)
        mask = torch.tensor([[1] * (n + len(r)) + [0] * (width - len(r)) for r in ids], device=device)
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, :n] = -100
        return {"pixel_values": sample["image"], "input_ids": input_ids, "attention_mask": mask, "labels": labels}
    tok = ours.t5_tokenizer
    enc = tok(sample["text_input"], padding="longest", return_tensors="pt")
    input_ids = torch.cat([torch.full((len(enc.input_ids), n), peer.config.image_token_id), enc.input_ids], 1).to(device)
    mask = torch.cat([torch.ones(len(enc.input_ids), n, dtype=torch.long), enc.attention_mask], 1).to(device)
    labels = tok(sample["text_output"], padding="longest", return_tensors="pt").input_ids
    labels = labels.masked_fill(labels == tok.pad_token_id, -100).to(device)
    return {"pixel_values": sample["image"], "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def ours_runner(model, sample, steps, device):
    import torch
    from lavis.common.optims import LinearWarmupCosineLRScheduler

    from lavis_ext.tasks.base import TaskExtMixin
    from lavis_ext.tasks.captioning import CaptionTaskExt

    task = CaptionTaskExt(num_beams=1, max_len=20, min_len=1, evaluate=False)
    task.attach_run({"amp": device.type == "cuda", "amp_dtype": "bf16"}, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=100, min_lr=0, init_lr=1e-5)
    epoch = [0]

    def run():
        TaskExtMixin._train_inner_loop(task, epoch[0], steps, model, iter([sample] * steps), optimizer, scheduler,
                                       log_freq=10**6)
        epoch[0] += 1
    return run


def peer_runner(model, inputs, steps, device):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def step_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, runs, device, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def peak_memory(fn, device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def gpu_peak(device) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--tokenizers", default=str(REPO / "data/synthetic/tokenizers"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    setup_paths()
    logging.disable(logging.WARNING)
    import torch

    import lavis_ext  # noqa: F401

    device = torch.device(args.device)
    gpu, peak = gpu_peak(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    g = torch.Generator().manual_seed(0)
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}")
        _, arch, lora = CASES[case]
        ours = mixed_precision(build_ours(case, args.size, device, Path(args.tokenizers)).train(), dtype)
        sample = our_batch(arch, args.batch, args.size, device, g)
        run_ours = ours_runner(ours, sample, args.steps, device)
        one_ours = ours_runner(ours, sample, 1, device)
        t_ours = timed(run_ours, args.runs, device)
        f_ours, m_ours = step_flops(one_ours), peak_memory(one_ours, device)
        peer = mixed_precision(build_peer(ours, arch, lora, device).train(), dtype)
        inputs = peer_batch(peer, ours, arch, sample)
        run_peer = peer_runner(peer, inputs, args.steps, device)
        one_peer = peer_runner(peer, inputs, 1, device)
        t_peer = timed(run_peer, args.runs, device)
        f_peer, m_peer = step_flops(one_peer), peak_memory(one_peer, device)
        trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        peer_trainable = sum(p.numel() for p in peer.parameters() if p.requires_grad)
        rate_o = [args.batch * args.steps / t for t in t_ours]
        rate_p = [args.batch * args.steps / t for t in t_peer]
        mfu = lambda f, r: f"{f * (stat('', r)['median'] / args.batch) / peak:.1%}" if peak else "n/a"
        note = (f"trainable {trainable / 1e6:.1f} M ours / {peer_trainable / 1e6:.1f} M HF; step FLOPs "
                f"{f_ours / 1e12:.1f} T ours / {f_peer / 1e12:.1f} T HF; MFU {mfu(f_ours, rate_o)} ours / "
                f"{mfu(f_peer, rate_p)} HF")
        what = f"GPU {case}, {'real size' if args.size == 'real' else 'tiny'}, bf16, batch {args.batch}"
        rows.append(row(f"{what}: training samples/s", "samples/s", stat("lavis_ext", rate_o),
                        stat("HF Blip2ForConditionalGeneration" + (" + peft LoRA" if lora else ""), rate_p), target=1.0, note=note))
        if m_ours is not None:
            rows.append(row(f"{what}: peak memory", "GiB", stat("lavis_ext", [m_ours]), stat("HF", [m_peer]),
                            higher_is_better=False, note="torch.cuda.max_memory_allocated over one step"))
        if not args.no_generation and case != "opt_lora":
            ours.eval(), peer.eval()
            for bsz in (1, 16):
                img = sample["image"][:1].expand(bsz, -1, -1, -1).contiguous()
                prompt = "a photo of" if arch == "blip2_opt_ext" else "Question: what is in the picture? Short answer:"
                pin = peer_batch(peer, ours, arch, {**sample, "image": img, "text_input": [prompt] * bsz,
                                                    "text_output": ["x"] * bsz})
                if arch == "blip2_opt_ext":
                    pin["input_ids"] = pin["input_ids"][:, : peer.config.num_query_tokens + len(ours.opt_tokenizer(prompt).input_ids)]
                    pin["attention_mask"] = pin["attention_mask"][:, : pin["input_ids"].shape[1]]
                pin.pop("labels")

                def gen_ours():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        ours.generate({"image": img, "prompt": prompt}, num_beams=5, max_length=30, min_length=30)

                def gen_peer():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        peer.generate(**pin, num_beams=5, max_new_tokens=30, min_new_tokens=30)
                t_go, t_gp = timed(gen_ours, args.runs, device), timed(gen_peer, args.runs, device)
                rows.append(row(f"GPU caption generation, {case.split('_')[0].upper()} {args.size}, beam 5, 30 new tokens, batch {bsz}: captions/s",
                                "captions/s", stat("lavis_ext generate", [bsz / t for t in t_go]),
                                stat("HF Blip2ForConditionalGeneration.generate", [bsz / t for t in t_gp]), target=1.0,
                                note="random weights on each side; min = max new tokens, so both do the same work"))
        ours = peer = None  # free the GPU before the next case
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print_rows(rows[-4:])
    payload = write_json(None, "gpu_step", rows, argv)
    payload["command"] = "bench/gpu.sh"
    payload["machine"] = {"gpu": gpu, "date": dt.date.today().isoformat(), "torch": torch.__version__}
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
