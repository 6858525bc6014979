"""Train-step benchmark: step time, img/s, model TFLOP/s and MFU for the tokenizer, pretrain and finetune
steps, on synthetic device-resident batches (the input pipeline has its own benchmark).

  python benchmarks/train_step.py --size=tiny                       # CPU smoke test (CI runs it)
  python benchmarks/train_step.py --size=base --dtype=bfloat16 --batch=128 --tasks=pretrain
  python benchmarks/train_step.py --size=base --tasks=pretrain --attention=xla,cudnn --host-input
  python benchmarks/train_step.py --size=base --tasks=pretrain --attention=cudnn --add-norm=xla,pallas
  python benchmarks/train_step.py --size=base --tasks=pretrain --attention=cudnn --residual=float32,bfloat16
  python benchmarks/train_step.py --size=base --tasks=pretrain --attention=cudnn --patch-embed=conv,matmul
  python benchmarks/train_step.py --size=base --max-batch --remat=none,full   # largest per-device batch
  python benchmarks/train_step.py --size=tiny --torch               # side by side with timm's Beit (finetune)
MFU = model FLOPs per image x img/s / (bf16 peak x devices); remat recompute is not counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from beitv2_jax import roofline as hlo_roofline  # noqa: E402
from beitv2_jax import parallel  # noqa: E402
from beitv2_jax.data import pipeline  # noqa: E402
from beitv2_jax.models import attention as attention_lib  # noqa: E402
from beitv2_jax.config_defaults import base, tokenizer_model, vit_model  # noqa: E402
from beitv2_jax.train.loop import device_peak_flops, jit_step  # noqa: E402


def make_config(task: str, size: str, dtype: str, batch: int, remat: str, scan: bool, attention: str = "auto",
                **execution):
  """The benchmark's config of `task`; `execution`: model execution fields beyond these (add_norm,
  residual_dtype, patch_embed), left at their defaults when absent."""
  c = base(task)
  c.data.name = "synthetic:1024"
  c.batch_size = batch
  c.total_steps = 1000
  c.warmup_steps = 10
  m = vit_model(size, dtype=dtype, remat=remat, scan=scan, attention=attention, **execution)
  if task == "tokenizer":  # its blocks always run unrolled, without remat
    if remat != "none" or scan:
      raise ValueError("the tokenizer's blocks run unrolled and without remat: --remat=none, no --scan")
    m = tokenizer_model(size, dtype=dtype, attention=attention, **execution,
                        decoder_depth=3 if size != "tiny" else 1,
                        codebook_size=8192 if size != "tiny" else 512)
    c.teacher = "random"
    c.teacher_dtype = dtype
    # a CLIP-B/16-sized random teacher at base / large, a tiny one at tiny
    if size != "tiny":
      c.random_teacher.update(width=768, depth=12, heads=12, dim=512)
    c.optim.scale_lr_by_batch = False
  elif task == "pretrain":
    m.update(dict(init_values=0.1, drop_path_rate=0.1, early_layers=max(1, m.depth - 3), head_layers=2,
                  agg_init_style="torch"))
    c.mask.update(ratio=75 / 196, min_patches=16 if size != "tiny" else 4)
    c.tokenizer_path = "random"  # 8192 codes of dim 32
    c.tokenizer_dtype = dtype
    c.optim.clip_grad = 3.0
  elif task == "finetune":
    m.update(dict(init_values=0.1, drop_path_rate=0.1, final_norm="fc_norm", head_init_scale=0.001))
    c.num_classes = 1000  # config.aug: the official recipe's
    c.optim.layer_decay = 0.65
  c.model = m
  return c


def synthetic_batch(task_obj, task: str, batch: int) -> dict:
  """Host (numpy) batch with the fields and dtypes the task's pipeline produces."""
  size = task_obj.config.model.img_size
  rng = np.random.default_rng(0)
  b = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
       "label": rng.integers(0, 1000, (batch,), dtype=np.int32)}
  if task == "pretrain":
    b["mask"] = np.stack([task_obj.mask_generator(np.random.default_rng(i)).reshape(-1).astype(bool)
                          for i in range(batch)])
  if task == "finetune":
    b["erase"] = np.zeros((batch, size, size), np.uint8)
  return b


@dataclasses.dataclass
class Built:
  """A task ready to benchmark: its jitted (not yet compiled) step and what the step takes."""
  task: Any
  config: Any
  mesh: Any
  state_abs: Any
  shardings: Any
  step: Any
  host_batch: dict
  frozen: Any


