"""What semantic segmentation trains and scores with, as the official `semantic_segmentation/` (mmseg 0.x)
does: the per-pixel loss with the ignore label and mIoU / mAcc / aAcc over a dataset (docs/method.md §4.3).
NHWC throughout; the model is models/upernet.py, whole-image inference seg_inference.py.
"""
from __future__ import annotations

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
