#!/usr/bin/env bash
# One launcher for every recipe: run_scripts/launch.sh RECIPE [train.py/evaluate.py args...]
#   e.g. bash run_scripts/launch.sh projects/blip2/opt2.7b/caption_coco_ft.yaml --options run.max_epoch=1
# Runs evaluate.py when the recipe (with its _base_ files) says run.evaluate: true, else train.py; MODE=train or
# MODE=evaluate forces one. The recipe's header says what it reproduces and which data variables it reads.
# Env: NPROC (GPUs on this node, default 16), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT (multi-node), PYTHON, MODE.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 RECIPE.yaml [args for train.py/evaluate.py]; recipe ${1:-<none>} not found" >&2
    exit 2
fi
recipe="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
cd "$(dirname "$0")/.."
mode="${MODE:-}"
if [ -z "$mode" ]; then
    evaluate="$("${PYTHON:-python}" -m lavis_ext.project_files "$recipe" --get run.evaluate)"
    if [ "$evaluate" = "True" ]; then mode=evaluate; else mode=train; fi
fi
case "$mode" in
    train|evaluate) ;;
    *) echo "MODE=$mode: use MODE=train or MODE=evaluate" >&2; exit 2 ;;
esac
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nproc_per_node="${NPROC:-16}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    "$mode.py" --cfg-path "$recipe" "$@"
