"""What a bfloat16 residual stream (`model.residual_dtype=bfloat16`, opt-in) does to MIM pretraining: the tiny
pretraining of the demo (depth 2, width 64, 32 px crops of the scikit-image photos, 40% block masking, on the
codes of one tiny VQ-KD trained first with a random CLIP teacher) with bfloat16 matmuls and the stream between
blocks in float32 (the official numerics) and in bfloat16, for several seeds each, side by side: the loss at
every log step, the masked-token accuracy on the training batches and on the held-out photos.

  python benchmarks/residual_precision.py [--steps 300] [--seeds 0,1,2] [--workdir DIR] [--json out.json]

The seeds set the MIM model's init, masks and data order (the tokenizer is shared), so the spread over seeds
is the run-to-run noise the two settings are compared against.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from beitv2_jax import main as entry  # noqa: E402
from beitv2_jax import demo  # noqa: E402
from beitv2_jax.config_defaults import load_config_file, with_updates  # noqa: E402
from beitv2_jax.train.writer import read_metrics  # noqa: E402

SETTINGS = ("float32", "bfloat16")


def configs(steps: int, tokenizer_steps: int):
  """(tokenizer config, pretrain config) of the demo's quick size, the random-teacher side."""
  c = load_config_file(os.path.join(ROOT, "configs", "demo.py"), "quick")
  c.teacher = ""
  (_, tok), = demo.sides(c)
  tok = with_updates(tok, {"total_steps": tokenizer_steps})
  pt = with_updates(c.pretrain, {"total_steps": steps, "warmup_steps": max(1, steps // 10),
                                 "log_every_steps": max(1, steps // 6), "model.dtype": "bfloat16"})
  return tok, pt


def run(steps: int, seeds: list[int], workdir: str, tokenizer_steps: int = 100) -> list[dict]:
  tok, pt = configs(steps, tokenizer_steps)
  tok_dir = os.path.join(workdir, "tokenizer")
  entry.run(tok, tok_dir)
  rows = []
  for seed in seeds:
    for residual in SETTINGS:
      wd = os.path.join(workdir, f"pretrain_{residual}_seed{seed}")
      final = entry.run(with_updates(pt, {"tokenizer_path": tok_dir, "seed": seed,
                                          "model.residual_dtype": residual}), wd)
      train = [m for m in read_metrics(wd) if "mlm_acc_1" in m]
      rows.append(dict(residual=residual, seed=seed, steps=[int(m["step"]) for m in train],
                       loss=[float(m["loss"]) for m in train], mlm_acc_1=float(train[-1]["mlm_acc_1"]),
                       majority=float(train[-1]["mlm_majority_acc"]),
                       eval_mlm_acc_1=float(final.get("eval_mlm_acc_1", float("nan")))))
  return rows


def table(rows: list[dict]) -> str:
  steps = rows[0]["steps"]
  lines = ["| residual | seed | " + " | ".join(f"loss @{s}" for s in steps)
           + " | mlm_acc_1 (train, last interval) | batch majority | mlm_acc_1 (held-out) |",
           "|---" * (len(steps) + 5) + "|"]
  for r in rows:
    lines.append(f"| {r['residual']} | {r['seed']} | " + " | ".join(f"{v:.4f}" for v in r["loss"])
                 + f" | {r['mlm_acc_1']:.4f} | {r['majority']:.4f} | {r['eval_mlm_acc_1']:.4f} |")
  for residual in SETTINGS:
    mine = [r for r in rows if r["residual"] == residual]
    acc = np.array([r["mlm_acc_1"] for r in mine])
    lines.append(f"| {residual}, mean of {len(mine)} | | " + " | ".join(
        f"{np.mean([r['loss'][i] for r in mine]):.4f}" for i in range(len(steps)))
                 + f" | {acc.mean():.4f} (seeds {acc.min():.4f}-{acc.max():.4f}) | |"
                 + f" {np.mean([r['eval_mlm_acc_1'] for r in mine]):.4f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--tokenizer-steps", type=int, default=100)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
  p.add_argument("--json", default="", help="append every run's row to this JSON-lines file")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  workdir = a.workdir or tempfile.mkdtemp(prefix="residual_precision_")
  rows = run(a.steps, seeds, workdir, a.tokenizer_steps)
  print("\n" + table(rows), flush=True)
  if a.json:
    with open(a.json, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
