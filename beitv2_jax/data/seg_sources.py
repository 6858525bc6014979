"""Segmentation datasets: images with a class index per pixel (an annotation PNG, or an array).

- `folder:<root>`: ADEChallengeData2016's layout, `root/images/{training,validation}/<name>.jpg` with
  `root/annotations/{training,validation}/<name>.png` (or `root/images/*` + `root/annotations/*`, 1 pair in 10
  held out). Annotations are single-channel PNGs of class indices (ADE20K: 0 = "other", 1..150).
- `digits_on_photos[:N]`: offline, for tests and tiny runs: N crops of the scikit-image photos with one to three
  scikit-learn digits pasted on them; the digit's stroke pixels are class digit + 1, the rest 0 (ignored with
  reduce_zero_label, as ADE20K's "other"), so 10 classes are scored.
"""
from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

from beitv2_jax.data.sources import IMAGE_EXTENSIONS, _holdout


class SegFolderSource:
  """Image / annotation file pairs; records carry both files' bytes and the image's path."""

  def __init__(self, images: list[str], annotations: list[str], name: str, num_classes: Optional[int] = None):
    self.images, self.annotations, self.name, self.num_classes = images, annotations, name, num_classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    out = {"path": self.images[i], "annotation_path": self.annotations[i], "index": np.int64(i)}
    for key, path in (("image_bytes", self.images[i]), ("annotation_bytes", self.annotations[i])):
      try:
        with open(path, "rb") as f:
          out[key] = f.read()
      except OSError:
        out[key] = b""
    return out


class SegArraySource:
  """In-memory images (H, W, 3) and annotations (H, W), uint8."""

  def __init__(self, images, annotations, name: str, num_classes: int):
    self.images, self.annotations, self.name, self.num_classes = images, annotations, name, num_classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "annotation": self.annotations[i], "index": np.int64(i)}


def seg_folder(root: str, split: str, holdout: int = 10) -> SegFolderSource:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"segmentation folder not found: {root}")
  sub = {"train": "training", "val": "validation", "validation": "validation", "test": "validation"}.get(split, split)
  images_dir, ann_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
  split_dirs = os.path.isdir(images_dir)
  if not split_dirs:
    images_dir, ann_dir = os.path.join(root, "images"), os.path.join(root, "annotations")
  if not os.path.isdir(images_dir) or not os.path.isdir(ann_dir):
    raise FileNotFoundError(f"{root}: expected images/ and annotations/ folders (with training/ and validation/ "
                            "inside, as ADEChallengeData2016, or the files directly)")
  stems = lambda d, exts: {os.path.splitext(f)[0]: os.path.join(d, f) for f in sorted(os.listdir(d))
                           if f.lower().endswith(exts)}
  images = stems(images_dir, tuple(e.lower() for e in IMAGE_EXTENSIONS))
  annotations = stems(ann_dir, (".png",))
  missing = sorted(set(images) - set(annotations))
  if missing:
    raise ValueError(f"{len(missing)} images in {images_dir} have no annotation PNG in {ann_dir}: "
                     f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
  names = sorted(images)
  if not names:
    raise ValueError(f"{images_dir} contains no images")
  if not split_dirs:
    names = [names[i] for i in _holdout(len(names), split, holdout)]
  return SegFolderSource([images[n] for n in names], [annotations[n] for n in names], f"folder:{images_dir}")


def digits_on_photos(split: str, n: int = 240, size: int = 64, seed: int = 0) -> SegArraySource:
  from PIL import Image
  from sklearn.datasets import load_digits

  from beitv2_jax.data.sources import photos
  rng = np.random.default_rng(seed)
  d = load_digits()
  backgrounds = photos("all").images
  images, annotations = [], []
  for _ in range(n):
    photo = backgrounds[int(rng.integers(len(backgrounds)))]
    top, left = int(rng.integers(photo.shape[0] - size + 1)), int(rng.integers(photo.shape[1] - size + 1))
    im = photo[top:top + size, left:left + size].astype(np.float32)
    ann = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
      k = int(rng.integers(len(d.images)))
      side = int(rng.integers(size // 4, size // 2 + 1))
      glyph = Image.fromarray((d.images[k] * 255 / 16).astype(np.uint8))
      glyph = np.asarray(glyph.resize((side, side), Image.BILINEAR))
      y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
      stroke = glyph > 96
      colour = rng.integers(0, 256, 3).astype(np.float32)
      patch = im[y:y + side, x:x + side]
      patch[stroke] = colour
      ann[y:y + side, x:x + side][stroke] = d.target[k] + 1
    images.append(im.astype(np.uint8))
    annotations.append(ann)
  idx = _holdout(n, split, 6)
  return SegArraySource([images[i] for i in idx], [annotations[i] for i in idx], f"digits_on_photos/{split}", 10)


def make_seg_source(name: str, split: str):
  kind, _, arg = name.partition(":")
  if kind == "folder":
    return seg_folder(arg, split)
  if kind == "digits_on_photos":
    return digits_on_photos(split, int(arg) if arg else 240)
  raise ValueError(f"unknown segmentation dataset {name!r}: expected folder:<root> (ADEChallengeData2016 layout) "
                   "or digits_on_photos[:N]")


def decode_annotation(record: dict) -> tuple[np.ndarray, bool]:
  """(H, W) uint8 class indices, ok. A corrupt file gives ok=False; a multi-channel annotation is an error."""
  if "annotation" in record:
    return np.asarray(record["annotation"], np.uint8), True
  from PIL import Image
  try:
    im = Image.open(io.BytesIO(record["annotation_bytes"]))
    im.load()
  except Exception:
    return np.zeros((1, 1), np.uint8), False
  if im.mode not in ("L", "P"):
    raise ValueError(f"annotation {record.get('annotation_path', '')} is a {im.mode} image: expected a "
                     "single-channel PNG of class indices")
  return np.asarray(im, np.uint8), True
