"""Segmentation loss and mIoU (train/seg_ops.py), sliding-window inference (seg_inference.py) against
transcriptions of mmseg 0.x's code in PyTorch / numpy."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from beitv2_jax.models.upernet import resize_bilinear  # noqa: E402
from beitv2_jax import seg_inference  # noqa: E402
from beitv2_jax.train import seg_ops  # noqa: E402


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_loss_matches_mmseg_cross_entropy_with_the_ignore_label():
  """Logits at 1/4 resized to the labels, CE with ignore_index 255, mean over all pixels (ignored count as 0);
  ~30% of the pixels ignored so that a mean over the valid pixels only differs."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 8, 8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 32, 32)).astype(np.int32)
  labels[rng.random((2, 32, 32)) < 0.3] = 255
  ours = float(seg_ops.seg_loss(jnp.asarray(logits), jnp.asarray(labels)))
  up = F.interpolate(_nchw(logits), size=(32, 32), mode="bilinear", align_corners=False)
  ref = F.cross_entropy(up, torch.from_numpy(labels).long(), reduction="none", ignore_index=255).mean().item()
  assert ours == pytest.approx(ref, rel=1e-5)


def _mmseg_slide(logits_fn, img, num_classes, crop, stride):
  """mmseg EncoderDecoder.slide_inference, batch 1, NCHW torch (encode_decode resizes to the crop)."""
  _, _, h_img, w_img = img.shape
  h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
  w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
  preds = img.new_zeros((1, num_classes, h_img, w_img))
  count_mat = img.new_zeros((1, 1, h_img, w_img))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * stride, w_idx * stride
      y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      crop_img = img[:, :, y1:y2, x1:x2]
      out = logits_fn(crop_img)
      crop_seg_logit = F.interpolate(out, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
      preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
      count_mat[:, :, y1:y2, x1:x2] += 1
  return preds / count_mat


def test_slide_inference_matches_mmseg():
  """A 100x170 image, 64 px windows at stride 43 (the official 512 / 341 scaled), 'model' = a fixed 1x1
  projection then 4x average pooling (logits at 1/4 like UperNet): the same scores as mmseg's loop."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  image = rng.normal(size=(100, 170, 3)).astype(np.float32)

  def ours_fn(batch, valid):
    assert valid.all()  # every window lies inside this image
    x = jnp.asarray(batch) @ w
    n, h, ww, c = x.shape
    return resize_bilinear(x.reshape(n, h // 4, 4, ww // 4, 4, c).mean(axis=(2, 4)), (h, ww))

  def torch_fn(crop):
    x = torch.einsum("nchw,cd->ndhw", crop, torch.from_numpy(w))
    return F.avg_pool2d(x, 4)

  ours = seg_inference.slide_inference(ours_fn, image, 4, crop=64, stride=43)
  ref = _mmseg_slide(torch_fn, _nchw(image[None]), 4, 64, 43)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  assert seg_inference.slide_windows(100, 170, 64, 43) == [
      (0, 64, 0, 64), (0, 64, 43, 107), (0, 64, 86, 150), (0, 64, 106, 170),
      (36, 100, 0, 64), (36, 100, 43, 107), (36, 100, 86, 150), (36, 100, 106, 170)]


def test_a_window_smaller_than_the_crop_is_padded_and_cropped_back():
  """A 40x100 image under 64 px windows: two windows of 40 rows, padded below (mask False there); each pixel's
  score is its own where one window covers it, the mean of the two where they overlap."""
  image = np.arange(40 * 100 * 3, dtype=np.float32).reshape(40, 100, 3)
  seen = []

  def scores_fn(batch, valid):
    seen.append((batch.copy(), valid.copy()))
    return batch[..., :1] + 1000 * np.arange(len(batch))[:, None, None, None]

  out = seg_inference.slide_inference(scores_fn, image, 1, crop=64, stride=43)
  batch, valid = seen[0]
  assert batch.shape == (2, 64, 64, 3) and valid[:, :40].all() and not valid[:, 40:].any()
  assert not batch[:, 40:].any()
  np.testing.assert_array_equal(out[:, :36, 0], image[:, :36, 0])  # only window 0 (x 0..64)
  np.testing.assert_array_equal(out[:, 64:, 0], image[:, 64:, 0] + 1000)  # only window 1 (x 36..100)
  np.testing.assert_array_equal(out[:, 36:64, 0], image[:, 36:64, 0] + 500)


@pytest.mark.parametrize("size", [(23, 57), (8, 9), (31, 12)])
def test_host_resize_is_torch_bilinear(size):
  """Evaluation's host resize against F.interpolate(bilinear, align_corners=False), up, down and mixed."""
  x = np.random.default_rng(2).normal(size=(13, 17, 5)).astype(np.float32)
  ours = seg_inference.resize_bilinear_host(x, size)
  ref = F.interpolate(_nchw(x[None]), size=size, mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _mmseg_metrics(preds, labels, num_classes, ignore=255):
  """mmseg.core.evaluation.metrics (intersect_and_union with torch.histc, then total_area_to_metrics)."""
  tot = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
  for p, l in zip(preds, labels):
    p, l = torch.from_numpy(p), torch.from_numpy(l)
    m = l != ignore
    p, l = p[m], l[m]
    inter = p[p == l]
    ai = torch.histc(inter.float(), bins=num_classes, min=0, max=num_classes - 1)
    ap = torch.histc(p.float(), bins=num_classes, min=0, max=num_classes - 1)
    al = torch.histc(l.float(), bins=num_classes, min=0, max=num_classes - 1)
    for t, v in zip(tot, (ai, ap + al - ai, ap, al)):
      t += v.double()
  iou, acc = tot[0] / tot[1], tot[0] / tot[3]
  return {"aAcc": (tot[0].sum() / tot[3].sum()).item(), "mIoU": np.nanmean(iou.numpy()),
          "mAcc": np.nanmean(acc.numpy())}


def test_metrics_match_mmseg():
  """3 images of 6 classes, class 5 never labelled nor predicted (NaN, left out of the means), ignored
  pixels predicted as anything."""
  rng = np.random.default_rng(2)
  labels = [rng.integers(0, 5, (9, 13)) for _ in range(3)]
  preds = [np.where(rng.random(l.shape) < 0.6, l, rng.integers(0, 5, l.shape)) for l in labels]
  for l in labels:
    l[rng.random(l.shape) < 0.2] = 255
  totals = [sum(t) for t in zip(*[seg_ops.intersect_and_union(p, l, 6) for p, l in zip(preds, labels)])]
  ours = seg_ops.segmentation_metrics(totals)
  ref = _mmseg_metrics(preds, labels, 6)
  for k in ("aAcc", "mIoU", "mAcc"):
    assert ours[k] == pytest.approx(ref[k], rel=1e-12), k
  assert np.isnan(ours["IoU"][5]) and 0.5 < ours["aAcc"] < 0.8
  with pytest.raises(ValueError, match=r"labels outside \[0, 6\)"):
    seg_ops.intersect_and_union(preds[0], np.full((9, 13), 7), 6)
