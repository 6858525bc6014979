"""The ADE20K pipelines (data/seg_transforms.py) against a transcription of mmseg 0.x's transforms (Resize with
ratio_range, RandomCrop with cat_max_ratio, RandomFlip, PhotoMetricDistortion on BGR images, Pad) drawing
from the same generator: pixel-equal images, labels and padding."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from beitv2_jax.data import seg_transforms as st  # noqa: E402


class _NpRandom:
  """numpy.random's module functions mmseg calls, drawn from one Generator."""

  def __init__(self, rng):
    self.rng = rng

  def random_sample(self):
    return self.rng.random()

  rand = random_sample

  def randint(self, lo, hi=None):
    return int(self.rng.integers(lo, hi)) if hi is not None else int(self.rng.integers(lo))

  def uniform(self, lo, hi):
    return self.rng.uniform(lo, hi)


def _mmseg_train(img_rgb, seg, random, crop=512, img_scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max=0.75):
  """mmseg's train pipeline as its code reads, on a BGR image (mmcv.imread), from LoadAnnotations to Pad;
  returns RGB (Normalize(to_rgb=True) would swap the channels)."""
  img = img_rgb[:, :, ::-1].copy()
  gt = seg.copy()  # LoadAnnotations(reduce_zero_label=True)
  gt[gt == 0] = 255
  gt = gt - 1
  gt[gt == 254] = 255
  ratio = random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]  # Resize
  scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
  h, w = img.shape[:2]
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  size = int(w * f + 0.5), int(h * f + 0.5)
  img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
  gt = cv2.resize(gt, size, interpolation=cv2.INTER_NEAREST)

  def bbox():  # RandomCrop.get_crop_bbox
    oh = random.randint(0, max(img.shape[0] - crop, 0) + 1)
    ow = random.randint(0, max(img.shape[1] - crop, 0) + 1)
    return oh, oh + crop, ow, ow + crop
  b = bbox()
  for _ in range(10):
    labels, cnt = np.unique(gt[b[0]:b[1], b[2]:b[3]], return_counts=True)
    cnt = cnt[labels != 255]
    if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max:
      break
    b = bbox()
  img, gt = img[b[0]:b[1], b[2]:b[3]], gt[b[0]:b[1], b[2]:b[3]]
  if random.rand() < 0.5:  # RandomFlip
    img, gt = np.flip(img, axis=1), np.flip(gt, axis=1)
  img = np.ascontiguousarray(img)

  def convert(x, alpha=1, beta=0):  # PhotoMetricDistortion
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
  if random.randint(2):
    img = convert(img, beta=random.uniform(-32, 32))
  mode = random.randint(2)
  if mode == 1 and random.randint(2):
    img = convert(img, alpha=random.uniform(0.5, 1.5))
  if random.randint(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=random.uniform(0.5, 1.5))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if random.randint(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if mode == 0 and random.randint(2):
    img = convert(img, alpha=random.uniform(0.5, 1.5))
  pad_img = np.zeros((crop, crop, 3), np.uint8)  # Pad(size=crop, pad_val=0, seg_pad_val=255)
  pad_gt = np.full((crop, crop), 255, np.uint8)
  pad_img[:img.shape[0], :img.shape[1]], pad_gt[:gt.shape[0], :gt.shape[1]] = img, gt
  return pad_img[:, :, ::-1], pad_gt, img.shape[:2]


def _scene(seed, h=150, w=220):
  """A smooth colour image and a label map of 5 regions (0 = ADE's 'other' among them)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 127 / (h + w) + 60)], -1)
  img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
  seg = (1 + (xx // (w // 3)) + 3 * (yy > h // 2)).astype(np.uint8)
  seg[:10] = 0
  return img, seg


def test_train_pipeline_matches_mmseg():
  """40 seeds, a 150x220 scene scaled by 0.5-2 of (2048, 512) -> crops of 96 px from ~130-520 px images (both
  smaller and larger than the crop: padding and cropping)."""
  t = st.SegTrain(crop=96, scale=(256, 64))
  padded = 0
  for seed in range(40):
    img, seg = _scene(seed)
    ours = t(img, seg, np.random.default_rng(seed))
    ref_img, ref_gt, (h, w) = _mmseg_train(img, seg, _NpRandom(np.random.default_rng(seed)), crop=96,
                                           img_scale=(256, 64))
    np.testing.assert_array_equal(ours["image"], ref_img, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(ours["label"], ref_gt, err_msg=f"seed {seed}")
    valid = np.zeros((96, 96), np.uint8)
    valid[:h, :w] = 1
    np.testing.assert_array_equal(ours["valid_pixels"], valid)
    padded += int(ours["valid_pixels"].min() == 0)
  assert 0 < padded < 40


def test_label_and_size_rules():
  np.testing.assert_array_equal(st.reduce_zero_label(np.array([0, 1, 150, 255], np.uint8)), [255, 0, 149, 255])
  assert st.rescale_size(640, 480, (2048, 512)) == (683, 512)  # short edge bound
  assert st.rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # long edge bound
  img, seg = _scene(0)
  out = st.SegEval(scale=(2048, 512))(img, seg)
  assert out["image"].shape == (512, 751, 3) and out["label"].shape == seg.shape
  for t in (st.SegEval(), st.SegTrain()):
    with pytest.raises(ValueError, match=r"annotation of shape \(150, 219\) does not match its image of 220x150"):
      t(img, seg[:, :219], np.random.default_rng(0))


def test_crop_avoids_one_class_crops():
  """A label map 90% one class: cat_max_ratio 0.75 retries until a crop has no class over 75% (or 10 tries);
  without it most crops are mostly that class."""
  seg = np.full((200, 200), 1, np.uint8)
  seg[:, 170:] = 2
  img = np.zeros((200, 200, 3), np.uint8)
  share = lambda lab: np.unique(lab, return_counts=True)[1].max() / lab.size
  rng = np.random.default_rng(0)
  with_ratio = [share(st.random_crop(rng, img, seg, 40, 0.75)[1]) for _ in range(200)]
  without = [share(st.random_crop(rng, img, seg, 40, 1.0)[1]) for _ in range(200)]
  assert np.mean(np.array(with_ratio) < 0.75) > 0.5 and np.mean(np.array(without) < 0.75) < 0.2


def test_segmentation_sources_through_the_input_pipeline(tmp_path):
  """digits_on_photos in memory and written out as ADEChallengeData2016's folder layout: batches of padded
  crops with labels in the 3 digit classes or 255 (reduce_zero_label); the same pairs from the folder as from
  memory; a missing annotation, an RGB annotation, a size mismatch and a label outside the classes are
  one-line errors naming the files."""
  from PIL import Image

  from beitv2_jax.data import pipeline, seg_sources
  src = seg_sources.make_seg_source("digits_on_photos:24", "train")
  assert len(src) == 20 and src.num_classes == 4
  ann = np.stack(src.annotations)
  assert set(np.unique(ann)) == set(range(4)) and 0.1 < np.mean(ann > 0) < 0.6
  t = st.SegTrain(crop=32, scale=(128, 32))
  batch = next(iter(pipeline.train_dataset(src, t, 8, seed=0, read_threads=0)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8, 32, 32)
  assert set(np.unique(batch["label"])) <= set(range(3)) | {255} and batch["valid_pixels"].shape == (8, 32, 32)
  root = tmp_path / "ade"
  for sub in ("images/training", "annotations/training"):
    (root / sub).mkdir(parents=True)
  for i in range(len(src)):
    Image.fromarray(src.images[i]).save(root / "images/training" / f"a{i:03d}.png")
    Image.fromarray(src.annotations[i]).save(root / "annotations/training" / f"a{i:03d}.png")
  folder = seg_sources.make_seg_source(f"folder:{root}", "train")
  from_folder = next(iter(pipeline.train_dataset(folder, t, 8, seed=0, read_threads=0)))
  for k in ("image", "label", "valid_pixels"):
    np.testing.assert_array_equal(from_folder[k], batch[k])
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "annotations/training" / "a000.png")
  with pytest.raises(ValueError, match=r"a000.png: annotation of shape \(5, 5\) does not match"):
    list(pipeline.eval_batches(folder, st.SegEval(scale=(128, 32)), 4))
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "annotations/training" / "a000.png")
  with pytest.raises(ValueError, match="a000.png is a RGB image: expected a single-channel PNG"):
    list(pipeline.eval_batches(folder, st.SegEval(scale=(128, 32)), 4))
  Image.fromarray(src.annotations[0]).save(root / "annotations/training" / "a000.png")
  ann9 = src.annotations[2].copy()
  ann9[:2, :2] = 9
  Image.fromarray(ann9).save(root / "annotations/training" / "a002.png")
  list(pipeline.eval_batches(folder, st.SegEval(scale=(128, 32), reduce_zero=False, num_classes=10), 4))
  with pytest.raises(ValueError, match=r"a002.png: annotation holds class indices \[9\] outside the 4 classes"):
    list(pipeline.eval_batches(folder, st.SegEval(scale=(128, 32), reduce_zero=False, num_classes=4), 4))
  with pytest.raises(ValueError, match=r"a002.png: annotation holds class indices \[9\] outside the 3 classes"):
    next(iter(pipeline.train_dataset(folder, st.SegTrain(crop=32, scale=(128, 32), num_classes=3), 20, seed=0,
                                     read_threads=0)))
  (root / "annotations/training" / "a001.png").unlink()
  with pytest.raises(ValueError, match="1 images in .* have no annotation PNG in .*: a001"):
    seg_sources.make_seg_source(f"folder:{root}", "train")
