"""Segmentation datasets: images with a class index per pixel (an annotation PNG, or an array).

- `folder:<root>`: ADEChallengeData2016's layout, `root/images/{training,validation}/<name>.jpg` with
  `root/annotations/{training,validation}/<name>.png` (or `root/images/*` + `root/annotations/*`, 1 pair in 10
  held out). Annotations are single-channel PNGs of class indices (ADE20K: 0 = "other", 1..150).
- `synthetic[:N[:classes]]`: random ADE20K-sized pairs (compile checks, benchmarks).
- `digits_on_photos[:N]`: offline, for tests and tiny runs: N crops of the scikit-image photos with one to three
  tiles showing a scikit-learn digit pasted on them (digits_on_photos below; 4 classes, the photo included).
"""
from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

from beitv2_jax.data.sources import IMAGE_EXTENSIONS, _holdout

# ADEChallengeData2016: training images and classes ("other" = 0 not counted); the synthetic stand-in's defaults
ADE20K_TRAIN_SIZE, ADE20K_CLASSES = 20210, 150


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


class SyntheticSegSource:
  """n random ADE20K-sized images (512 x 683) with labels in [0, num_classes) in 32 px blocks: for compile
  checks and benchmarks (beitv2_jax.aot's stand-in for a dataset). Valid with and without reduce_zero_label."""

  def __init__(self, n: int, num_classes: int = ADE20K_CLASSES, size: tuple[int, int] = (512, 683)):
    self.n, self.num_classes, self.size, self.name = n, num_classes, size, f"synthetic:{n}:{num_classes}"

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    h, w = self.size
    blocks = rng.integers(0, self.num_classes, (-(-h // 32), -(-w // 32)), dtype=np.uint8)
    label = np.repeat(np.repeat(blocks, 32, 0), 32, 1)[:h, :w]
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "annotation": label, "index": np.int64(i)}


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


# The tile colour of digits 0, 1, 2: hues 120 degrees apart, so that PhotoMetricDistortion's hue shift (up to 36
# degrees) keeps them apart.
_TILE_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float32)


def digits_on_photos(split: str, n: int = 240, size: int = 64, seed: int = 0) -> SegArraySource:
  """n crops (size x size) of the scikit-image photos with one to three digit tiles pasted on each: a
  scikit-learn 0, 1 or 2 drawn on a square 5/16 to 1/2 of the crop wide, red, green or blue by the digit (each
  channel jittered by up to 40), the ink the square's complement; the whole square is labelled 1 + the digit,
  the photo 0 (4 classes, all scored). A tiny ViT finds the tiles and tells them apart in a few hundred steps
  on a CPU; a label or class-order bug anywhere in the pipeline shows as a low mIoU. 1 image in 6 is held out."""
  from PIL import Image
  from sklearn.datasets import load_digits

  from beitv2_jax.data.sources import photos
  rng = np.random.default_rng(seed)
  d = load_digits(n_class=len(_TILE_COLOURS))
  backgrounds = photos("all").images
  images, annotations = [], []
  for _ in range(n):
    photo = backgrounds[int(rng.integers(len(backgrounds)))]
    top, left = int(rng.integers(photo.shape[0] - size + 1)), int(rng.integers(photo.shape[1] - size + 1))
    im = photo[top:top + size, left:left + size].copy()
    ann = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
      k = int(rng.integers(len(d.images)))
      side = int(rng.integers(size * 5 // 16, size // 2 + 1))
      glyph = Image.fromarray((d.images[k] * 255 / 16).astype(np.uint8)).resize((side, side), Image.BILINEAR)
      ink = np.asarray(glyph, np.float32)[..., None] / 255.0
      colour = np.clip(_TILE_COLOURS[d.target[k]] + rng.integers(-40, 41, 3), 0, 255)
      tile = ink * (255.0 - colour) + (1.0 - ink) * colour
      y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
      im[y:y + side, x:x + side] = np.round(tile).astype(np.uint8)
      ann[y:y + side, x:x + side] = d.target[k] + 1
    images.append(im)
    annotations.append(ann)
  idx = _holdout(n, split, 6)
  return SegArraySource([images[i] for i in idx], [annotations[i] for i in idx], f"digits_on_photos/{split}",
                        len(_TILE_COLOURS) + 1)


def make_seg_source(name: str, split: str):
  kind, _, arg = name.partition(":")
  if kind == "folder":
    return seg_folder(arg, split)
  if kind == "digits_on_photos":
    return digits_on_photos(split, int(arg) if arg else 240)
  if kind == "synthetic":  # synthetic[:N[:classes]]
    n, _, classes = arg.partition(":")
    return SyntheticSegSource(int(n) if n else ADE20K_TRAIN_SIZE, int(classes) if classes else ADE20K_CLASSES)
  raise ValueError(f"unknown segmentation dataset {name!r}: expected folder:<root> (ADEChallengeData2016 layout), "
                   "digits_on_photos[:N] or synthetic[:N[:classes]]")


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
