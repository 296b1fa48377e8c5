"""Document questions: a question pack about one image with the ViT features computed once, against N full passes.

Ours: ``lavis_ext.apps.question_packs.run_pack``: ``predictor.encode([image])`` once, then all N questions of
the shipped ``document`` pack (N = 8) in one batch through the Q-Former and the LLM with ``features=``.
Peer: the same N questions as N full passes in the same single batch, ``predictor.answer([image] * N, questions)``
(the ViT runs N times; everything else is identical, so the ratio is the saving of feature caching alone).
Another row times the loop a user would write without the pack, one ``predictor.answer([image], [q])`` per
question (caching and batching together; for the ViT-S model only without ``--quick``). Targets: ours is never
slower (ratio >= 1), except tiny cached-vs-full, where the 0.17 M-parameter ViT is too small a share to show.

Models (both loaded with ``lavis_ext.inference.load(cfg_path=projects/tiny/vqa_t5.yaml)``, random weights:
the time does not depend on them; decoding = the project's: 3 beams, up to 5 new tokens):
* ``tiny``: the project's tiny Flan-T5 BLIP-2 (ViT width 64, depth 3, 64 patches); its ViT is a small part of
  the cost, as it is not in real BLIP-2;
* ``ViT-S``: the same with a ViT-S-sized encoder (width 384, depth 12, 6 heads, patch 4: 256 patches, about
  the 257 tokens of BLIP-2's ViT-g), closer to the real balance where the frozen ViT dominates per image.
The answers of both sides are checked to be identical. CPU threads: 1 by default (``--threads``): the ratio is
the work caching saves, and one thread keeps it stable on a busy machine (small LLM steps on several threads
are dominated by thread hand-offs there, which inflates the per-question loop tenfold).

Usage: python bench/question_packs.py [--quick] [--runs N] [--threads T] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO,
    add_common_args,
    interleaved,
    print_rows,
    require_data,
    resolve_runs,
    row,
    setup_paths,
    stat,
    write_json,
)

VIT_S = ["model.vit_config.width=384", "model.vit_config.depth=12", "model.vit_config.heads=6",
         "model.vit_config.patch_size=4"]


def shapes_image():
    import io

    from PIL import Image

    from lavis_ext.datasets.synthetic import make_example

    return Image.open(io.BytesIO(make_example(0, "test", 0)["jpg"])).convert("RGB")


def measure(label: str, options: list[str], runs: int, image, pack, loop: bool = True,
            vit_target: float | None = 1.0) -> list[dict]:
    """Rows for one model; ``vit_target`` is None where the ViT is too small a share for caching to show."""
    import torch

    from lavis_ext.apps.question_packs import run_pack
    from lavis_ext.inference import load

    predictor = load(cfg_path=REPO / "projects/tiny/vqa_t5.yaml", options=options, device="cpu")
    questions = [q for _, q in pack.questions]
    n = len(questions)
    cached = [a["answer"] for a in run_pack(predictor, pack, image)["answers"]]
    full = predictor.answer([image] * n, questions)
    same = "identical answers" if cached == full else f"ANSWERS DIFFER: {cached} vs {full}"
    contenders = {
        "cached": lambda: run_pack(predictor, pack, image),
        "full": lambda: predictor.answer([image] * n, questions),
    }
    if loop:
        contenders["loop"] = lambda: [predictor.answer([image], [q]) for q in questions]
    times = interleaved(contenders, runs)
    ours = stat(f"features once, {n} questions in 1 batch", times["cached"])
    rows = [
        row(f"document pack ({n} questions), {label} model: cached features vs {n} full passes (same batch)", "s",
            ours, stat(f"{n} full passes in 1 batch", times["full"]), higher_is_better=False,
            target=vit_target, note=f"{same}; ViT params {sum(p.numel() for p in predictor.model.visual_encoder.parameters()):,}; "
                 f"{torch.get_num_threads()} CPU thread(s)"),
    ]
    if loop:
        rows.append(row(
            f"document pack ({n} questions), {label} model: cached features vs a per-question loop", "s",
            ours, stat(f"{n} calls of 1 question", times["loop"]), higher_is_better=False, target=1.0,
            note="caching and batching together",
        ))
    return rows


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), runs=7, quick_runs=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides (default 1)")
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    setup_paths()
    require_data()
    import torch

    import lavis_ext
    lavis_ext.register()
    from lavis_ext.apps.question_packs import load_pack

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    pack, image = load_pack("document"), shapes_image()
    rows = measure("tiny", [], runs, image, pack, vit_target=None) + measure("ViT-S", VIT_S, runs, image, pack, loop=not args.quick)
    print_rows(rows)
    write_json(args.json, "question_packs", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
