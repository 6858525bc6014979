#!/usr/bin/env bash
# Everything we check on an NVIDIA GPU, in one run (a lent GPU is short-lived): the bf16 ViT-B/16 step
# benchmarks (MIM with explicit vs cuDNN attention, optionally host input with and without device prefetch;
# VQ-KD; fine-tune); profiles of the MIM and the VQ-KD steps, each with its kernel table and each source op
# against its roofline bound; the PyTorch peer of the MIM step (timm blocks, bf16 autocast, SDPA, fused
# AdamW; eager and torch.compile) on the same GPU; the Pallas kernels against XLA (benchmarks/kernels.py)
# and in the MIM step (model.add_norm); the MIM step with a bfloat16 residual stream (model.residual_dtype,
# opt-in numerics), with the patch embedding as a matmul (model.patch_embed) and under other XLA flags; the
# cuDNN attention and compiled-kernel tests; the largest MIM batch with and without remat.
# Each stage has its own time limit and appends JSON rows to $OUT/bench.jsonl as it measures them.
#
#   OUT=gpu_results bash benchmarks/gpu_check.sh
# Needs jax[cuda] plus this repo's requirements (grain, ml_collections, flax, optax, orbax-checkpoint).
# On a machine without network (a lent GPU), bring the missing wheels along and install them first, e.g.
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker
#   (there) pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
export JAX_COMPILATION_CACHE_DIR=/tmp/beitv2_jax_cache  # the max-batch stage recompiles shapes seen before
PY=${PY:-python3}
STAGES=${STAGES:-"pretrain profile profile_tokenizer torch_peer tokenizer_finetune kernels add_norm residual patch_embed xla_flags attention_tests device_resize max_batch"}

stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? ($(date +%T))"
  grep -E "^task=|^profile:|^device_resize:|passed|failed|Error|error:" "$OUT/$name.log" | tail -n 12
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

stage pretrain "${T_PRETRAIN:-170}" $PY benchmarks/train_step.py --size=base --tasks=pretrain --batch="${PRE_BATCH:-256}" \
  --steps=10 --attention="${PRE_ATTN:-xla,cudnn}" ${PRE_FLAGS:---host-input} --json "$OUT/bench.jsonl"
# the kernel table and each source op's measured time against its roofline bound land in $OUT/profile.log;
# command buffers off, so that every kernel in the trace names its own HLO instruction
stage profile "${T_PROFILE:-90}" env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  $PY benchmarks/train_step.py --size=base --tasks=pretrain --batch=256 --steps=3 --attention=cudnn \
  --profile=/tmp/beitv2_jax_trace
# the same for the VQ-KD step (its later steps: k-means runs in a first step of its own), whose measured time
# was 1.87x its roofline bound against the MIM step's 1.49x: the source ops that lose the time, in
# $OUT/profile_tokenizer.log
stage profile_tokenizer "${T_PROFILE_TOK:-90}" env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  $PY benchmarks/train_step.py --size=base --tasks=tokenizer --batch=256 --steps=3 --attention=cudnn \
  --profile=/tmp/beitv2_jax_trace_tokenizer
# the PyTorch peer a user would pick instead (benchmarks/torch_mim.py), same step, same GPU, same batch
stage torch_peer "${T_TORCH:-150}" $PY benchmarks/torch_mim.py --size=base --batch="${PRE_BATCH:-256}" --steps=10 \
  --compile="${TORCH_COMPILE:-0,1}" --json "$OUT/bench.jsonl"
stage tokenizer_finetune "${T_TOKFT:-120}" $PY benchmarks/train_step.py --size=base --tasks="${TOKFT_TASKS:-tokenizer,finetune}" \
  --attention="${TOKFT_ATTN:-auto}" --batch=256 --steps=10 --json "$OUT/bench.jsonl"
# Pallas kernels (beitv2_jax/kernels) vs the XLA path they would replace, at ViT-B's shapes, side by side
stage kernels "${T_KERNELS:-60}" $PY benchmarks/kernels.py --json "$OUT/bench.jsonl"
# the MIM step with each block's residual add + norm2 in the Pallas kernel (model.add_norm) and without
stage add_norm "${T_ADD_NORM:-120}" $PY benchmarks/train_step.py --size=base --tasks=pretrain --batch="${PRE_BATCH:-256}" \
  --steps=10 --attention=cudnn --add-norm=xla,pallas --json "$OUT/bench.jsonl"
# the MIM step with the residual stream between blocks in float32 (official) and in bfloat16 (opt-in)
stage residual "${T_RESIDUAL:-120}" $PY benchmarks/train_step.py --size=base --tasks=pretrain --batch="${PRE_BATCH:-256}" \
  --steps=10 --attention=cudnn --residual=float32,bfloat16 --json "$OUT/bench.jsonl"
# the MIM step with the student's and the tokenizer's patch embedding as cuDNN's strided conv and as one matmul
stage patch_embed "${T_PATCH:-120}" $PY benchmarks/train_step.py --size=base --tasks=pretrain --batch="${PRE_BATCH:-256}" \
  --steps=10 --attention=cudnn --patch-embed=conv,matmul --json "$OUT/bench.jsonl"
# the MIM step under XLA flag sets (each its own process; ';'-separated), the row records the flags
xla_flag_sets() {
  local IFS=';'
  for flags in ${FLAG_SETS:---xla_gpu_enable_triton_gemm=false;--xla_gpu_enable_cublaslt=true}; do
    XLA_FLAGS="${XLA_FLAGS:-} $flags" $PY benchmarks/train_step.py --size=base --tasks=pretrain \
      --batch="${PRE_BATCH:-256}" --steps=10 --attention=cudnn --json "$OUT/bench.jsonl"
  done
}
export -f xla_flag_sets; export PY OUT
stage xla_flags "${T_FLAGS:-100}" bash -c xla_flag_sets
# the cuDNN attention and kernel tests, and the step's resize (data.resize="device") exact on this GPU: its float32
# matmuls at Precision.HIGHEST must not round (TF32 would)
stage attention_tests "${T_TESTS:-60}" $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_kernels.py \
  tests/test_canvas.py tests/test_pixel_ops.py -k "not training"
# what the step's resize of 448 px canvases to 224 px and fine-tuning's RandAugment colour ops cost here, per
# image (FLOPs, ms) at batch 256
stage device_resize "${T_RESIZE:-40}" $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import input_pipeline as ip; \
f, ms = ip.device_resize_cost(224, 256); print(f'device_resize: {f / 1e9:.2f} GFLOP per image, {ms * 1e3:.1f} us per image'); \
f, ms = ip.device_ops_cost(224, 256); print(f'device_resize: RandAugment colour ops {f / 1e9:.3f} GFLOP per image, {ms * 1e3:.1f} us per image')"
stage max_batch "${T_MAXB:-110}" $PY benchmarks/train_step.py --size=base --tasks=pretrain --max-batch \
  --remat="${MAXB_REMAT:-none,full}" --json "$OUT/bench.jsonl"
echo "== done ($(date +%T))"
