"""Every ImageNet recipe compiled for the Cloud TPU slices it is sized for, on this machine (no TPU):
one `python -m beitv2_jax.aot` run per row, its result appended to a JSON-lines file, and the table that
benchmarks/RESULTS.md ("Cloud TPU slices") and the README quote.

  python benchmarks/tpu_slices.py --out=benchmarks/tpu_slices.jsonl            # all rows (hours on 2 cores)
  python benchmarks/tpu_slices.py --out=... --rows=0,3                         # some rows
  python benchmarks/tpu_slices.py --render=benchmarks/tpu_slices.jsonl         # the markdown table

A ViT-B step takes ~4 minutes to compile for a TPU on 2 CPU cores and ~10 GB of memory, a ViT-L step more.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (recipe, slice, extra flags): the slices each config's docstring names, then the other generations.
ROWS = [
    ("configs/pretrain_base.py:epochs=1600", "tpu:v4-32", ""),
    ("configs/tokenizer_base.py", "tpu:v4-8", ""),
    ("configs/finetune_base.py", "tpu:v4-8", ""),
    ("configs/linprobe_base.py", "tpu:v4-8", ""),
    ("configs/pretrain_base.py:epochs=1600", "tpu:v5e-64", ""),
    ("configs/pretrain_base.py:epochs=1600", "tpu:v6e-64", ""),
    ("configs/pretrain_base.py:epochs=1600", "tpu:v5p-32", ""),
    ("configs/finetune_large.py", "tpu:v4-16", ""),
    ("configs/pretrain_large.py:epochs=1600", "tpu:v4-64", ""),
    ("configs/pretrain_large.py:epochs=1600", "tpu:v5p-64", ""),
    ("configs/pretrain_base.py:epochs=300", "tpu:v4-32", ""),
    ("configs/pretrain_base.py:epochs=1600", "tpu:v4-64", ""),
    ("configs/tokenizer_base.py", "tpu:v5e-8", ""),
    ("configs/finetune_base.py", "tpu:v5e-8", ""),
    ("configs/pretrain_base.py:epochs=1600", "tpu:v5e-256", ""),
    ("configs/pretrain_large.py:epochs=1600", "tpu:v6e-256", ""),
    ("configs/segment_base.py", "tpu:v4-8", ""),
    ("configs/segment_large.py", "tpu:v4-16", ""),
]


def command(recipe: str, target: str, extra: str, out: str) -> list[str]:
  dump = os.path.join(os.path.dirname(os.path.abspath(out)), "hlo")  # the compiled modules, for a later look
  return ([sys.executable, "-m", "beitv2_jax.aot", f"--config={recipe}", f"--target={target}", f"--json={out}",
           f"--dump={dump}"] + extra.split())


def run(rows: list[int], out: str):
  for i in rows:
    recipe, target, extra = ROWS[i]
    cmd = command(recipe, target, extra, out)
    print(f"[{i}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(r.stdout + r.stderr[-2000:] + f"[{i}] exit {r.returncode} after {time.time() - t0:.0f} s\n", flush=True)


# The device kind of each generation (what jax reports), for rows written before the rows carried it.
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def render(path: str) -> str:
  """The markdown table of a JSON-lines file the rows wrote (the last row of each recipe and slice). Where
  the compiled module was dumped beside it, the roofline is read again from it (with the current
  beitv2_jax/roofline.py)."""
  sys.path.insert(0, ROOT)
  from beitv2_jax import aot, roofline
  rows = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      rows[(r["config"], r["target"], r["fsdp"], r["remat"])] = r
  for r in rows.values():
    hlo = os.path.join(os.path.dirname(os.path.abspath(path)), "hlo", aot.dump_name(r["config"], r["target"]))
    kind = r.get("device_kind") or DEVICE_KINDS[r["target"][4:].split("-")[0]]
    if os.path.exists(hlo) and r.get("model_tflop"):
      with open(hlo) as f:
        ms = sum(k.ms for k in roofline.kernels(f.read(), roofline.machine_for(kind)))
      r["roofline_ms"] = ms
      r["roofline_mfu"] = r["model_tflop"] * 1e12 / (ms * 1e-3) / (roofline.machine_for(kind).peak_tflops * 1e12)
  lines = ["| recipe | slice | chips (hosts) | batch / chip | fsdp, remat | compiles | GiB per chip (of) | fits "
           "| XLA / model FLOPs | roofline step | MFU bound | compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows.values():
    fits = "yes" if r["fits"] else ("no" + (f"; `{r['fits_with']}` fits" if r.get("fits_with") else ""))
    flops = (f"{r['xla_tflop'] / r['model_tflop']:.3f}" if r.get("model_tflop") else "")
    step = f"{r['roofline_ms']:.0f} ms" if r.get("roofline_ms") else ""
    mfu = f"{r['roofline_mfu']:.0%}" if r.get("roofline_mfu") else ""
    lines.append(f"| `{r['config'].replace('configs/', '')}` | {r['target'][4:]} | {r['chips']} ({r['hosts']}) | "
                 f"{r['batch'] // r['chips']} | {r['fsdp']}, {r['remat']} | {'yes' if r['compiled'] else 'NO'} | "
                 f"{r['gib_per_chip']:.1f} ({r['hbm_gib']:.1f}) | {fits} | {flops} | {step} | {mfu} | "
                 f"{r['compile_s']:.0f} s |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="benchmarks/tpu_slices.jsonl")
  ap.add_argument("--rows", default="", help="comma list of row indices (default: all)")
  ap.add_argument("--render", default="", help="print the markdown table of this JSON-lines file and exit")
  a = ap.parse_args()
  if a.render:
    print(render(a.render))
    return
  run([int(i) for i in a.rows.split(",")] if a.rows else list(range(len(ROWS))), a.out)


if __name__ == "__main__":
  main()
