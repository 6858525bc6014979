"""Input-pipeline throughput: images/s per worker process for each task's transform on ImageNet-sized
JPEGs (made from the photos that ship in scikit-image), side by side with the official recipe's
torchvision transforms on the same files when torchvision is installed; then the whole grain pipeline
(decode + transform + batch) with N worker processes.

  python benchmarks/input_pipeline.py [--images 200] [--workers 0,2] [--seconds 5]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from beitv2_jax.data import masking, pipeline, sources, transforms  # noqa: E402


def make_jpegs(folder: str, n: int) -> list[str]:
  """n JPEGs of ImageNet's typical size (~500x375, quality 90) cut from the scikit-image photos."""
  photos = sources.photos("all").images
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "x"), exist_ok=True)
  paths = []
  for i in range(n):
    p = Image.fromarray(photos[i % len(photos)])
    w, h = p.size
    s = rng.uniform(0.6, 1.0)
    box = (0, 0, int(w * s), int(h * s))
    im = p.crop(box).resize((500, 375), Image.BICUBIC)
    path = os.path.join(folder, "x", f"{i:05d}.jpg")
    im.save(path, quality=90)
    paths.append(path)
  return paths


def ours(size: int) -> dict:
  mg = masking.MaskingGenerator((size // 16, size // 16), 75 if size == 224 else int(0.4 * (size // 16) ** 2))
  return {"tokenizer": transforms.TokenizerTrain(size), "pretrain (MIM, 2 views + mask)": transforms.MIMTrain(size, mg),
          "finetune": transforms.FinetuneTrain(size), "eval": transforms.EvalTransform(size)}


def official(size: int) -> dict:
  """The official recipes in torchvision / timm terms (docs/method.md §2, §3.4, §4.1)."""
  try:
    from torchvision import transforms as T
  except Exception:
    return {}
  bicubic = T.InterpolationMode.BICUBIC
  out = {
      "tokenizer": T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
                              T.RandomHorizontalFlip(), T.ToTensor()]),
      "pretrain (MIM, 2 views + mask)": _official_mim(T, size),
      "eval": T.Compose([T.Resize(int(size / 0.875), interpolation=bicubic), T.CenterCrop(size), T.ToTensor()]),
  }
  try:
    from timm.data import create_transform
    out["finetune"] = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                       interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
  except Exception:
    pass
  return out


def _official_mim(T, size: int):
  """DataAugmentationForBEiT: jitter, flip, one RandomResizedCrop box resized twice (bicubic), ToTensor +
  Normalize for view 1, ToTensor for view 2, plus the block mask."""
  import torchvision.transforms.functional as F
  jitter, flip = T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()
  rrc = T.RandomResizedCrop(size, scale=(0.2, 1.0))
  norm = T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  mg = masking.MaskingGenerator((size // 16, size // 16), 75 if size == 224 else int(0.4 * (size // 16) ** 2))
  rng = np.random.default_rng(0)

  def fn(im):
    im = flip(jitter(im))
    i, j, h, w = rrc.get_params(im, rrc.scale, rrc.ratio)
    v1 = F.resized_crop(im, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC)
    v2 = F.resized_crop(im, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC)
    return norm(F.to_tensor(v1)), F.to_tensor(v2), mg(rng)
  return fn


def _tolerant(t, im):
  """timm's RandAugment calls ImageOps.posterize(img, 0) at the top magnitudes, which Pillow >= 10 rejects
  (our RandAugment returns the black image older Pillow gave); such a draw is simply counted."""
  try:
    return t(im)
  except ValueError:
    return None


def per_process_rate(fn, files: list[str], seconds: float) -> float:
  """Decode + transform, one process, images/s."""
  rng = np.random.default_rng(0)
  n, t0, i = 0, time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds:
    with open(files[i % len(files)], "rb") as f:
      im = Image.open(io.BytesIO(f.read())).convert("RGB")
    fn(im, rng)
    n, i = n + 1, i + 1
  return n / (time.perf_counter() - t0)


def grain_rate(folder: str, transform, workers: int, seconds: float, batch: int = 64) -> float:
  src = sources.folder(folder, "all")
  it = iter(pipeline.train_dataset(src, transform, batch, seed=0, num_workers=workers, read_threads=0 if workers else 4))
  next(it)  # start-up
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - t0)


def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--images", type=int, default=200)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--seconds", type=float, default=4.0)
  ap.add_argument("--workers", default="0,2")
  a = ap.parse_args()
  folder = tempfile.mkdtemp()
  files = make_jpegs(folder, a.images)
  print(f"{len(files)} JPEGs of 500x375 in {folder}; {os.cpu_count()} CPUs", flush=True)
  print("| transform | ours (img/s/process) | official torchvision/timm (img/s/process) |")
  print("|---|---|---|")
  theirs = official(a.size)
  for name, fn in ours(a.size).items():
    r = per_process_rate(fn, files, a.seconds)
    t = theirs.get(name)
    tr = per_process_rate(lambda im, rng: _tolerant(t, im), files, a.seconds) if t is not None else None
    print(f"| {name} | {r:.0f} | {f'{tr:.0f}' if tr else 'n/a'} |", flush=True)
  mim = ours(a.size)["pretrain (MIM, 2 views + mask)"]
  for w in [int(x) for x in a.workers.split(",")]:
    print(f"grain pipeline, MIM transform, {w} worker processes: {grain_rate(folder, mim, w, a.seconds):.0f} img/s",
          flush=True)


if __name__ == "__main__":
  main()
