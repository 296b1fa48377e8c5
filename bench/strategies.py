"""Step time and peak memory of each training strategy, as ratios to full fine-tuning.

Every strategy lives in its own interpreter (peak RSS is per process) on the same model size, batch and seed:
all are built and warmed up first, then the parent asks them for one timed training step each (forward,
backward, AdamW) in turn, the order alternating step by step (bench/common.alternate), so load changes on a
shared machine hit every strategy alike; a child waits on its pipe, idle, while another steps. Memory is the
peak RSS of the process minus its RSS before the model was built, i.e. what the model, its gradients, optimizer
state and activations add. On a CUDA machine (``--device cuda``) it reports ``torch.cuda.max_memory_allocated``.

Usage: python bench/strategies.py [--quick] [--json OUT] [--size tiny|small] [--steps 20] [--batch 16] [--device cpu]
(--quick: 1 warm-up and 5 timed steps per strategy; each strategy's figure is the median of its steps.)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, alternate, print_rows, row, stat, write_json  # noqa: E402

STRATEGIES = {
    "full": {"freeze_vit": False, "freeze_llm": False},
    "vit_unfrozen": {"freeze_vit": False, "freeze_llm": True},
    "qformer_only": {"freeze_vit": True, "freeze_llm": True},
    "lora_llm": {"freeze_vit": True, "freeze_llm": True, "lora_llm": {"r": 8, "alpha": 16, "dropout": 0.05}},
    "lora_llm+grad_ckpt": {
        "freeze_vit": True, "freeze_llm": True, "lora_llm": {"r": 8, "alpha": 16, "dropout": 0.05},
        "use_grad_checkpoint": True, "qformer_grad_checkpoint": True, "llm_grad_checkpoint": True,
    },
}
# "small" widens every tower so that the strategies' differences stand out from the interpreter's own memory.
SIZES = {
    "tiny": {},
    "small": {
        "vit_config": {"patch_size": 8, "width": 256, "depth": 6, "heads": 8},
        "qformer_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1024},
        "opt_config": {"hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
                       "word_embed_proj_dim": 512},
    },
}

CHILD = r"""
import json, os, resource, statistics, sys, time
import torch
import lavis_ext

lavis_ext.register()
from lavis.common.registry import registry
from omegaconf import OmegaConf

args = json.loads(sys.argv[1])
torch.manual_seed(0)
device = torch.device(args["device"])
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss_mib()
cls = registry.get_model_class("blip2_opt_ext")
cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, args["size"], args["strategy"])
model = cls.from_config(cfg).to(device).train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
g = torch.Generator().manual_seed(0)
batch = {"image": torch.randn(args["batch"], 3, 64, 64, generator=g).to(device),
         "text_input": ["a photo of a red circle left of a blue square"] * args["batch"]}
def step():
    loss = model(batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for _ in range(args.get("warmup", 3)):
    step()
print("ready", flush=True)
for command in sys.stdin:  # "step": one timed step, its seconds back; "done": the memory figures, exit
    if command.strip() != "step":
        break
    if device.type == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); step()
    if device.type == "cuda": torch.cuda.synchronize()
    print(time.perf_counter() - t, flush=True)
if device.type == "cuda":
    memory = torch.cuda.max_memory_allocated() / 2**20
else:
    memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
print(json.dumps({"memory_mib": memory, "trainable": sum(p.numel() for p in params),
                  "total": sum(p.numel() for p in model.parameters())}), flush=True)
"""


class Child:
    """One strategy's interpreter, built and warmed up, stepping on request."""

    def __init__(self, strategy: dict, size: dict, batch: int, device: str, warmup: int):
        payload = json.dumps({"strategy": strategy, "size": size, "batch": batch, "device": device, "warmup": warmup})
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", CHILD, payload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._expect("ready")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(self.proc.stderr.read()[-3000:])
        return line.strip()

    def _expect(self, word: str) -> None:
        while (line := self._line()) != word:
            pass

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._line())

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        result = json.loads(self._line())
        self.proc.wait()
        return result


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per strategy (default 20, 5 with --quick)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 20)
    warmup = 1 if args.quick else 3
    children = {}
    try:
        for name, strategy in STRATEGIES.items():
            children[name] = Child(strategy, SIZES[args.size], args.batch, args.device, warmup)
        times = alternate({name: child.step for name, child in children.items()}, steps)
        results = {name: {**child.finish(), "times": times[name]} for name, child in children.items()}
    finally:
        for child in children.values():
            if child.proc.poll() is None:
                child.proc.kill()
    for r in results.values():
        r.update(step_s=stat("", r["times"])["median"], min_s=min(r["times"]), max_s=max(r["times"]))
    full = results["full"]
    unit = "peak RSS added" if args.device == "cpu" else "peak CUDA memory"
    print(f"| strategy | trainable / total | step (median, min-max) | x full | {unit} | x full |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['trainable']:,} / {r['total']:,} | {r['step_s'] * 1000:.0f} ms "
            f"({r['min_s'] * 1000:.0f}-{r['max_s'] * 1000:.0f}) | {r['step_s'] / full['step_s']:.2f} | "
            f"{r['memory_mib']:.0f} MiB | {r['memory_mib'] / full['memory_mib']:.2f} |"
        )
    size = f"BLIP-2 OPT {args.size}, batch {args.batch}, {args.device}"
    step = {n: {"label": n, "median": r["step_s"] * 1000, "min": r["min_s"] * 1000, "max": r["max_s"] * 1000}
            for n, r in results.items()}
    rows = []
    for name, r in results.items():
        if name == "full":
            continue
        rows.append(row(f"strategy {name} ({size}): step time vs full fine-tuning", "ms", step[name], step["full"],
                        higher_is_better=False, note=f"trainable {r['trainable']:,} / {r['total']:,} parameters"))
        mem = {"label": name, "median": r["memory_mib"], "min": r["memory_mib"], "max": r["memory_mib"]}
        mem_full = {"label": "full", "median": full["memory_mib"], "min": full["memory_mib"], "max": full["memory_mib"]}
        rows.append(row(f"strategy {name} ({size}): {unit} vs full fine-tuning", "MiB", mem, mem_full,
                        higher_is_better=False, note="one peak per fresh process"))
    print_rows(rows)
    write_json(args.json, "strategies", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
