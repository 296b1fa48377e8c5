#!/usr/bin/env bash
# GPU benchmarks for a session lent a CUDA machine: real-size random-init BLIP-2 OPT-2.7B (LoRA, Q-Former only)
# and Flan-T5-XL (Q-Former only) training steps in bf16 at batch 16 (samples/s, MFU, peak memory) and caption
# generation (beam 5, 30 new tokens, batch 1 and 16), ours against Hugging Face Blip2ForConditionalGeneration + peft.
# Both sides hold the same weights (a copy of ours through the HF bridge), run the same bf16 autocast set explicitly,
# alternate run by run after warm-up and are timed with CUDA events; the first call and compile time are reported
# apart, losses and captions compared. See bench/gpu_step.py for exactly what each side runs. A torch.compile A/B
# is a separate run: bench/gpu.sh --compile (one lever per A/B), and so is the training loop's non-finite
# check: bench/gpu.sh --nonfinite-check step (the default on a GPU is deferred: no host sync per step). Needs the
# synthetic tokenizers (make data; on a device machine carry data/synthetic/tokenizers) and no network. Results: $OUT/gpu.json when $OUT is set (device runs),
# else bench/results/gpu.json, which `make bench` then shows in BENCHMARKS.md.
# The device machines' image has torch, peft and timm but transformers 5.x and no LAVIS: carry wheels of
# transformers==4.57.6, salesforce-lavis==1.0.2 (--no-deps) and LAVIS's light deps it imports (omegaconf,
# antlr4-python3-runtime, iopath, webdataset, braceexpand, pycocotools, ...) and put them first on PYTHONPATH,
# plus the project itself (PYTHONPATH=.). Only `--size tiny --device cpu` has been run so far (code-path check:
# tests/unit/test_bench_suite.py::test_gpu_script_code_path_runs_on_tiny_models_on_cpu, slow).
# Usage: bench/gpu.sh [extra gpu_step.py args, e.g. --cases opt_qformer --steps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export LAVIS_EXT_DATA=${LAVIS_EXT_DATA:-data/synthetic}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -W ignore bench/gpu_step.py --size real --device cuda --json "$OUT_DIR/gpu.json" "$@"
echo "wrote $OUT_DIR/gpu.json"