def _build(task: str, size: str, dtype: str, batch: int, remat: str, scan: bool, attention: str,
           **execution) -> Built:
  from beitv2_jax.tasks import task_class as get_task_class
  import tempfile
  mesh = parallel.make_mesh()
  config = make_config(task, size, dtype, batch, remat, scan, attention, **execution)
  t = get_task_class(task)(config, tempfile.mkdtemp(), mesh)
  state_abs = jax.eval_shape(t.init_state, jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(state_abs, mesh)
  step = jit_step(t.train_step, shardings, mesh)
  frozen = jax.device_put(t.frozen, parallel.replicated(mesh)) if t.frozen is not None else None
  return Built(t, config, mesh, state_abs, shardings, step, synthetic_batch(t, task, batch), frozen)


def compiled_bytes(built: Built, batch: int) -> int:
  """Device bytes the compiled step needs at this global batch (arguments + outputs + temporaries -
  donated), from XLA's memory analysis, without running it."""
  batch_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype), built.host_batch)
  m = built.step.lower(built.state_abs, batch_abs, built.frozen).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench(task: str, size: str, dtype: str, batch: int, steps: int, remat: str = "none", scan: bool = False,
          attention: str = "auto", host_input: bool = False, profile_dir: str = "", **execution):
  """Times `steps` train steps on a device-resident batch; with host_input also the same steps fed from
  host memory every step, without and with DevicePrefetch (what the training loop does)."""
  built = _build(task, size, dtype, batch, remat, scan, attention, **execution)
  t, config, mesh, host_batch, frozen = built.task, built.config, built.mesh, built.host_batch, built.frozen
  state = jax.jit(t.init_state, out_shardings=built.shardings)(jax.random.PRNGKey(0))
  batch_arrays = parallel.to_global(host_batch, mesh)
  t0 = time.perf_counter()
  compiled = built.step.lower(state, batch_arrays, frozen).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = _xla_flops(compiled)

  def timed(next_batch) -> tuple[float, dict]:
    """Seconds per step (after two warm-up steps) and the last step's metrics."""
    nonlocal state
    for _ in range(2):  # warm-up
      state, metrics = compiled(state, next_batch(), frozen)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, next_batch(), frozen)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps, metrics

  dt, metrics = timed(lambda: batch_arrays)
  img_s = batch / dt
  peak = device_peak_flops()
  tflops = t.flops_per_example * img_s / 1e12
  mem = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    mem = stats.get("peak_bytes_in_use")
  except Exception:
    pass
  row = dict(task=task, size=size, dtype=dtype, batch=batch, remat=remat, scan=scan,
             attention=attention_lib.resolve(attention, config.model.dtype,
                                             config.model.embed_dim // config.model.num_heads),
             add_norm=config.model.add_norm, residual_dtype=config.model.residual_dtype,
             patch_embed=config.model.patch_embed,
             devices=jax.device_count(), device=jax.devices()[0].device_kind, step_ms=1000 * dt,
             img_per_sec=img_s, img_per_sec_per_device=img_s / jax.device_count(),
             gflops_per_img=t.flops_per_example / 1e9,
             xla_gflops_per_img=xla_flops / batch / 1e9 if xla_flops else None, model_tflops=tflops,
             mfu=(tflops * 1e12 / (peak * jax.device_count())) if peak else None,
             peak_mem_gb=mem / 2 ** 30 if mem else None, compile_s=compile_s, loss=float(metrics["loss"]),
             xla_flags=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
  if host_input:
    # a fresh host batch every step: put synchronously before each step, then through DevicePrefetch
    row["host_put_step_ms"] = 1000 * timed(lambda: parallel.to_global(host_batch, mesh))[0]
    pre = pipeline.DevicePrefetch(_Repeat(host_batch), lambda b: parallel.to_global(b, mesh), depth=2)
    row["prefetch2_step_ms"] = 1000 * timed(lambda: next(pre)[0])[0]
  if profile_dir:
    # 3 more steps under the profiler: the trace (TensorBoard / Perfetto / xprof) and a kernel table
    jax.profiler.start_trace(profile_dir)
    for _ in range(3):
      state, metrics = compiled(state, batch_arrays, frozen)
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    print_kernel_table(profile_dir, steps=3, hlo_text=compiled.as_text())
  assert np.isfinite(row["loss"]) and np.isfinite(row["step_ms"])
  return row


# First match wins: cuDNN's attention backward launches `cudnn::fusion::fmha_dbias` and `matmul_dq`
# beside its flash kernel, and cuBLAS on Hopper names its GEMMs `nvjet_*`.
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention", "matmul_dq")),
                ("matmul", ("nvjet", "gemm", "xmma", "cutlass", "gemv", "matmul", "dot")),
                ("collective", ("nccl", "all-reduce", "all_reduce", "all-gather", "reduce-scatter")))


def kernel_kind(name: str) -> str:
  low = name.lower()
  return next((k for k, keys in KERNEL_KINDS if any(x in low for x in keys)), "other")


def print_kernel_table(profile_dir: str, steps: int, top: int = 20, hlo_text: str = "") -> None:
  """Device time per kernel from the newest trace in profile_dir (device planes only: on a CPU there is
  none and this prints that), grouped into matmul / attention / collective / other. With the compiled
  module's HLO text, also each source op's measured time next to its roofline bound (beitv2_jax/roofline.py),
  largest gap first: where the step loses time against what the hardware allows."""
  import glob
  from collections import Counter
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    print(f"profile: no trace under {profile_dir}")
    return
  data = jax.profiler.ProfileData.from_file(paths[-1])
  per_kernel: Counter = Counter()
  per_hlo_op: Counter = Counter()  # the kernels' `hlo_op` stat: the HLO instruction that launched them
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    lines = list(plane.lines)
    # kernels as they ran on the streams; the "XLA Ops" line is the same time by HLO op, if no streams
    chosen = [l for l in lines if "stream" in l.name.lower()] or [l for l in lines if l.name == "XLA Ops"]
    for line in chosen:
      for ev in line.events:
        per_kernel[ev.name] += ev.duration_ns
        op = dict(getattr(ev, "stats", ()) or ()).get("hlo_op")
        if op:
          per_hlo_op[str(op)] += ev.duration_ns
  print(f"profile: trace {paths[-1]}")
  if not per_kernel:
    print("profile: no device kernels in the trace (a CPU run has none)")
    return
  total = sum(per_kernel.values())
  kinds: Counter = Counter()
  for name, ns in per_kernel.items():
    kinds[kernel_kind(name)] += ns
  print(f"profile: {total / steps / 1e6:.2f} ms of kernels per step; " +
        ", ".join(f"{k} {v / total:.1%}" for k, v in kinds.most_common()))
  for name, ns in per_kernel.most_common(top):
    print(f"  {ns / steps / 1e6:8.3f} ms/step {ns / total:6.1%}  {name[:110]}")
  machine = hlo_roofline.machine_for(jax.devices()[0].device_kind)
  if not (hlo_text and per_hlo_op and machine):
    print(f"profile: no roofline comparison (hlo_op stats: {len(per_hlo_op)}, roofline machine: {machine})")
    return
  rows, totals = hlo_roofline.measured_vs_bound(per_hlo_op, hlo_roofline.kernels(hlo_text, machine), steps)
  print(f"profile: roofline ({machine.name}): the matched kernels took {totals['measured_ms']:.2f} ms/step "
        f"against a bound of {totals['bound_ms']:.2f} ms (whole module {totals['bound_all_ms']:.2f} ms); "
        f"{totals['unmatched_ms']:.2f} ms/step of kernels matched no instruction")
  for r in rows[:top]:
    print(f"  {r['measured_ms']:8.3f} ms/step bound {r['bound_ms']:7.3f} ({r['efficiency']:5.1%}) {r['kernels']:4d}x "
          f"{r['category'][:18]:18s} {r['source'][-80:]}")


def _xla_flops(compiled) -> float | None:
  """XLA's own FLOP count of the compiled step (all ops, elementwise included): a check on the model count
  that MFU uses. None on GPUs: XLA:GPU's cost analysis leaves out its cuBLAS and cuDNN custom calls, which
  hold nearly all the FLOPs (an H200 reported 1.5 of the MIM step's 166 GFLOPs per image)."""
  if jax.default_backend() == "gpu":
    return None
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0)) or None
  except Exception:  # not every backend implements it
    return None


