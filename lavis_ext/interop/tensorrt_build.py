"""Build a TensorRT FP16 engine from the image-path ONNX file (:mod:`lavis_ext.interop.onnx_export`).

Why a separate step: engines are specific to the GPU and TensorRT version they are built with, so they
are built where they run. This needs the ``tensorrt`` Python package and an NVIDIA GPU; without either it
says so and exits with code 2 (nothing is half-built). The optimisation profile covers the dynamic
batch axis: ``--min-batch`` / ``--opt-batch`` / ``--max-batch``.

    lavis-ext tensorrt image_path.onnx image_path.plan --max-batch 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_UNAVAILABLE = 2


def _unavailable(reason: str) -> int:
    print(f"lavis-ext tensorrt: cannot build an engine here: {reason}. Run this command on a machine with an "
          "NVIDIA GPU and TensorRT (`pip install tensorrt`); the ONNX file itself runs anywhere with onnxruntime.",
          file=sys.stderr)
    return EXIT_UNAVAILABLE


def build_engine(onnx_path: str | Path, engine_path: str | Path, min_batch: int = 1, opt_batch: int = 8,
                 max_batch: int = 32, fp16: bool = True, workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and serialise an engine to ``engine_path``. Needs tensorrt and a GPU.

    Raises:
        ImportError: tensorrt is not installed. RuntimeError: the parse or build failed (TensorRT's errors).
    """
    import onnx
    import tensorrt as trt

    graph = onnx.load(str(onnx_path), load_external_data=False)
    input_name = graph.graph.input[0].name
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, *dims), (opt_batch, *dims), (max_batch, *dims))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT's builder returned no engine (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lavis-ext tensorrt", description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", help="image-path ONNX file from `lavis-ext onnx export`")
    parser.add_argument("engine", help="output engine file (.plan)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--fp32", action="store_true", help="build without FP16 kernels")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    if not Path(args.onnx).is_file():
        print(f"lavis-ext tensorrt: ONNX file {args.onnx!r} does not exist; write it with `lavis-ext onnx export`",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error(f"need 1 <= --min-batch <= --opt-batch <= --max-batch, got {args.min_batch}, {args.opt_batch}, {args.max_batch}")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return _unavailable("the tensorrt package is not installed")
    from lavis_ext.dist import resolve_device

    try:
        if resolve_device("auto").type != "cuda":
            return _unavailable("no CUDA GPU is visible")
    except (RuntimeError, ValueError) as error:
        return _unavailable(str(error))
    engine = build_engine(args.onnx, args.engine, args.min_batch, args.opt_batch, args.max_batch,
                          fp16=not args.fp32, workspace_gib=args.workspace_gib)
    print(f"wrote {engine} ({'fp32' if args.fp32 else 'fp16'}, batch {args.min_batch}..{args.max_batch})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
