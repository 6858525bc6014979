"""The official ADE20K segmentation pipelines (semantic_segmentation/ configs on mmseg 0.x), per example, on
an RGB uint8 image and its uint8 annotation, driven by a `np.random.Generator` (grain seeds it per example).

Train: LoadAnnotations(reduce_zero_label) -> Resize((2048, 512), ratio 0.5-2.0, keep ratio) -> RandomCrop(512,
cat_max_ratio 0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize -> Pad(512; image 0, label 255).
Test: Resize((2048, 512), keep ratio), the whole image for sliding-window inference.
mmcv resizes with OpenCV (bilinear for images, nearest for labels) and converts to HSV with OpenCV, so this
does too (pixel-equal). Normalisation happens on the device; padding is recorded in `valid_pixels` (H, W) so
that the device sets padded pixels to 0 after normalising, as mmseg's Pad after Normalize does.

Data note: tfds' `scene_parse150` builder downloads ChallengeData2017's `annotations_instance` (instance maps),
not the 150-class semantic maps of ADEChallengeData2016 that the official ADE20K numbers use; those come as the
folder layout `images/{training,validation}/*.jpg` + `annotations/{training,validation}/*.png`.
"""
from __future__ import annotations

import numpy as np

IGNORE = 255


def _cv2():
  try:
    import cv2
  except ImportError as e:
    raise ImportError("segmentation transforms need OpenCV, as mmseg's: pip install opencv-python-headless "
                      "(or the package's [seg] extra)") from e
  return cv2


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """ADE20K: 0 ("other") -> 255 (ignored), class k -> k - 1."""
  label = np.array(label, np.uint8)  # mmseg LoadAnnotations, on uint8: 0 -> 255 -> 254 -> 255
  label[label == 0] = IGNORE
  label = label - 1
  label[label == IGNORE - 1] = IGNORE
  return label


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
  """An annotation must be one label per pixel of its image."""
  if label.ndim != 2 or label.shape != image.shape[:2]:
    raise ValueError(f"annotation of shape {label.shape} does not match its image of {image.shape[1]}x{image.shape[0]} "
                     "pixels (expected one class index per pixel, (H, W))")


def check_labels(label: np.ndarray, num_classes: int, reduce_zero: bool) -> None:
  """Every label (after reduce_zero_label) is a class in [0, num_classes) or IGNORE; num_classes 0: unchecked."""
  if not num_classes:
    return
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != IGNORE)]
  if bad.size:
    shown = [int(v) + (1 if reduce_zero else 0) for v in bad[:5]]
    raise ValueError(f"annotation holds class indices {shown} outside the {num_classes} classes "
                     f"(expected {'1..' + str(num_classes) if reduce_zero else '0..' + str(num_classes - 1)}"
                     f"{', 0 ignored' if reduce_zero else ''}, or {IGNORE} = ignore)")


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv.rescale_size(keep ratio): the largest size within (long edge <= max(scale), short edge <=
  min(scale)), rounded half up."""
  factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
  return int(width * factor + 0.5), int(height * factor + 0.5)


def rescale(image: np.ndarray, label, scale: tuple[int, int]):
  cv2 = _cv2()
  h, w = image.shape[:2]
  size = rescale_size(w, h, scale)
  image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
  if label is not None:
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
  return image, label


def crop_box(rng, h: int, w: int, crop: int) -> tuple[int, int, int, int]:
  """mmseg RandomCrop.get_crop_bbox: (y1, y2, x1, x2)."""
  top = int(rng.integers(0, max(h - crop, 0) + 1))
  left = int(rng.integers(0, max(w - crop, 0) + 1))
  return top, min(top + crop, h), left, min(left + crop, w)


def random_crop(rng, image, label, crop: int, cat_max_ratio: float = 0.75):
  """mmseg RandomCrop: up to 10 boxes until no class (ignore excluded) covers cat_max_ratio of the crop or
  more, keeping the last one tried."""
  h, w = image.shape[:2]
  y1, y2, x1, x2 = crop_box(rng, h, w, crop)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      classes, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
      counts = counts[classes != IGNORE]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y1, y2, x1, x2 = crop_box(rng, h, w, crop)
  return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(rng, image: np.ndarray, brightness_delta: int = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
  """mmseg PhotoMetricDistortion: brightness, contrast (before or after the HSV ops, at random), saturation,
  hue, each with probability 1/2, in its order of draws."""
  cv2 = _cv2()
  coin = lambda: int(rng.integers(2))
  if coin():
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = coin()
  if mode == 1 and coin():
    image = _convert(image, alpha=rng.uniform(*contrast))
  if coin():
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if coin():
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-hue_delta, hue_delta))) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0 and coin():
    image = _convert(image, alpha=rng.uniform(*contrast))
  return image


def pad_to(image: np.ndarray, label: np.ndarray, size: int) -> dict:
  """mmseg Pad(size): bottom / right padding to size x size; label 255 there, `valid_pixels` 0 there."""
  h, w = image.shape[:2]
  out = {"image": np.zeros((size, size, 3), np.uint8), "label": np.full((size, size), IGNORE, np.uint8),
         "valid_pixels": np.zeros((size, size), np.uint8)}
  out["image"][:h, :w], out["label"][:h, :w], out["valid_pixels"][:h, :w] = image, label, 1
  return out


class SegTrain:
  """The ADE20K training pipeline: rescale by U(0.5, 2) of (2048, 512), crop 512 (cat_max_ratio), flip,
  photometric distortion, pad."""
  segmentation = True  # the input pipeline hands it (image, annotation) arrays

  def __init__(self, crop: int = 512, scale=(2048, 512), ratio=(0.5, 2.0), cat_max_ratio: float = 0.75,
               reduce_zero: bool = True, num_classes: int = 0):
    self.crop, self.scale, self.ratio = crop, scale, ratio
    self.cat_max_ratio, self.reduce_zero, self.num_classes = cat_max_ratio, reduce_zero, num_classes

  def __call__(self, image: np.ndarray, label: np.ndarray, rng) -> dict:
    check_pair(image, label)
    if self.reduce_zero:
      label = reduce_zero_label(label)
    check_labels(label, self.num_classes, self.reduce_zero)
    r = rng.random() * (self.ratio[1] - self.ratio[0]) + self.ratio[0]
    image, label = rescale(image, label, (int(self.scale[0] * r), int(self.scale[1] * r)))
    image, label = random_crop(rng, image, label, self.crop, self.cat_max_ratio)
    if rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    image = photometric_distortion(rng, np.ascontiguousarray(image))
    return pad_to(image, np.ascontiguousarray(label), self.crop)


class SegEval:
  """The ADE20K test pipeline: rescale to (2048, 512) keeping the ratio; the label stays at its own size
  (metrics are taken at the original resolution, the scores resized back to it)."""
  segmentation = True

  def __init__(self, scale=(2048, 512), reduce_zero: bool = True, num_classes: int = 0):
    self.scale, self.reduce_zero, self.num_classes = scale, reduce_zero, num_classes

  def __call__(self, image: np.ndarray, label: np.ndarray, rng=None) -> dict:
    check_pair(image, label)
    label = reduce_zero_label(label) if self.reduce_zero else label
    check_labels(label, self.num_classes, self.reduce_zero)
    resized, _ = rescale(image, None, self.scale)
    return {"image": resized, "label": label}
