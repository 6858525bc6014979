"""Compile a train step for an NVIDIA GPU on a machine without one, and show where its time would go.

XLA compiles the real step (same model code, same jit, bf16, cuDNN attention where "auto" would pick it on
the GPU) for a described H100 / H200 ("deviceless AOT"); benchmarks/hlo_roofline.py then charges every
kernel of the compiled module its roofline time. Use it to see which ops move the bytes and to compare
variants side by side before spending GPU time; the GPU benchmark (train_step.py) is what measures.

  pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # the compiler, once
  python benchmarks/gpu_aot.py --tasks=pretrain --batch=256 --target=h100
  python benchmarks/gpu_aot.py --tasks=pretrain,finetune --attention=xla,cudnn --target=h200 --top=30

Differences from a compile on the GPU: no autotuning (there is no device to time candidates on), so
matmuls go to cuBLAS (Triton GEMM fusions are turned off: without autotuning their tiling can fail), and
cuDNN picks its default plans. The roofline lower bound is not a measurement; RESULTS.md compares it
with what the H200 measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The CUDA plugin must register without a GPU; tracing and parameter shapes use the CPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import hlo_roofline  # noqa: E402
import train_step  # noqa: E402
from beitv2_jax import parallel  # noqa: E402
from beitv2_jax.models import attention as attention_lib  # noqa: E402
from beitv2_jax.train.loop import jit_step  # noqa: E402

# XLA's GPU target description (stream_executor GpuTargetConfigProto), what the GPU would report itself.
_DEVICE_INFO = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
# --target -> (the device's own description string, HBM bytes/s, device memory), and its roofline machine.
TARGETS = {
    "h100": ("NVIDIA H100 80GB HBM3", 80 * 2**30),
    "h200": ("NVIDIA H200", 141 * 10**9),
}


def target(name: str):
  if name not in TARGETS:
    raise SystemExit(f"--target must be one of {sorted(TARGETS)}, got {name!r}")
  desc, memory = TARGETS[name]
  machine = hlo_roofline.machine_for(desc)
  config = _DEVICE_INFO.format(bandwidth=int(machine.hbm_tbps * 1e12), memory=int(memory), name=desc)
  return config, machine


def gpu_mesh(target_config: str) -> Mesh:
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config, topology="1x1x1")
  except Exception as e:  # noqa: BLE001 - the plugin's own error says little
    raise SystemExit(f"cannot make a CUDA topology without a GPU ({e}); install the compiler with "
                     f'pip install "jax[cuda12]=={jax.__version__}"') from e
  return Mesh(np.asarray(topology.devices).reshape(1, 1), ("data", "fsdp"))


def compile_step(task: str, size: str, batch: int, attention: str, remat: str, mesh: Mesh):
  """The task's jitted train step compiled for `mesh`'s GPU, and the task (for its FLOP count)."""
  built = train_step._build(task, size, "bfloat16", batch, remat, False, attention)
  shardings = parallel.state_shardings(built.state_abs, mesh)
  on = lambda tree, sharding: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), built.state_abs, shardings)
  batch_abs = on(built.host_batch, parallel.batch_sharding(mesh))
  frozen = on(built.frozen, parallel.replicated(mesh)) if built.frozen is not None else None
  step = jit_step(built.task.train_step, shardings, mesh)
  # The host is a CPU: while tracing the step, "auto" must resolve as it would on the target (cuDNN for
  # bf16 on an H100/H200). Building the task above ran parameter inits on the CPU with the real check.
  on_cpu = attention_lib._cudnn_flash_device
  attention_lib._cudnn_flash_device = lambda: True
  try:
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_abs, frozen).compile()
  finally:
    attention_lib._cudnn_flash_device = on_cpu
  return compiled, built.task, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="h100", help="comma list of " + ", ".join(TARGETS))
  ap.add_argument("--size", default="base", choices=("tiny", "small", "base", "large"))
  ap.add_argument("--tasks", default="pretrain")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--attention", default="auto", help="comma list of auto | xla | cudnn")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--top", type=int, default=20, help="source ops to list, by roofline time")
  ap.add_argument("--dump", default="", help="write each compiled module's HLO text into this folder")
  ap.add_argument("--json", default="", help="append the summary rows as JSON lines to this file")
  a = ap.parse_args()
  for tname in a.target.split(","):
    config, machine = target(tname)
    mesh = gpu_mesh(config)
    for task in a.tasks.split(","):
      for attention in a.attention.split(","):
        compiled, t, compile_s = compile_step(task, a.size, a.batch, attention, a.remat, mesh)
        text = compiled.as_text()
        if a.dump:
          os.makedirs(a.dump, exist_ok=True)
          with open(os.path.join(a.dump, f"{task}_{attention}_{a.batch}_{tname}.hlo"), "w") as f:
            f.write(text)
        ks = hlo_roofline.kernels(text, machine)
        ms = sum(k.ms for k in ks)
        mem = compiled.memory_analysis()
        row = dict(target=tname, task=task, size=a.size, batch=a.batch, attention=attention, remat=a.remat,
                   kernels=len(ks), while_loops=sum(k.category == "while loop" for k in ks), roofline_ms=round(ms, 2),
                   roofline_img_s=round(a.batch / ms * 1e3, 1),
                   roofline_mfu=round(t.flops_per_example * a.batch / (ms * 1e-3) / (machine.peak_tflops * 1e12), 4),
                   kernel_tflop=round(sum(k.flops for k in ks) / 1e12, 2),
                   model_tflop=round(t.flops_per_example * a.batch / 1e12, 2),
                   gb_moved=round(sum(k.bytes for k in ks) / 1e9, 1),
                   temp_gib=round(mem.temp_size_in_bytes / 2**30, 1), compile_s=round(compile_s, 1))
        print("\n" + " | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        print(f"  {'category':24s} {'kernels':>7s} {'TFLOP':>7s} {'GB':>7s} {'ms':>7s} {'share':>6s}")
        for r in hlo_roofline.by_category(ks):
          print(f"  {r['category']:24s} {r['kernels']:7d} {r['tflop']:7.2f} {r['gb']:7.1f} {r['ms']:7.2f} "
                f"{r['ms'] / ms:6.1%}")
        print(f"  top {a.top} source ops (all layers together):")
        for r in hlo_roofline.by_source(ks)[:a.top]:
          print(f"  {r['ms']:7.2f} ms {r['kernels']:4d}x {r['category'][:18]:18s} {r['gb']:6.1f} GB "
                f"{r['tflop']:6.2f} TF  {r['source'][-90:]}")
        if a.json:
          with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
