#!/usr/bin/env bash
# Debug any config on this CPU with N fake devices (default 8), tiny sizes, a few steps.
# Usage: bash launch/cpu_debug.sh configs/pretrain_tiny.py [--config.total_steps=20 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/pretrain_tiny.py}; shift || true
make -s install
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES:-8}" JAX_PLATFORMS=cpu
exec .venv/bin/python -m beitv2_jax.main --config="$CONFIG" --workdir="workdirs/debug-$(basename "${CONFIG%.py}")" \
  --config.data.read_threads=2 "$@"
