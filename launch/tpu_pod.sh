#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: copy the code to every worker, install, run the same command on all.
# Usage: TPU=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket CONFIG=configs/pretrain_base.py:epochs=1600 \
#        bash launch/tpu_pod.sh [--config.tokenizer_path=gs://.../vqkd.pth ...]
# DRY_RUN=1 prints every command with the variables filled in and runs none of them.
# Before renting: python -m beitv2_jax.aot --config=$CONFIG --target=tpu:v4-32 says whether it fits.
# TFDS_DATA_DIR must hold imagenet2012 prepared as array_record (see README, "Training on ImageNet").
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG=${CONFIG:-configs/pretrain_base.py}
RUN=${RUN:-$(basename "${CONFIG%%.py*}")-$(date +%Y%m%d-%H%M)}
WORKDIR=${WORKDIR:-$BUCKET/beitv2_jax/$RUN}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$BUCKET/tensorflow_datasets}
SRC=$(cd "$(dirname "$0")/.." && pwd)
ARGS=""
for a in "$@"; do ARGS+=" $(printf '%q' "$a")"; done

run() {  # a command, or with DRY_RUN=1 its text
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

run tar -C "$SRC" --exclude=.venv --exclude=workdirs --exclude=.git -czf /tmp/beitv2_jax.tgz .
run gcloud compute tpus tpu-vm scp /tmp/beitv2_jax.tgz "$TPU":~/ --zone="$ZONE" --worker=all
run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command "
  set -e; mkdir -p ~/beitv2_jax && tar -xzf ~/beitv2_jax.tgz -C ~/beitv2_jax && cd ~/beitv2_jax
  python3 -m pip install -q -c constraints.txt -e '.[tpu]'
  export TFDS_DATA_DIR=$TFDS_DATA_DIR
  python3 -m beitv2_jax.main --config=$CONFIG --workdir=$WORKDIR$ARGS"
# jax.distributed.initialize() runs automatically on every worker of the pod (see beitv2_jax/parallel.py).
# Preempted? Run this script again with the same RUN / WORKDIR: it resumes from the last checkpoint.
