#!/usr/bin/env bash
# One node with one or more GPUs: a single process drives every local GPU (data parallel over all of them).
# Usage: CONFIG=configs/tokenizer_base.py WORKDIR=/data/runs/tok bash launch/gpu.sh [--config.x=y ...]
# DRY_RUN=1 prints the commands with the variables filled in and runs none of them.
# Multi-node: run the same command on every node with
#   JAX_COORDINATOR_ADDRESS=<node0>:1234 JAX_NUM_PROCESSES=<nodes> JAX_PROCESS_ID=<rank>
# (or under SLURM, where jax.distributed.initialize() finds them itself).
set -euo pipefail
CONFIG=${CONFIG:-configs/pretrain_base.py}
WORKDIR=${WORKDIR:?set WORKDIR}
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

run() {  # a command, or with DRY_RUN=1 its text
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

if [ ! -d .venv-gpu ]; then
  run python3 -m venv .venv-gpu
  run .venv-gpu/bin/pip install -q -c constraints.txt -e '.[gpu]'
fi
[ "${DRY_RUN:-0}" = 1 ] && echo "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
run exec .venv-gpu/bin/python -m beitv2_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
