#!/usr/bin/env bash
# BLIP-2 ViT-g stage-1 Q-Former: COCO 5K retrieval with the COCO-fine-tuned stage-1 model.
# Runs projects/blip2/retrieval/eval_coco.yaml; the recipe's header says what it reproduces and which data it reads.
# Env: NPROC (GPUs on this node, default 16), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT (multi-node), PYTHON,
#      and the data variables the recipe names. Extra arguments go to evaluate.py, e.g. --options run.batch_size_eval=8
set -euo pipefail
cd "$(dirname "$0")/../../.."
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nproc_per_node="${NPROC:-16}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    evaluate.py --cfg-path projects/blip2/retrieval/eval_coco.yaml "$@"
