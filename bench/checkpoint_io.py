"""Checkpoint save/load time: our full-state safetensors checkpoint against LAVIS's `torch.save` of the same state.

Both write the trainable tensors, the AdamW state after one step, the config and the epoch; ours also
writes the lr-scheduler state, one rank's RNG states and a data position, computes a sha256 of it all,
fsyncs, renames, and on load verifies the sha256 (LAVIS: `torch.save` in place, `torch.load`, no check).
Sizes: the tiny BLIP-2 OPT of `projects/tiny` (0.44 M parameters, all trainable) and a 25 M-parameter
stand-in for a trained Q-Former-sized part (Linear stack). Median of N runs, page cache warm, the two sides
alternating run by run (one untimed call each first).

Usage: python bench/checkpoint_io.py [--quick] [--runs 5] [--json OUT] [--mparams 25]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import add_common_args, interleaved, print_rows, resolve_runs, row, stat, write_json  # noqa: E402


def tiny_blip2():
    os.environ.setdefault("LAVIS_EXT_DATA", str(REPO / "data/synthetic"))
    if not (Path(os.environ["LAVIS_EXT_DATA"]) / "tokenizers").is_dir():
        return None
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_model

    return tiny_model("blip2_opt_ext")


def stack(mparams: float):
    import torch

    width = 1024
    layers = max(1, int(mparams * 1e6 / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def stepped(model):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return optimizer


def lavis_save(path, model, optimizer, config):
    import torch

    # LAVIS 1.0.2 RunnerBase._save_checkpoint, minus the logging
    grad = {k: v.requires_grad for k, v in model.named_parameters()}
    state = {k: v for k, v in model.state_dict().items() if grad.get(k, True)}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": config, "scaler": None, "epoch": 0}, path)


def lavis_load(path, model, optimizer):
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])


def ours_save(path, model, optimizer, config):
    from lavis.common.optims import LinearWarmupCosineLRScheduler

    from lavis_ext.checkpoints import capture_rng_state, save_checkpoint

    sched = LinearWarmupCosineLRScheduler(optimizer, max_epoch=10, min_lr=0, init_lr=1e-4)
    save_checkpoint(path, model, config=config, optimizer=optimizer, epoch=0, lr_scheduler=sched,
                    train_state={"epoch": 0, "step": 100, "global_step": 100, "epoch_done": False},
                    rank_states=[{"rng": capture_rng_state(), "position": {"pass": 0, "batches": 100}}])


def ours_load(path, model, optimizer):
    from lavis_ext.checkpoints import apply_optimizer, apply_trainable, read_checkpoint

    tensors, meta = read_checkpoint(path)  # verifies the sha256
    apply_trainable(model, tensors, path)
    apply_optimizer(optimizer, tensors, meta, path)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), runs=5, quick_runs=3)
    parser.add_argument("--mparams", type=float, default=25.0)
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    import lavis_ext
    lavis_ext.register()

    models = {}
    tiny = tiny_blip2()
    if tiny is not None:
        models["tiny BLIP-2 OPT"] = tiny
    else:
        print("(no data/synthetic tokenizers: skipping the tiny BLIP-2; run make data)")
    models[f"{args.mparams:g} M-param stack"] = stack(args.mparams)
    config = {"run": {"note": "same config in both"}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            optimizer = stepped(model)
            ours, theirs = Path(tmp) / "c.safetensors", Path(tmp) / "c.pth"
            # saves, then loads of those files; within each, the sides alternate run by run
            saves = interleaved({"ours": lambda: ours_save(ours, model, optimizer, config),
                                 "peer": lambda: lavis_save(theirs, model, optimizer, config)}, runs, warmup=1)
            loads = interleaved({"ours": lambda: ours_load(ours, model, optimizer),
                                 "peer": lambda: lavis_load(theirs, model, optimizer)}, runs, warmup=1)
            s_ours, s_lavis, l_ours, l_lavis = saves["ours"], saves["peer"], loads["ours"], loads["peer"]
            size = f"{ours.stat().st_size / 1e6:.1f} MB ours / {theirs.stat().st_size / 1e6:.1f} MB LAVIS"
            rows.append(row(f"checkpoint save, {name} ({size})", "s", stat("full-state safetensors", s_ours),
                            stat("LAVIS torch.save", s_lavis), higher_is_better=False,
                            note="ours also writes scheduler, RNG and data position, sha256, fsync, atomic rename"))
            rows.append(row(f"checkpoint load, {name}", "s", stat("read + sha256 check", l_ours),
                            stat("LAVIS torch.load", l_lavis), higher_is_better=False,
                            note="ours verifies the sha256 of the whole file before applying it"))
    print_rows(rows)
    write_json(args.json, "checkpoint_io", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
