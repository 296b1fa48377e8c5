#!/usr/bin/env bash
# BLIP-2 ViT-g OPT-2.7B: VQAv2 fine-tuning with the paper's Table 8 settings, plus LoRA on the LLM.
# Runs projects/blip2/opt2.7b/vqav2_ft_lora.yaml; the recipe's header says what it reproduces and which data it reads.
# Env: NPROC (GPUs on this node, default 16), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT (multi-node), PYTHON,
#      and the data variables the recipe names. Extra arguments go to train.py, e.g. --options run.max_epoch=1
set -euo pipefail
cd "$(dirname "$0")/../../.."
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nproc_per_node="${NPROC:-16}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    train.py --cfg-path projects/blip2/opt2.7b/vqav2_ft_lora.yaml "$@"
