"""Pallas kernels vs the XLA path they would replace, side by side in one process: forward and forward +
backward of residual add + LayerNorm (beitv2_jax/kernels/add_layernorm.py) at a ViT's shape.

  python benchmarks/kernels.py                               # on the default backend (a GPU: the measurement)
  python benchmarks/kernels.py --target=gpu:h100             # compile both for an H100 without one (deviceless)
  python benchmarks/kernels.py --interpret --rows=256 --width=64   # CPU: the kernel in interpret mode (smoke)

Default shape: ViT-B/16 MIM at batch 256 (256 x 197 tokens, width 768), the branch output and LN(y) in bfloat16,
the stream in float32. Per direction it prints the median time of --steps runs and the bandwidth of the bytes
the fused kernel must move at least (forward: x, h in, y, LN(y) out; backward: y, h, dy, dLN in, dx, dh out);
--json appends one row per implementation and direction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from beitv2_jax.kernels.add_layernorm import add_layernorm, add_layernorm_reference  # noqa: E402

EPS = 1e-6


def inputs(rows: int, width: int, dtype):
  k = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(k[0], (rows, width))
  h = jax.random.normal(k[1], (rows, width)).astype(dtype)
  gamma, scale, bias = (jax.random.normal(k[i], (width,)) for i in (2, 3, 4))
  row_scale = jnp.ones((rows,))
  cot = (jax.random.normal(k[5], (rows, width)), jax.random.normal(k[5], (rows, width)).astype(dtype))
  return (x, h, gamma, row_scale, scale, bias), cot


def programs(impl, dtype):
  """jitted forward and forward + backward (the vjp of both outputs) of one implementation."""
  fwd = jax.jit(impl)

  def fwd_bwd(args, cot):
    out, vjp = jax.vjp(impl, *args)
    return out, vjp(cot)
  return fwd, jax.jit(fwd_bwd)


def minimal_bytes(rows: int, width: int, dtype) -> dict:
  f32, half = 4, jnp.dtype(dtype).itemsize
  fwd = rows * width * (f32 + half + f32 + half)
  bwd = rows * width * (f32 + half + f32 + half + f32 + half)
  return {"forward": fwd, "forward+backward": fwd + bwd}


def timed(fn, *args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=256 * 197)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--dtype", default="bfloat16", help="of the branch output h and of LN(y)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--interpret", action="store_true", help="the Pallas kernel in interpret mode (any backend)")
  p.add_argument("--target", default="", help="compile only, for gpu:h100 / gpu:h200 (deviceless)")
  p.add_argument("--json", default="", help="append one row per implementation and direction")
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  impls = {"xla": lambda *args: add_layernorm_reference(*args, EPS, dtype),
           "pallas": lambda *args: add_layernorm(*args, EPS, dtype, a.interpret)}
  args, cot = inputs(a.rows, a.width, dtype)
  if a.target:
    return compile_for(a.target, impls, args, cot)
  device = jax.devices()[0].device_kind
  need = minimal_bytes(a.rows, a.width, dtype)
  print(f"residual add + LayerNorm, {a.rows} x {a.width}, h / LN(y) in {dtype.name}, on {device}"
        f"{' (Pallas in interpret mode)' if a.interpret else ''}")
  rows = []
  for name, impl in impls.items():
    fwd, fwd_bwd = programs(impl, dtype)
    for direction, seconds in (("forward", timed(fwd, *args, steps=a.steps)),
                               ("forward+backward", timed(fwd_bwd, args, cot, steps=a.steps))):
      gbps = need[direction] / seconds / 1e9
      print(f"  {name:7s} {direction:17s} {seconds * 1e3:9.3f} ms   {gbps:8.1f} GB/s of the minimal bytes")
      rows.append({"bench": "add_layernorm", "impl": name, "direction": direction, "rows": a.rows,
                   "width": a.width, "dtype": dtype.name, "ms": seconds * 1e3, "gbps_minimal": gbps,
                   "device": device, "interpret": a.interpret})
  if a.json:
    with open(a.json, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  return rows


def compile_for(target_name: str, impls: dict, args, cot) -> list:
  """Both implementations' forward + backward compiled for a GPU we do not have: the kernel lowers (Triton)
  and XLA accepts it; prints each program's memory."""
  from beitv2_jax import aot
  device = aot.target(target_name).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda t: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), t)
  rows = []
  for name, impl in impls.items():
    _, fwd_bwd = programs(impl, None)
    compiled = fwd_bwd.trace(spec(args), spec(cot)).lower().compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    kernels = compiled.as_text().count("xla.gpu.triton\"") if name == "pallas" else 0
    print(f"  {name:7s} forward+backward compiled for {target_name}: temp {temp / 2**20:.1f} MiB"
          + (f", {kernels} Triton custom calls" if name == "pallas" else ""))
    rows.append({"impl": name, "target": target_name, "temp_bytes": temp, "triton_calls": kernels})
  return rows


if __name__ == "__main__":
  main()
