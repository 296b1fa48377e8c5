"""GPU training-step and caption-generation throughput of real-size BLIP-2, ours against Hugging Face (+ peft).

Run by ``bench/gpu.sh`` on a CUDA machine (no weights and no network needed: random init at the real sizes).
Cases (bf16 autocast, batch 16, 224 px, 32 queries, captions of the synthetic dataset tokenised by its tokenizers):

- ``opt_lora``: BLIP-2 OPT-2.7B, ViT frozen, Q-Former trained, LoRA r=16 on OPT q/k/v/out (``caption_coco_ft_lora``).
- ``opt_qformer``: BLIP-2 OPT-2.7B, only the Q-Former (+ queries, projection) trained.
- ``t5_qformer``: BLIP-2 Flan-T5-XL, only the Q-Former (+ queries, projection) trained.

Ours: the project's recipe (``projects/blip2/...``) built through ``lavis_ext.models.meta.build_on_meta`` (real
construction path, offline hub facts), materialised on the GPU with random weights, trained by our training loop
(``lavis_ext.runners.loop.TrainLoop``) with the run's autocast set explicitly (``run.amp: true``, ``run.amp_dtype:
bf16``: the precision module decides per block, not LAVIS's ``maybe_autocast``) and the runner's AdamW
(``build_optimizer``). Peer: ``transformers.Blip2ForConditionalGeneration`` holding a copy of the *same* weights
(our state dict through ``lavis_ext.interop.hf_bridge.to_hf_state``, the tested key table), peft LoRA adapters
with the same config and a copy of ours' adapter weights, trained by the plain loop an HF user writes
(``torch.autocast`` bf16, backward, ``torch.optim.AdamW`` step). Both sides: frozen weights in bf16, trainable
weights in fp32, the same batch (the prompt scored by neither), the same autocast dtype.

Checks before timing: the first-batch loss of both sides in eval mode (no dropout) must agree within bf16
tolerance (2e-2 relative on a GPU, 1e-4 in fp32 on a CPU), else the row says DIFFERENT. Generation: the decoded
captions of both sides are compared and the count of equal ones reported (random weights in bf16: beams can tie).

Timing: ``--warmup`` untimed calls per side first (the first call, which includes ``torch.compile`` with
``--compile``, is timed and reported in its own row), then the sides alternate run by run (bench/common.alternate),
each call timed by CUDA events (``torch.cuda.Event``; wall clock on a CPU). Per case: samples/s (median of runs of
``--steps`` steps), model FLOP utilisation (FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode``
/ step time / the GPU's dense bf16 peak) and peak memory per side: the peak of ``torch.cuda.max_memory_allocated``
during one step above what was allocated before it, plus that side's own resident weights and optimizer state (both
models share the GPU, so a raw peak would count the other's weights). Generation: captions/s at batch 1 and 16,
beam 5, exactly 30 new tokens (min = max, so both do the same work), ours ``model.generate`` against HF
``generate``, both under ``torch.autocast`` bf16.

``--size tiny --device cpu`` runs the same code on the tiny models in fp32 (a smoke test; no figures to publish).
Usage: python bench/gpu_step.py [--size real|tiny] [--device cuda] [--cases opt_lora,opt_qformer,t5_qformer]
       [--steps 5] [--runs 5] [--warmup 2] [--compile] [--nonfinite-check step|deferred] [--json bench/results/gpu.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, alternate, print_rows, row, setup_paths, stat, write_json  # noqa: E402

CASES = {
    "opt_lora": ("projects/blip2/opt2.7b/caption_coco_ft_lora.yaml", "blip2_opt_ext", True),
    "opt_qformer": ("projects/blip2/opt2.7b/caption_coco_ft.yaml", "blip2_opt_ext", False),
    "t5_qformer": ("projects/blip2/flant5xl/caption_coco_ft.yaml", "blip2_t5_ext", False),
}
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other GPUs report no MFU rather than a guess.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
CAPTIONS = ["a red circle left of a blue square", "two shapes: a green cross and a yellow triangle",
            "the blue square is above the red circle", "there is a small green triangle"]
TINY_LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build_ours(case: str, size: str, device, tokenizers: Path):
    """(our model for ``case``, its LoRA spec or None): the real recipe on meta then random weights on ``device``,
    or the tiny model."""
    import torch
    import transformers

    cfg_path, arch, lora = CASES[case]
    if size == "tiny":
        from tiny_models import tiny_model

        overrides = {"freeze_vit": True, "freeze_llm": True}
        if lora:
            overrides["lora_llm"] = TINY_LORA
        return tiny_model(arch, seed=0, **overrides).to(device), (TINY_LORA if lora else None)
    from lavis_ext.models import meta

    options = ["model.image_size=224", "model.freeze_vit=true", "model.vit_precision=fp16", "model.use_grad_checkpoint=false"]
    model_cfg = meta.load_project(REPO / cfg_path, options).model_cfg
    spec = model_cfg.get("lora_llm")
    model = meta.build_on_meta(model_cfg)
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
        from lavis_ext.models.tokenizers import load_opt_tokenizer

        model.opt_tokenizer = load_opt_tokenizer(str(tokenizers / "opt"))
        model.prompt_length = model.opt_tokenizer(model.prompt, return_tensors="pt").attention_mask.sum(1)
        model.eos_token_id = model.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
    else:
        model.t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(str(tokenizers / "t5"))
    return model, (dict(spec) if spec else None) if lora else None


def build_peer(ours, lora_spec, device):
    """HF ``Blip2ForConditionalGeneration`` with a copy of ours' weights (the bridge's key table), and peft LoRA
    with ours' config and adapter weights. The image placeholder token is the LLM vocabulary's last row (a spare
    row in the real OPT and Flan-T5 vocabularies; :func:`peer_batch` refuses text that uses it)."""
    import torch
    import transformers

    from lavis_ext.interop import hf_bridge
    from lavis_ext.models import strategies

    kind = hf_bridge.llm_kind(ours)
    config = hf_bridge.hf_config_for(ours)
    config.image_token_index = config.text_config.vocab_size - 1
    state, adapters = {}, {}
    for key, value in ours.state_dict().items():
        if ".lora_" in key:
            adapters[key] = value
        else:
            state[key.replace(".base_layer.", ".")] = value  # peft's wrapped layer: the base weight
    with torch.device(device):
        peer = transformers.Blip2ForConditionalGeneration(config)
    missing, unexpected = peer.load_state_dict(hf_bridge.to_hf_state(state, kind), strict=False)
    missing = [k for k in missing if k not in hf_bridge._tied_names(peer)]
    if missing or unexpected:
        raise RuntimeError(f"peer weights: unset {missing[:5]}, unused {unexpected[:5]}")
    for p in peer.parameters():
        p.requires_grad = False
    for module in (peer.qformer, peer.language_projection):
        for p in module.parameters():
            p.requires_grad = True
    peer.query_tokens.requires_grad = True
    if lora_spec is not None:
        import peft

        peft.inject_adapter_in_model(strategies.lora_config(lora_spec, kind), peer.language_model)
        llm_prefix = f"{kind}_model."
        peer_state = peer.state_dict()
        copied = {"language_model." + k[len(llm_prefix):]: v for k, v in adapters.items() if k.startswith(llm_prefix)}
        if len(copied) != len(adapters) or any(k not in peer_state for k in copied):
            raise RuntimeError(f"LoRA adapters do not line up: ours {len(adapters)}, copied {len(copied)}")
        peer.load_state_dict(copied, strict=False)
    return peer.to(device)


def mixed_precision(model, dtype):
    """Frozen weights in ``dtype``, trainable ones in fp32 (the same rule on both sides)."""
    import torch

    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    return model


def our_batch(ours, arch, batch, size, device, g):
    """Images and captions; OPT captions start with the model's prompt, as LAVIS's caption datasets write them."""
    import torch

    side = 224 if size == "real" else 64
    prompt = ours.prompt if arch == "blip2_opt_ext" else ""
    sample = {"image": torch.randn(batch, 3, side, side, generator=g).to(device),
              "text_input": [prompt + CAPTIONS[j % len(CAPTIONS)] for j in range(batch)]}
    if arch == "blip2_t5_ext":
        sample["text_output"] = sample["text_input"]
        sample["text_input"] = ["Question: what is in the picture? Short answer:"] * batch
    return sample


def peer_batch(peer, ours, arch, sample):
    """The same images and text for HF: ``num_query_tokens`` image placeholders, then (OPT) the caption and "\n"
    tokenised as ours tokenises it, scored after the prompt's tokens as ours scores it; or (T5) the question,
    with labels = the answer."""
    import torch

    n = peer.config.num_query_tokens
    image_id = peer.config.image_token_index
    device = sample["image"].device
    if arch == "blip2_opt_ext":
        tok = ours.opt_tokenizer
        enc = tok([t + "\n" for t in sample["text_input"]], return_tensors="pt", padding="longest", padding_side="right",
                  truncation=True, max_length=ours.max_txt_len)
        if (enc.input_ids == image_id).any():
            raise SystemExit(f"token id {image_id} (the image placeholder) occurs in the text; use other captions")
        rows = len(enc.input_ids)
        input_ids = torch.cat([torch.full((rows, n), image_id), enc.input_ids], 1).to(device)
        mask = torch.cat([torch.ones(rows, n, dtype=torch.long), enc.attention_mask], 1).to(device)
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, : n + int(ours.prompt_length) if ours.prompt else n] = -100
        return {"pixel_values": sample["image"], "input_ids": input_ids, "attention_mask": mask, "labels": labels}
    tok = ours.t5_tokenizer
    enc = tok(sample["text_input"], padding="longest", return_tensors="pt")
    if (enc.input_ids == image_id).any():
        raise SystemExit(f"token id {image_id} (the image placeholder) occurs in the text; use other questions")
    input_ids = torch.cat([torch.full((len(enc.input_ids), n), image_id), enc.input_ids], 1).to(device)
    mask = torch.cat([torch.ones(len(enc.input_ids), n, dtype=torch.long), enc.attention_mask], 1).to(device)
    labels = tok(sample["text_output"], padding="longest", return_tensors="pt").input_ids
    labels = labels.masked_fill(labels == tok.pad_token_id, -100).to(device)
    return {"pixel_values": sample["image"], "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def amp_enabled(device) -> bool:
    return device.type == "cuda"


def ours_runner(model, sample, steps, device, nonfinite_check=None):
    """(one call = ``steps`` steps of our task loop, its optimizer). The run's autocast is set explicitly
    (bf16 on a GPU, off on a CPU), the same dtype as the peer's; ``nonfinite_check``: ``run.nonfinite_check``
    (None: the loop's default, ``deferred`` on a GPU)."""
    from lavis.common.optims import LinearWarmupCosineLRScheduler
    from omegaconf import OmegaConf

    from lavis_ext.runners.loop import TrainLoop
    from lavis_ext.runners.runner_base import build_optimizer
    from lavis_ext.tasks.captioning import CaptionTaskExt

    task = CaptionTaskExt(num_beams=1, max_len=20, min_len=1, evaluate=False)
    loop = TrainLoop({"amp": amp_enabled(device), "amp_dtype": "bf16", "nonfinite_check": nonfinite_check})
    optimizer = build_optimizer(model, OmegaConf.create({"init_lr": 1e-5, "weight_decay": 0.05}))
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=100, min_lr=0, init_lr=1e-5)
    epoch = [0]

    def run():
        loop.run_epoch(task, epoch[0], steps, model, iter([sample] * steps), optimizer, scheduler, log_freq=10**6)
        epoch[0] += 1
    return run, optimizer


