#!/usr/bin/env bash
# Several nodes: run on every node with the same NNODES, MASTER_ADDR (the rendezvous host) and
# RDZV_ID: NNODES=4 MASTER_ADDR=node0 scripts/train_multi_node.sh CONFIG [key=value ...]
# GPUS=N and PYTHON=/path/to/python as for train_one_node.sh (scripts/launch_env.sh).
# MAX_RESTARTS=3: a rank that dies brings the job back from its newest checkpoint; give each
# launch its own RDZV_ID (restarts resume only checkpoints written under the same id).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/launch_env.sh"
[[ -n ${NNODES:-} ]] || die "NNODES is not set: the number of nodes, the same on every node" \
  "(NNODES=4 MASTER_ADDR=node0 scripts/train_multi_node.sh CONFIG)"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: give a positive number of nodes"
[[ -n ${MASTER_ADDR:-} ]] || die "MASTER_ADDR is not set: the rendezvous host, the same on every" \
  "node (NNODES=4 MASTER_ADDR=node0 scripts/train_multi_node.sh CONFIG)"
MASTER_PORT=${MASTER_PORT:-29500}
find_python
count_ranks
# A host that does not resolve or answer would make torchrun wait out its rendezvous timeout.
why=$("$PYTHON" "$ROOT/scripts/check_rendezvous.py" "$MASTER_ADDR" "$MASTER_PORT" \
      "${RDZV_CHECK_TIMEOUT:-10}") \
  || die "rendezvous host MASTER_ADDR=$MASTER_ADDR: $why"
echo "d2v-engine launch: $PYTHON (torch $TORCH_VERSION), $NNODES node(s) x $GPUS rank(s)," \
  "$DEVICES; rendezvous $MASTER_ADDR:$MASTER_PORT id ${RDZV_ID:-d2v}" >&2
cd "$ROOT"  # d2v_engine/ and the configs' relative data paths
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS" \
  --max-restarts "${MAX_RESTARTS:-0}" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-d2v}" -m d2v_engine.cli.train "$@"
