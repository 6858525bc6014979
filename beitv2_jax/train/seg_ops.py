"""What semantic segmentation trains and evaluates with, as the official `semantic_segmentation/` (mmseg 0.x)
does: the per-pixel loss with the ignore label, sliding-window inference, and mIoU / mAcc / aAcc over a
dataset (docs/method.md §4.3). NHWC throughout; the model is models/upernet.py.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models.upernet import resize_bilinear

IGNORE = 255  # ADE20K with reduce_zero_label: "other" (0) becomes 255, the 150 classes 0..149


def seg_loss(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE) -> jax.Array:
  """mmseg CrossEntropyLoss(ignore_index=255) on logits resized (bilinear, align_corners=False) to the label
  size: per-pixel cross-entropy, 0 at ignored pixels, averaged over ALL pixels, ignored ones included (mmseg
  0.x's `weight_reduce_loss(reduction='mean')`; `avg_non_ignore` came later, off by default)."""
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != ignore
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.mean(jnp.where(valid, nll, 0.0))


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
  models.upernet.resize_bilinear (half-pixel centres, no antialiasing): for evaluation, where every image has
  its own size and a device resize would compile once per size."""
  for axis, (n_in, n_out) in enumerate(zip(x.shape[:2], size)):
    if n_in == n_out:
      continue
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32).reshape((-1, 1) if axis == 0 else (1, -1))[..., None]
    x = np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
  return x


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int = IGNORE):
  """mmseg intersect_and_union of one image: per-class pixel counts (intersection, union, predicted,
  labelled) over the pixels whose label is not `ignore`."""
  keep = label != ignore
  pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
  if label.size and (label.min() < 0 or label.max() >= num_classes):
    raise ValueError(f"labels outside [0, {num_classes}) other than the ignore label {ignore}: "
                     f"{sorted(set(np.unique(label[(label < 0) | (label >= num_classes)]).tolist()))[:5]}")
  inter = np.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
  area_pred = np.bincount(pred, minlength=num_classes)[:num_classes]
  area_label = np.bincount(label, minlength=num_classes)[:num_classes]
  return inter, area_pred + area_label - inter, area_pred, area_label


def segmentation_metrics(totals) -> dict:
  """mIoU, mAcc (means over the classes present: a class with no labelled and no predicted pixel is NaN and
  left out, as mmseg's nanmean) and aAcc from per-class totals (intersection, union, predicted, labelled)."""
  inter, union, _, label = (np.asarray(t, np.float64) for t in totals)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou, acc = inter / union, inter / label
  return {"mIoU": float(np.nanmean(iou)), "mAcc": float(np.nanmean(acc)), "aAcc": float(inter.sum() / label.sum()),
          "IoU": iou}
