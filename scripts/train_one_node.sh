#!/usr/bin/env bash
# One node, all its GPUs: scripts/train_one_node.sh CONFIG [key=value ...]
# GPUS=N to choose the ranks (without CUDA: one CPU rank, or N gloo ranks); PYTHON=/path/to/python
# for another environment (default .venv/bin/python, else python3): see scripts/launch_env.sh.
# MAX_RESTARTS=3: a rank that dies brings the job back from its newest checkpoint.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/launch_env.sh"
find_python
count_ranks
echo "d2v-engine launch: $PYTHON (torch $TORCH_VERSION), 1 node x $GPUS rank(s), $DEVICES" >&2
cd "$ROOT"  # d2v_engine/ and the configs' relative data paths
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
  --max-restarts "${MAX_RESTARTS:-0}" -m d2v_engine.cli.train "$@"