def peer_runner(model, inputs, steps, device):
    """(one call = ``steps`` steps of the plain HF loop, its optimizer): autocast bf16 on a GPU, off on a CPU."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)

    def run():
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device)):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run, optimizer


def eval_losses(ours, peer, sample, inputs, device) -> tuple[float, float]:
    """Both sides' loss on the batch in eval mode (no dropout), under the same autocast."""
    import torch

    ours.eval(), peer.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device)):
        a = float(ours(dict(sample))["loss"])
        b = float(peer(**inputs).loss)
    ours.train(), peer.train()
    return a, b


def step_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def call_timer(device):
    """Seconds of one call: CUDA events around it on a GPU (the queued work, not the launch), wall clock on a CPU."""
    import torch

    if device.type != "cuda":
        def wall(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return wall

    def events(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    return events


def timed_sides(fns: dict, runs: int, warmup: int, device) -> tuple[dict, dict]:
    """(first-call seconds, timed-run seconds) per side: each side's first call timed alone (it includes
    compilation with --compile), ``warmup - 1`` more untimed calls, then the sides alternate run by run."""
    measure = call_timer(device)
    first = {name: measure(fn) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(max(warmup - 1, 0)):
            fn()
    sync(device)
    return first, alternate({name: (lambda fn=fn: measure(fn)) for name, fn in fns.items()}, runs)


def resident_bytes(model, optimizer) -> int:
    """Bytes a side keeps between steps: its parameters and buffers (shared storages once) and optimizer state."""
    import torch

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers(),
               *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def peak_memory(fn, device, model, optimizer) -> float | None:
    """GiB a side would peak at alone: the step's peak above what was allocated before it (both sides' weights
    and optimizer states), plus this side's resident weights and optimizer state."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before + resident_bytes(model, optimizer)) / 2**30


def gpu_peak(device) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def same_loss(a: float, b: float, device) -> bool:
    """Equal within the precision's tolerance: bf16 autocast on a GPU (8-bit mantissa), fp32 on a CPU."""
    return abs(a - b) <= (2e-2 if amp_enabled(device) else 1e-4) * max(1.0, abs(b))


def decode_peer(peer_out, ours, arch) -> list[str]:
    """HF generate's ids as caption strings (OPT: HF returns the image tokens and the prompt first; cut them)."""
    tok = ours.opt_tokenizer if arch == "blip2_opt_ext" else ours.t5_tokenizer
    ids = peer_out
    if arch == "blip2_opt_ext" and ids.shape[1] > 30:
        ids = ids[:, -30:]  # exactly 30 new tokens (min = max)
    return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side first (the first is reported apart)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="compile both: ours as run.compile does (vision encoder, Q-Former, LLM in place), the peer "
                             "with torch.compile(model) (compile time: the first-call row)")
    parser.add_argument("--nonfinite-check", choices=["step", "deferred"], default=None,
                        help="ours' run.nonfinite_check (default: the loop's, deferred on a GPU); the A/B of that lever "
                             "is a run with --nonfinite-check step against one without")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--tokenizers", default=str(REPO / "data/synthetic/tokenizers"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--runs {args.runs} --steps {args.steps} --warmup {args.warmup}: each must be at least 1")
    setup_paths()
    logging.disable(logging.WARNING)
    import torch

    import lavis_ext
    lavis_ext.register()
    from lavis_ext.runners.compile import compile_towers

    device = torch.device(args.device)
    gpu, peak = gpu_peak(device)
    dtype = torch.bfloat16 if amp_enabled(device) else torch.float32
    rows = []
    g = torch.Generator().manual_seed(0)
    for case in args.cases.split(","):
        case_start = len(rows)
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}")
        _, arch, lora = CASES[case]
        ours, lora_spec = build_ours(case, args.size, device, Path(args.tokenizers))
        peer = build_peer(ours, lora_spec, device)  # a copy of ours' weights, before any step
        ours, peer = mixed_precision(ours.train(), dtype), mixed_precision(peer.train(), dtype)
        sample = our_batch(ours, arch, args.batch, args.size, device, g)
        inputs = peer_batch(peer, ours, arch, sample)
        loss_ours, loss_peer = eval_losses(ours, peer, sample, inputs, device)
        if not args.no_generation and case != "opt_lora":
            ours.eval(), peer.eval()  # generation first: the weights are still the same copies
            prompt = "a photo of" if arch == "blip2_opt_ext" else "Question: what is in the picture? Short answer:"
            for bsz in (1, 16):
                img = sample["image"][:1].expand(bsz, -1, -1, -1).contiguous()
                pin = peer_batch(peer, ours, arch, {**sample, "image": img, "text_input": [prompt] * bsz,
                                                    "text_output": ["x"] * bsz})
                if arch == "blip2_opt_ext":  # the prompt alone, no "\n"
                    width = peer.config.num_query_tokens + len(ours.opt_tokenizer(prompt).input_ids)
                    pin["input_ids"], pin["attention_mask"] = pin["input_ids"][:, :width], pin["attention_mask"][:, :width]
                pin.pop("labels")
                extra = {"eos_token_id": ours.eos_token_id} if arch == "blip2_opt_ext" else {}
                outputs = {}

                def gen_ours():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device)):
                        outputs["ours"] = ours.generate({"image": img, "prompt": prompt}, num_beams=5, max_length=30,
                                                        min_length=30)

                def gen_peer():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device)):
                        outputs["peer"] = peer.generate(**pin, num_beams=5, max_new_tokens=30, min_new_tokens=30, **extra)
                _, t_gen = timed_sides({"ours": gen_ours, "peer": gen_peer}, args.runs, args.warmup, device)
                peer_captions = decode_peer(outputs["peer"], ours, arch)
                same = sum(a == b for a, b in zip(outputs["ours"], peer_captions))
                rows.append(row(f"GPU caption generation, {case.split('_')[0].upper()} {args.size}, beam 5, 30 new tokens, batch {bsz}: captions/s",
                                "captions/s", stat("lavis_ext generate", [bsz / t for t in t_gen["ours"]]),
                                stat("HF Blip2ForConditionalGeneration.generate", [bsz / t for t in t_gen["peer"]]), target=1.0,
                                note=f"same weights; same captions {same}/{bsz} (random weights"
                                     f"{' in bf16' if amp_enabled(device) else ''}: beams can tie); min = max new tokens, "
                                     f"so both do the same work; {args.runs} runs per side, alternating"))
            ours.train(), peer.train()
        if args.compile:  # ours as run.compile does it (the towers, in place); the peer as a HF user would
            compile_towers(ours, True)
        peer_model = torch.compile(peer) if args.compile else peer
        run_ours, opt_ours = ours_runner(ours, sample, args.steps, device, args.nonfinite_check)
        run_peer, opt_peer = peer_runner(peer_model, inputs, args.steps, device)
        first, times = timed_sides({"ours": run_ours, "peer": run_peer}, args.runs, args.warmup, device)
        # FLOPs of one step each (eager, a throw-away optimizer), then each side's peak memory over one timed call
        with torch.compiler.set_stance("force_eager"):  # ours' towers are compiled in place with --compile
            f_ours = step_flops(lambda: ours_runner(ours, sample, 1, device)[0]())
        f_peer = step_flops(lambda: peer_runner(peer, inputs, 1, device)[0]())
        m_ours, m_peer = peak_memory(run_ours, device, ours, opt_ours), peak_memory(run_peer, device, peer, opt_peer)
        trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        peer_trainable = sum(p.numel() for p in peer.parameters() if p.requires_grad)
        rate_o = [args.batch * args.steps / t for t in times["ours"]]
        rate_p = [args.batch * args.steps / t for t in times["peer"]]
        mfu = lambda f, r: f"{f * (stat('', r)['median'] / args.batch) / peak:.1%}" if peak else "n/a"
        loss_note = (f"same weights, eval loss ours {loss_ours:.4f} vs HF {loss_peer:.4f}"
                     + ("" if same_loss(loss_ours, loss_peer, device) else " (DIFFERENT beyond the precision's tolerance)"))
        note = (f"{loss_note}; trainable {trainable / 1e6:.1f} M ours / {peer_trainable / 1e6:.1f} M HF; step FLOPs "
                f"{f_ours / 1e12:.2f} T ours / {f_peer / 1e12:.2f} T HF; MFU {mfu(f_ours, rate_o)} ours / "
                f"{mfu(f_peer, rate_p)} HF; {args.runs} runs per side, alternating, after {args.warmup} warm-up call(s)")
        what = f"GPU {case}, {'real size' if args.size == 'real' else 'tiny'}, {'bf16' if amp_enabled(device) else 'fp32'}, batch {args.batch}"
        peer_label = "HF Blip2ForConditionalGeneration" + (" + peft LoRA" if lora else "")
        rows.append(row(f"{what}: training samples/s", "samples/s", stat("lavis_ext", rate_o), stat(peer_label, rate_p),
                        target=1.0, note=note))
        rows.append(row(f"{what}: first call ({args.steps} steps{', incl. torch.compile' if args.compile else ''})", "s",
                        stat("lavis_ext", [first["ours"]]), stat(peer_label, [first["peer"]]), higher_is_better=False,
                        note="one call per side, before the timed runs; not part of the samples/s"))
        if m_ours is not None:
            rows.append(row(f"{what}: peak memory", "GiB", stat("lavis_ext", [m_ours]), stat("HF", [m_peer]),
                            higher_is_better=False, note="peak over a step above what was allocated before it, plus "
                            "the side's own weights and optimizer state (as if alone on the GPU)"))
        ours = peer = ours_model = peer_model = opt_ours = opt_peer = run_ours = run_peer = None  # free the GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print_rows(rows[case_start:])
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
