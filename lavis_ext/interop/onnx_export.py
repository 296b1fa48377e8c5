"""ONNX export of BLIP-2's image path (ViT -> Q-Former -> projection into the LLM's embedding space) and an
onnxruntime image encoder that plugs into our generation.

Why only the image side: it is the fixed-shape, compute-heavy part (the ViT), and its output, the *LLM
prefix*, is a small, well-defined contract; the LLM keeps Hugging Face's ``generate`` (beam search, KV
cache), which an ONNX graph would have to reimplement. The contract (docs/interop.md):

* input ``image``: float32 ``[B, 3, S, S]``, normalised as ``blip_image_eval`` does (CLIP mean/std);
* output ``llm_prefix``: float32 ``[B, num_query_token, llm_hidden]``; its attention mask is all ones;
* OPT reads it before the embedded prompt (``[prefix; prompt]``), Flan-T5's encoder reads it before the
  embedded prompt the same way; ``model.generate({"llm_inputs": prefix, ...})`` takes it as is.
* ``B`` is a dynamic axis; ``S``, ``num_query_token`` and ``llm_hidden`` are fixed and stored in the
  file's metadata (``lavis_ext.*`` keys).

The TorchScript exporter (``dynamo=False``) is used: it traces LAVIS's EVA ViT and BERT Q-Former in well
under a second, where the dynamo exporter takes several seconds for the same graph.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

INPUT, OUTPUT = "image", "llm_prefix"


class ImageToPrefix(nn.Module):
    """image -> LLM prefix, the part of BLIP-2 that is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "qformer_text_input", False):
            raise ValueError("qformer_text_input models make the prefix from the question too; "
                             "the image-only ONNX path needs qformer_text_input: false")
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image_for_llm(image)[0]


def export_onnx(model: nn.Module, path: str | Path, image_size: int, opset: int = 17, metadata: dict | None = None) -> Path:
    """Write the image path of ``model`` to ``path`` (float32, dynamic batch axis) and check the graph.

    Returns the path. ``metadata`` (str values) joins the file's ``lavis_ext.*`` properties.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ImageToPrefix(model).float().eval()
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about LAVIS's Python-side shape checks
        prefix = wrapper(example)
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    props = {"image_size": image_size, "num_query_token": prefix.shape[1], "llm_hidden": prefix.shape[2],
             "arch": type(model).__name__, **(metadata or {})}
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = f"lavis_ext.{key}", str(value)
    onnx.save(graph, str(path))
    return path


class OnnxImageEncoder:
    """onnxruntime (CPU by default) in place of the PyTorch image path: ``encoder(images) -> prefix``.

    ``images``: a float tensor or array ``[B, 3, S, S]`` (``Blip2Predictor.preprocess`` output). The
    returned torch tensor is what ``model.generate({"llm_inputs": prefix, ...})`` expects.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist; write it with `lavis-ext onnx export`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("lavis_ext.")}
        self.image_size = int(self.metadata.get("image_size", 0)) or None

    def __call__(self, images) -> torch.Tensor:
        array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
        if array.ndim != 4 or array.shape[1] != 3 or (self.image_size and array.shape[2:] != (self.image_size,) * 2):
            raise ValueError(f"images of shape {tuple(array.shape)}; this encoder takes [B, 3, {self.image_size}, {self.image_size}]")
        (prefix,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(array)})
        return torch.from_numpy(prefix)


# ---- CLI ---------------------------------------------------------------------------------------
def _load(source: str):
    from lavis_ext.inference import load

    return load(source, device="cpu")


def main(argv: list[str] | None = None) -> int:
    from lavis_ext.images import decode_image

    parser = argparse.ArgumentParser(prog="lavis-ext onnx", description="ONNX export of BLIP-2's image path.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="run directory or checkpoint -> image-path ONNX file")
    exp.add_argument("source")
    exp.add_argument("out", help="output .onnx path")
    exp.add_argument("--opset", type=int, default=17)
    exp.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    cap = sub.add_parser("caption", help="caption images with the image side in onnxruntime")
    cap.add_argument("onnx")
    cap.add_argument("source", help="the run directory / checkpoint the file was exported from (the LLM side)")
    cap.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        predictor = _load(args.source)
        if args.command == "export":
            path = export_onnx(predictor.model, args.out, predictor.image_size, args.opset,
                               metadata={"source": str(args.source), "arch_name": predictor.arch})
            report = {"onnx": str(path)}
            if not args.no_verify:
                report.update(verify(predictor.model, path, predictor.image_size))
            print(json.dumps(report))
        else:
            encoder = OnnxImageEncoder(args.onnx)
            pixel = predictor.preprocess([decode_image(p) for p in args.images])  # strict: truncated files fail
            samples = {"llm_inputs": encoder(pixel), "prompt": predictor.caption_prompt}
            captions = predictor.model.generate(samples, **predictor.caption_decoding.caption_kwargs())
            for name, caption in zip(args.images, captions):
                print(f"{name}\t{caption}")
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"lavis-ext onnx {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def verify(model: nn.Module, path: str | Path, image_size: int, batch_sizes=(1, 5), seed: int = 0) -> dict:
    """Max |onnxruntime - PyTorch| of the prefix per batch size (random normalised images)."""
    encoder = OnnxImageEncoder(path)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in batch_sizes:
        images = torch.randn(b, 3, image_size, image_size, generator=g)
        with torch.no_grad():
            reference = model.encode_image_for_llm(images)[0]
        out[f"max_abs_diff_batch{b}"] = float((encoder(images) - reference).abs().max())
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
