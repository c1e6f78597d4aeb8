# Sourced by the launch scripts, with ROOT the repository root: which python, how many ranks, and
# the one-line errors. Not run on its own.
#   PYTHON=/path/to/python   the environment to run in; default .venv/bin/python when it exists,
#                            else python3 from PATH
#   GPUS=N                   ranks on this node; default torch.cuda.device_count(), and without
#                            CUDA one CPU rank (GPUS=N: N gloo ranks on the CPU)

die() {
  echo "error: $*" >&2
  exit 2
}

# Sets PYTHON (absolute), TORCH_VERSION and CUDA_DEVICES, or dies naming the python it tried.
find_python() {
  local chosen=${PYTHON:-}
  if [[ -z $chosen ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then chosen=$ROOT/.venv/bin/python; else chosen=python3; fi
  fi
  # Resolved where the caller stands (a relative PYTHON is relative to it), before any cd.
  PYTHON=$(command -v "$chosen" 2>/dev/null) \
    || die "no python at PYTHON=$chosen: set PYTHON=/path/to/python of an environment with torch"
  local info
  # The last line: torch's import may print warnings of its own.
  info=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.device_count())' \
         2>/dev/null | tail -n 1) || true
  read -r TORCH_VERSION CUDA_DEVICES <<< "$info"
  [[ $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON
  [[ ${CUDA_DEVICES:-} =~ ^[0-9]+$ ]] \
    || die "$PYTHON cannot import torch: set PYTHON=/path/to/python of an environment with torch"
}

# Sets GPUS (ranks on this node) and DEVICES (what they run on, for the first line).
count_ranks() {
  if [[ -n ${GPUS:-} && ! ${GPUS} =~ ^[1-9][0-9]*$ ]]; then
    die "GPUS=$GPUS: give a positive number of ranks for this node"
  fi
  if (( CUDA_DEVICES > 0 )); then
    GPUS=${GPUS:-$CUDA_DEVICES}
    DEVICES="CUDA ($CUDA_DEVICES GPUs visible)"
  else
    GPUS=${GPUS:-1}
    DEVICES="no CUDA: CPU ranks over gloo"
  fi
}