class _Repeat:
  """An endless host iterator over copies of one batch (with the get_state DevicePrefetch calls)."""

  def __init__(self, batch):
    self.batch, self.i = batch, 0

  def __next__(self):
    self.i += 1
    return {k: v.copy() for k, v in self.batch.items()}

  def get_state(self):
    return {"i": self.i}


def torch_finetune_step(size: str, batch: int, steps: int) -> dict:
  """timm's Beit (the same backbone) forward + backward + AdamW, on this CPU, for the side-by-side."""
  import torch
  import timm
  dims = vit_model(size)
  m = timm.create_model("beitv2_base_patch16_224", pretrained=False, img_size=dims.img_size,
                        patch_size=dims.patch_size, embed_dim=dims.embed_dim, depth=dims.depth,
                        num_heads=dims.num_heads, num_classes=1000, drop_path_rate=0.1)
  opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
  x = torch.randn(batch, 3, dims.img_size, dims.img_size)
  y = torch.randint(0, 1000, (batch,))

  def one():
    loss = torch.nn.functional.cross_entropy(m(x), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  for _ in range(2):
    one()
  t0 = time.perf_counter()
  for _ in range(steps):
    one()
  dt = (time.perf_counter() - t0) / steps
  return dict(task="finetune (timm, torch)", size=size, batch=batch, step_ms=1000 * dt, img_per_sec=batch / dt,
              threads=torch.get_num_threads())


def max_batch(task: str, size: str, dtype: str, remat: str, attention: str = "auto", **execution) -> dict:
  """Largest per-device batch that fits: the compiled step's bytes at two batch sizes give a linear
  model (fixed + per-example), its prediction for the device's memory is then run for real, stepping down
  by 10% on out-of-memory. Three compiles instead of a bisection's eight or more."""
  n = jax.device_count()
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    raise RuntimeError("the device reports no memory limit (CPU?): --max-batch needs an accelerator")
  b1, b2 = 32, 64
  built = _build(task, size, dtype, b1 * n, remat, False, attention, **execution)  # compiled at two batches
  m1, m2 = (compiled_bytes(built, b * n) for b in (b1, b2))
  del built
  per_example = (m2 - m1) / (b2 - b1)
  fixed = m1 - per_example * b1
  guess = int((0.97 * limit - fixed) // per_example)
  row = dict(task=task, size=size, dtype=dtype, remat=remat, **execution, bytes_limit_gb=limit / 2 ** 30,
             fixed_gb=fixed / 2 ** 30, mb_per_example=per_example / 2 ** 20, predicted_max=guess)
  b = guess
  for _ in range(4):
    try:
      r = bench(task, size, dtype, b * n, 3, remat, attention=attention, **execution)
      row.update(max_batch_per_device=b, img_per_sec=r["img_per_sec"], mfu=r["mfu"], peak_mem_gb=r["peak_mem_gb"])
      return row
    except Exception as e:  # out of memory
      if not any(s in str(e) for s in ("RESOURCE_EXHAUSTED", "Out of memory", "OOM", "out of memory")):
        raise
      b = int(b * 0.9)
  row["max_batch_per_device"] = None
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="tiny", choices=("tiny", "small", "base", "large"))
  ap.add_argument("--tasks", default="tokenizer,pretrain,finetune")
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU/TPU, float32 on CPU)")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: 32 tiny, 8 x devices otherwise)")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--remat", default="none")
  ap.add_argument("--scan", action="store_true")
  ap.add_argument("--attention", default="auto", help="comma list of auto | xla | cudnn, each timed")
  ap.add_argument("--add-norm", default="xla", help="comma list of xla | pallas (model.add_norm), each timed")
  ap.add_argument("--residual", default="float32",
                  help="comma list of float32 | bfloat16 (model.residual_dtype, opt-in numerics), each timed")
  ap.add_argument("--patch-embed", default="conv", help="comma list of conv | matmul (model.patch_embed), each timed")
  ap.add_argument("--host-input", action="store_true",
                  help="also time steps fed from host memory, without and with device prefetch")
  ap.add_argument("--profile", default="", help="trace 3 extra steps into this folder and print the kernels")
  ap.add_argument("--max-batch", action="store_true")
  ap.add_argument("--torch", action="store_true", help="also time timm's Beit fine-tune step (CPU side by side)")
  ap.add_argument("--json", default="", help="append the rows as JSON lines to this file")
  a = ap.parse_args()
  dtype = a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  batch = a.batch or (32 if a.size == "tiny" else 8 * jax.device_count())
  rows = []

  def emit(row):  # print and save each row as soon as it exists: a long GPU run keeps what it measured
    rows.append(row)
    print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(row) + "\n")

  for task in a.tasks.split(","):
    for attention in a.attention.split(","):
      for add_norm, residual, patch in itertools.product(a.add_norm.split(","), a.residual.split(","),
                                                         a.patch_embed.split(",")):
        execution = dict(add_norm=add_norm, residual_dtype=residual, patch_embed=patch)
        if a.max_batch:
          for remat in a.remat.split(",") if task != "tokenizer" else ["none"]:
            emit(max_batch(task, a.size, dtype, remat, attention, **execution))
          continue
        trace = (f"{task}_{attention}_{add_norm}" + ("" if residual == "float32" else f"_{residual}")
                 + ("" if patch == "conv" else f"_patch_{patch}"))
        emit(bench(task, a.size, dtype, batch, a.steps, a.remat, a.scan, attention, a.host_input,
                   os.path.join(a.profile, trace) if a.profile else "", **execution))
  if a.torch:
    emit(torch_finetune_step(a.size, batch, a.steps))
  return rows


if __name__ == "__main__":
  main()
