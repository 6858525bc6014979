"""Teacher targets computed once (config.teacher_cache_views > 0; not in the official recipe).

The official tokenizer runs its teacher on every training view. On a CPU a real teacher (the DINOv2 ViT-S/14
the demo uses costs ~35 ms per 112 px view on 2 cores) dwarfs the tiny tokenizer's step, so with the cache
on, `n` augmented views are drawn once (the tokenizer's own training transform, view i from image
i mod len(source), seeded by (seed, i)), the teacher's targets of those views are computed once, and
training cycles through the fixed (view, target) pairs. What changes: the tokenizer sees n distinct views
instead of a fresh augmentation each step, and the targets are stored in float16 (~1e-3 relative).

The cache is a file in the run's workdir (WORKDIR/teacher_targets.npz, plain arrays, read with
allow_pickle=False) written atomically, so a resumed run reuses it; a file made for other settings (its
`fingerprint` differs) is rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.data import pipeline, transforms

FILE = "teacher_targets.npz"


class CachedViews:
  """The fixed (view, teacher target) pairs as a data source: records carry `teacher_target`."""

  def __init__(self, images: np.ndarray, targets: np.ndarray, name: str):
    self.images, self.targets, self.name = images, targets, name
    self.num_classes = 1

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "teacher_target": self.targets[i], "label": np.int32(0), "index": np.int64(i)}


class AsStored:
  """The transform of cached views: the stored view as it is, and its teacher target passed through."""
  record_fields = ("teacher_target",)

  def __call__(self, im, rng) -> dict:
    return {"image": np.asarray(im)}


def draw_views(source, transform, n: int, seed: int) -> np.ndarray:
  """n augmented uint8 views: view i from record i mod len(source), its augmentation seeded by (seed, i)."""
  example = pipeline.ExampleFn(source, transform)  # unreadable images are replaced as in training
  return np.stack([example(source[i % len(source)], np.random.default_rng([seed, i]))["image"] for i in range(n)])


def teacher_targets(teacher, params, views: np.ndarray, grid: int, batch: int = 64) -> np.ndarray:
  """The teacher's targets of uint8 views, as the training step computes them, in float16."""
  fn = jax.jit(lambda p, x: teacher.apply(p, transforms.to_unit(x), grid))
  out = []
  for i in range(0, len(views), batch):
    chunk = views[i:i + batch]
    pad = batch - len(chunk)  # one compiled shape for every chunk
    x = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
    out.append(np.asarray(fn(params, jnp.asarray(x)), np.float32)[:len(chunk)].astype(np.float16))
  return np.concatenate(out)


def load_or_build(workdir: str, fingerprint: dict, source, transform, teacher, params, grid: int, n: int,
                  seed: int) -> CachedViews:
  """The cached views of this run: read from WORKDIR/teacher_targets.npz when it was made for the same
  `fingerprint`, else drawn, run through the teacher and written (by process 0, atomically)."""
  path = os.path.join(workdir, FILE)
  key = json.dumps(fingerprint, sort_keys=True)
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) == key:
        return CachedViews(f["images"], f["targets"], f"{FILE} ({n} views)")
    logging.warning("%s was made for other settings: rebuilding it", path)
  start = time.time()
  images = draw_views(source, transform, n, seed)
  targets = teacher_targets(teacher, params, images, grid)
  if not np.isfinite(targets).all():
    raise FloatingPointError(f"the teacher's targets of the cached views are not finite in float16 "
                             f"(max |x| {np.abs(targets.astype(np.float32)).max()}): turn teacher_cache_views off")
  message = (f"teacher targets of {n} views computed once in {time.time() - start:.0f} s "
             f"({teacher.source}); training reuses them (teacher_cache_views)")
  logging.info(message)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images, targets=targets, fingerprint=np.asarray(key))
    os.replace(tmp, path)
    print(f"[tokenizer] {message}", flush=True)
  return CachedViews(images, targets, f"{FILE} ({n} views)")
