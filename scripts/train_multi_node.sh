#!/usr/bin/env bash
# Several nodes: run on every node with the same NNODES, MASTER_ADDR (the rendezvous host) and
# RDZV_ID: NNODES=4 MASTER_ADDR=node0 scripts/train_multi_node.sh CONFIG [key=value ...]
# MAX_RESTARTS=3: a rank that dies brings the job back from its newest checkpoint; give each
# launch its own RDZV_ID (restarts resume only checkpoints written under the same id).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
exec .venv/bin/torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
  --max-restarts "${MAX_RESTARTS:-0}" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-d2v}" -m engine.train "$@"
