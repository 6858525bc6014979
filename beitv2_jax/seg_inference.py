"""Whole-image inference with a segmenter (models/upernet.py), as mmseg 0.x's test mode does it: the image
rescaled by the test pipeline, scored by sliding windows of the crop size, the scores resized back to the
image and the class with the highest score taken per pixel. Used by the `segment` task's evaluation and by
`beitv2_jax.load(...)` on a segmentation workdir (`m.segment(image)`); docs/method.md §4.3.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.data import transforms
from beitv2_jax.models.upernet import resize_bilinear


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """mmseg EncoderDecoder.slide_inference's windows (y1, y2, x1, x2), row by row: a grid of stride `stride`,
  the last window in each direction moved back to end at the border."""
  rows = max(height - crop + stride - 1, 0) // stride + 1
  cols = max(width - crop + stride - 1, 0) // stride + 1
  out = []
  for r in range(rows):
    for c in range(cols):
      y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
      out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
  return out


def slide_inference(scores_fn: Callable, image: np.ndarray, num_classes: int, crop: int = 512,
                    stride: int = 341) -> np.ndarray:
  """Class scores (H, W, C) of one image (H, W, 3), as mmseg's slide mode: every window's scores at the
  window's size, summed where windows overlap and divided by the overlap count. `scores_fn(windows, valid)`
  takes the (n, crop, crop, 3) windows (the image's dtype) with an (n, crop, crop) mask of the image's pixels and
  returns (n, crop, crop, C) scores (the logits resized to the crop). A window smaller than `crop` (an image side
  below it) is padded to `crop` (mask False there) and its scores cropped back: the BEiT backbone takes one size,
  where mmseg would feed the smaller window as it is."""
  h, w = image.shape[:2]
  windows = slide_windows(h, w, crop, stride)
  batch = np.zeros((len(windows), crop, crop, image.shape[2]), image.dtype)
  valid = np.zeros((len(windows), crop, crop), bool)
  for k, (y1, y2, x1, x2) in enumerate(windows):
    batch[k, :y2 - y1, :x2 - x1] = image[y1:y2, x1:x2]
    valid[k, :y2 - y1, :x2 - x1] = True
  logits = np.asarray(scores_fn(batch, valid), np.float32)
  scores = np.zeros((h, w, num_classes), np.float32)
  count = np.zeros((h, w, 1), np.float32)
  for k, (y1, y2, x1, x2) in enumerate(windows):
    scores[y1:y2, x1:x2] += logits[k, :y2 - y1, :x2 - x1]
    count[y1:y2, x1:x2] += 1
  return scores / count


def resize_bilinear_host(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False) of one (H, W, C) array on the host, as
  models.upernet.resize_bilinear (half-pixel centres, no antialiasing): every image has its own size, and a
  device resize would compile once per size."""
  for axis, (n_in, n_out) in enumerate(zip(x.shape[:2], size)):
    if n_in == n_out:
      continue
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32).reshape((-1, 1) if axis == 0 else (1, -1))[..., None]
    x = np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
  return x


def normalised_images(windows_uint8: jax.Array, valid) -> jax.Array:
  """ImageNet-normalised images with the padding set to 0 after normalisation (mmseg's Pad follows
  Normalize; slide_inference's padded windows likewise)."""
  x = transforms.imagenet_normalize(windows_uint8)
  return x if valid is None else x * valid[..., None].astype(x.dtype)


def segment_logits(module, variables, images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """A segmenter's main-head logits (auxiliary head dropped) in float32, resized to `size`, as mmseg's
  encode_decode returns them."""
  return resize_bilinear(module.apply(variables, images)[0].astype(jnp.float32), size)


def window_scores_fn(module, crop: int) -> Callable:
  """jitted (variables, windows uint8 (n, crop, crop, 3), valid (n, crop, crop)) -> (n, crop, crop, C) float32
  scores of a segmenter (its main head's logits resized to the crop)."""
  def scores(variables, windows, valid):
    return segment_logits(module, variables, normalised_images(windows, valid), (crop, crop))
  return jax.jit(scores)


def class_map(scores_fn: Callable, image: np.ndarray, out_shape: tuple[int, int], num_classes: int, crop: int,
              stride: int) -> np.ndarray:
  """(H', W') int class indices of `image` (already rescaled by the test pipeline) scored by sliding windows,
  the scores resized to `out_shape` (the original image's, where the labels are)."""
  scores = slide_inference(scores_fn, image, num_classes, crop, stride)
  return np.argmax(resize_bilinear_host(scores, tuple(out_shape)), -1).astype(np.int32)
