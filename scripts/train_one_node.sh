#!/usr/bin/env bash
# One node, all its GPUs: scripts/train_one_node.sh CONFIG [key=value ...]
# MAX_RESTARTS=3: a rank that dies brings the job back from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=$(( GPUS > 0 ? GPUS : 1 ))
exec .venv/bin/torchrun --standalone --nproc_per_node "$GPUS" --max-restarts "${MAX_RESTARTS:-0}" \
  -m engine.train "$@"
