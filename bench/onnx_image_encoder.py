"""Image encoding (image -> LLM prefix: ViT, Q-Former, projection): our ONNX export run by onnxruntime vs
the same model in PyTorch eager, on this CPU, same thread count.

The image side is widened so that it dominates the Python overhead: EVA ViT 256 wide x 6 blocks at
224 px (patch 16: 196 patches), Q-Former 256 x 4, OPT prefix width 64 (the LLM is not timed). Random
weights; the two sides are checked to agree within 1e-4 before timing.

Usage: python bench/onnx_image_encoder.py [--quick] [--runs N] [--threads N] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import (add_common_args, interleaved, require_data, resolve_runs, row, setup_paths, stat,  # noqa: E402
                    write_json)

IMAGE_SIZE = 224
WIDE_IMAGE_SIDE = {
    "image_size": IMAGE_SIZE,
    "vit_config": {"patch_size": 16, "width": 256, "depth": 6, "heads": 8, "mlp_ratio": 4.0},
    "qformer_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1024,
                       # BERT's 0.02: the tiny config's 0.2 (sized for width 64) makes a 256-wide random
                       # Q-Former so ill-conditioned that a 1e-6 input change moves the prefix by 1e-2
                       "initializer_range": 0.02},
    "num_query_token": 32,
}
BATCHES = (1, 8)




def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), runs=20, quick_runs=5)
    parser.add_argument("--threads", type=int, default=1, help="threads for both sides (1: stable on a shared CPU)")
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    torch.set_num_threads(args.threads)

    import lavis_ext
    lavis_ext.register()  # the compat shims must run before anything from LAVIS
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_ext.interop.onnx_export import OnnxImageEncoder, export_onnx

    setup_paths()
    require_data()
    cls = registry.get_model_class("blip2_opt_ext")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, WIDE_IMAGE_SIDE)
    torch.manual_seed(0)
    model = cls.from_config(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "image_path.onnx", IMAGE_SIZE)
        export_s = time.perf_counter() - t
        encoder = OnnxImageEncoder(path, threads=args.threads)
        g = torch.Generator().manual_seed(0)
        rows = []
        for batch in BATCHES:
            pixel = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)

            def run_torch(pixel=pixel):
                return model.encode_image_for_llm(pixel)[0]

            def run_onnx(pixel=pixel):
                return encoder(pixel)

            with torch.no_grad():
                diff = float((encoder(pixel) - run_torch()).abs().max())  # also the warm-up
                run_torch(), encoder(pixel)
                seconds = interleaved({"ours": run_onnx, "peer": run_torch}, runs, warmup=0)
            o = stat("lavis_ext ONNX export on onnxruntime", [batch / t for t in seconds["ours"]])
            p = stat("same model, PyTorch eager", [batch / t for t in seconds["peer"]])
            rows.append(row(
                f"image -> LLM prefix, batch {batch} (EVA ViT 256x6 @224px + Q-Former 256x4, CPU {args.threads} "
                "thread(s))", "images/s", o, p, target=1.0,
                note=f"max |onnxruntime - torch| = {diff:.2e}; export took {export_s:.1f} s; {runs} runs per side, "
                     "alternating"))
            ratio = rows[-1]["ratio"]
            print(f"batch {batch:2d}: onnxruntime {o['median']:8.2f}  torch {p['median']:8.2f} images/s  ratio {ratio:.3f}"
                  f"  max diff {diff:.1e}", flush=True)
    write_json(args.json, "onnx_image_encoder", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
