"""Our augmentations against the code the official BEiT v2 recipes run: timm's RandAugment ops, RandomErasing and
Mixup / CutMix, torchvision's ColorJitter and RandomResizedCrop.

Where both sides make the same PIL call, the outputs must be pixel-equal; where they draw from a distribution,
two-sample KS / chi-square / binomial tests at p = 0.001 (a correct implementation fails one of them about once in
a thousand runs per statistic, and with the fixed seeds here not at all), with sample sizes that detect the
likely bugs (scale range ignored, ratio not log-uniform, always centred, fixed jitter order, no-op mixup, ...).
"""
import inspect
import itertools
import os
import random
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import auto_augment as aa
from timm.data import mixup as timm_mixup
from timm.data.random_erasing import RandomErasing, _get_pixels
from torchvision import transforms as tvt
from torchvision.transforms import functional as tvf

from beitv2_jax.data import masking, transforms
from beitv2_jax.train import finetune

P_MIN = 1e-3
DEMO_JPEG = "tests/data/official_demo/ILSVRC2012_val_00031649.JPEG"
# timm create_transform's RandAugment hparams for the BEiT v2 fine-tuning recipe: fill = the ImageNet mean in
# uint8, the bicubic train interpolation (not timm's random bilinear / bicubic choice).
TIMM_RA_HPARAMS = dict(translate_const=100, img_mean=(124, 116, 104), interpolation=Image.BICUBIC)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """torch's 2-thread pool on this 2-core machine, with another suite beside it, makes each small op take
  milliseconds (4000 RandomErasing calls: 17 s instead of 0.2 s)."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photo():
  return Image.open(os.path.join(os.path.dirname(os.path.dirname(__file__)), DEMO_JPEG)).convert("RGB")


def _same_distribution(ours, ref, what):
  res = stats.ks_2samp(np.asarray(ours, np.float64), np.asarray(ref, np.float64))
  assert res.pvalue > P_MIN, f"{what}: KS D={res.statistic:.4f}, p={res.pvalue:.2e} (n={len(ours)}, {len(ref)})"


def _same_counts(ours, ref, what):
  """Chi-square test of homogeneity of two count vectors over the same categories."""
  table = np.array([ours, ref])
  table = table[:, table.sum(0) > 0]
  res = stats.chi2_contingency(table)
  assert res.pvalue > P_MIN, f"{what}: chi2 p={res.pvalue:.2e}, ours {list(ours)}, reference {list(ref)}"


def _binomial(k, n, p, what):
  res = stats.binomtest(int(k), int(n), p)
  assert res.pvalue > P_MIN, f"{what}: {k}/{n} = {k / n:.4f}, expected {p}, p={res.pvalue:.2e}"


# ------------------------------------------------------------------------------------------------
# RandAugment (timm rand-m9-mstd0.5-inc1)
# ------------------------------------------------------------------------------------------------
def _posterize_old_pil(im, bits):
  """ImageOps.posterize as PIL < 10 had it, which timm 0.4.12 (the official pin) ran: bits=0 keeps no bit, a
  black image; PIL >= 10 raises for bits=0, so timm's own op cannot be the reference there."""
  mask = ~(2 ** (8 - bits) - 1)
  return im.point([i & mask for i in range(256)] * len(im.getbands()))


@pytest.mark.parametrize("name", aa._RAND_INCREASING_TRANSFORMS)
def test_rand_augment_op_matches_timm(name, photo, monkeypatch):
  """apply_op == timm AugmentOp(name, prob=1, magnitude=level) pixel for pixel (both make the same PIL call with
  the same argument), at magnitudes 0..10 and both signs for the ops that negate (SIGNED_OPS: those whose
  sign changes timm's output)."""
  changed, by_sign = 0, {}
  for level in (0, 3, 5, 9, 9.7, 10):
    for negative in (False, True):
      # timm negates when random.random() > 0.5, we when rng.random() < 0.5
      monkeypatch.setattr(aa, "random", types.SimpleNamespace(random=lambda: 0.75 if negative else 0.25))
      ours = np.asarray(transforms.apply_op(photo, name, float(level), negative))
      op = aa.AugmentOp(name, prob=1.0, magnitude=level, hparams=TIMM_RA_HPARAMS)
      try:
        ref = np.asarray(op(photo))
      except ValueError:
        assert name == "PosterizeIncreasing" and aa._posterize_increasing_level_to_arg(level, {})[0] == 0
        ref = np.asarray(_posterize_old_pil(photo, 0))
      np.testing.assert_array_equal(ours, ref, err_msg=f"{name} level {level} negative={negative}")
      changed += int(not np.array_equal(ref, np.asarray(photo)))
      if level == 9:
        by_sign[negative] = ref
  # timm negates exactly these ops' magnitudes (so rand_augment_plan draws a sign for them and no other)
  assert (name in transforms.SIGNED_OPS) == (not np.array_equal(by_sign[False], by_sign[True])), name
  assert changed >= 4, f"{name}: the reference hardly changes the photo, the comparison proves little"
  if name == "PosterizeIncreasing":  # the old-PIL stand-in is PIL's own posterize where PIL accepts the bits
    for bits in (1, 2, 4):
      np.testing.assert_array_equal(np.asarray(_posterize_old_pil(photo, bits)),
                                    np.asarray(aa.posterize(photo, bits)))


def test_rand_augment_config_matches_timm():
  """Op list = timm's increasing ('inc1') list in its order, 2 layers, each with prob 0.5 at magnitude 9,
  std 0.5: what timm's 'rand-m9-mstd0.5-inc1' builds; FinetuneTrain's defaults are that recipe."""
  ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_RA_HPARAMS))
  assert list(transforms.RAND_INCREASING_OPS) == aa._RAND_INCREASING_TRANSFORMS == [op.name for op in ra.ops]
  defaults = {k: v.default for k, v in inspect.signature(transforms.rand_augment).parameters.items()}
  assert defaults["num_layers"] == ra.num_layers == 2
  assert {op.prob for op in ra.ops} == {defaults["prob"]} == {0.5}
  assert {op.magnitude for op in ra.ops} == {defaults["magnitude"]} == {9}
  assert {op.magnitude_std for op in ra.ops} == {defaults["magnitude_std"]} == {0.5}
  assert ra.choice_weights is None  # uniform choice with replacement, as ours
  ft = transforms.FinetuneTrain(224)
  assert (ft.layers, ft.magnitude, ft.reprob, ft.scale) == (2, 9.0, 0.25, (0.08, 1.0))
  apply_defaults = {k: v.default for k, v in inspect.signature(transforms.apply_op).parameters.items()}
  assert apply_defaults["fill"] == TIMM_RA_HPARAMS["img_mean"]
  assert apply_defaults["resample"] == TIMM_RA_HPARAMS["interpolation"]


def test_rand_augment_sampling_matches_timm(monkeypatch):
  """Over 4000 images: how many of the 2 layers apply, which ops, and at what magnitude (N(9, 0.5) clipped to
  [0, 10]), against timm's RandAugment driving recording stand-ins for its ops."""
  n = 4000
  ours_ops, ours_levels, ours_count = [], [], []
  calls = []
  monkeypatch.setattr(transforms, "apply_op", lambda im, name, level, negate: (calls.append((name, level)), im)[1])
  rng, im = np.random.default_rng(0), Image.new("RGB", (4, 4))
  ours_pairs = []
  for _ in range(n):
    calls.clear()
    transforms.rand_augment(im, rng)
    ours_count.append(len(calls))
    ours_ops += [c[0] for c in calls]
    ours_levels += [c[1] for c in calls]
    if len(calls) == 2:
      ours_pairs.append(calls[0][0] == calls[1][0])

  ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_RA_HPARAMS))
  ref = []
  for op in ra.ops:  # the op's own sampling (prob, gauss, clip) runs; only the image work is replaced
    op.level_fn = lambda m, hp, name=op.name: (ref.append((name, m)), ())[1]
    op.aug_fn = lambda img, **kw: img
  random.seed(0)
  np.random.seed(0)
  ref_count, ref_pairs = [], []
  for _ in range(n):
    before = len(ref)
    ra(im)
    ref_count.append(len(ref) - before)
    if len(ref) - before == 2:
      ref_pairs.append(ref[-1][0] == ref[-2][0])
  names = list(aa._RAND_INCREASING_TRANSFORMS)
  _same_counts(np.bincount(ours_count, minlength=3), np.bincount(ref_count, minlength=3), "layers applied")
  _same_counts([ours_ops.count(k) for k in names], [sum(r[0] == k for r in ref) for k in names], "op choice")
  # drawn with replacement: the same op twice in 1 of 15 images that apply both layers
  _same_counts([sum(ours_pairs), len(ours_pairs) - sum(ours_pairs)], [sum(ref_pairs), len(ref_pairs) - sum(ref_pairs)],
               "same op twice")
  _same_distribution(ours_levels, [r[1] for r in ref], "magnitude")
  assert min(ours_levels) >= 0 and max(ours_levels) == 10.0  # clipped, and N(9, 0.5) exceeds 10 2% of the time


# ------------------------------------------------------------------------------------------------
# ColorJitter(0.4, 0.4, 0.4), torchvision
# ------------------------------------------------------------------------------------------------
class _JitterDraws:
  """Our jitter_draws' random draws, fixed: the op order (rng.permutation) and one factor per op (rng.uniform, drawn
  in the order the ops run). Records the ranges the factors were asked for."""

  def __init__(self, order, factors):
    self.order, self.factors, self.ranges, self.k = order, factors, [], 0

  def permutation(self, n):
    assert n == 3
    return np.array(self.order)

  def uniform(self, lo, hi):
    self.ranges.append((lo, hi))
    f = self.factors[self.order[self.k]]
    self.k += 1
    return f


def test_color_jitter_matches_torchvision_functional_ops(photo):
  """At fixed factors and each of the 6 orders: our jitter over the whole image (the box = the image) ==
  torchvision adjust_brightness / contrast / saturation applied in that order (all PIL ImageEnhance), pixel for
  pixel; the factor ranges are torchvision ColorJitter(0.4, 0.4, 0.4)'s."""
  im = photo.resize((160, 120), Image.BICUBIC)
  cj = tvt.ColorJitter(0.4, 0.4, 0.4)
  assert cj.hue is None
  tv_ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  factors = (0.65, 1.37, 0.8)  # brightness, contrast, saturation: far from 1, so the order shows
  outputs = set()
  for order in itertools.permutations(range(3)):
    draws = _JitterDraws(order, factors)
    ours = np.asarray(transforms.color_jitter_crop(im, (0, 0, *im.size), transforms.jitter_draws(draws)))
    ref = im
    for i in order:
      ref = tv_ops[i](ref, factors[i])
    np.testing.assert_array_equal(ours, np.asarray(ref), err_msg=f"order {order}")
    assert sorted(draws.ranges) == sorted([tuple(cj.brightness), tuple(cj.contrast), tuple(cj.saturation)])
    outputs.add(ours.tobytes())
  assert len(outputs) == 6  # the order matters at these factors: a fixed-order jitter fails above
  defaults = {k: v.default for k, v in inspect.signature(transforms.jitter_draws).parameters.items()}
  assert (defaults["brightness"], defaults["contrast"], defaults["saturation"]) == (0.4, 0.4, 0.4)
  assert transforms.MIMTrain(224, None).jitter == 0.4


def test_color_jitter_order_and_factor_distribution():
  """3000 draws: the frequency of each order and each op's factor distribution, against torchvision
  ColorJitter.get_params (randperm(4) with hue skipped, factors U[0.6, 1.4])."""
  n = 3000
  assert (transforms.BRIGHTNESS, transforms.CONTRAST, transforms.SATURATION) == (0, 1, 2)  # get_params' fn_idx
  rng = np.random.default_rng(1)
  ours_orders, ours_factors = [], [[], [], []]
  for _ in range(n):
    log = transforms.jitter_draws(rng)
    ours_orders.append(tuple(k for k, _ in log))
    for k, f in log:
      ours_factors[k].append(f)
  cj = tvt.ColorJitter(0.4, 0.4, 0.4)
  torch.manual_seed(1)
  ref_orders, ref_factors = [], [[], [], []]
  for _ in range(n):
    fn_idx, b, c, s, _ = tvt.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
    ref_orders.append(tuple(int(i) for i in fn_idx if i < 3))
    for k, f in enumerate((b, c, s)):
      ref_factors[k].append(f)
  perms = list(itertools.permutations(range(3)))
  assert set(ours_orders) <= set(perms)
  _same_counts([ours_orders.count(p) for p in perms], [ref_orders.count(p) for p in perms], "jitter order")
  for k, what in enumerate(("brightness", "contrast", "saturation")):
    assert 0.6 <= min(ours_factors[k]) and max(ours_factors[k]) <= 1.4
    _same_distribution(ours_factors[k], ref_factors[k], f"{what} factor")


# ------------------------------------------------------------------------------------------------
# The whole MIM and tokenizer transforms against the official order of torchvision ops
# ------------------------------------------------------------------------------------------------
def _official_mim_view(im, rng, size):
  """DataAugmentationForBEiT, written as the official code runs it, with torchvision's functional ops on our
  draws: ColorJitter on the WHOLE image, flip, the RandomResizedCrop box (scale 0.2-1) cut from the flipped
  image, crop-then-resize bicubic."""
  tv_ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  draws = transforms.jitter_draws(rng)
  for op, factor in draws:
    im = tv_ops[op](im, factor)
  flip = rng.random() < 0.5
  if flip:
    im = tvf.hflip(im)
  left, top, w, h = transforms.random_resized_crop_box(rng, *im.size, scale=(0.2, 1.0))
  view = tvf.resized_crop(im, top, left, h, w, [size, size], tvf.InterpolationMode.BICUBIC)
  return np.asarray(view), tuple(op for op, _ in draws), flip


def test_mim_transform_matches_the_official_order_pixel_for_pixel(photo):
  """MIMTrain jitters only the crop (with the whole image's mean grey for contrast, lookup tables for brightness
  and contrast) and flips the crop: the same pixels as jitter-whole-image, flip, crop, resize, for every jitter
  order (the saturation-before-contrast orders take the full-image path), both flips, many boxes; and the same
  rng draws, so the mask after them is the same too."""
  im = photo.resize((200, 150), Image.BICUBIC)
  mg = masking.MaskingGenerator((4, 4), 6, 2)
  t = transforms.MIMTrain(64, mg)
  seen = set()
  for seed in range(72):
    ex = t(im, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    ref, order, flip = _official_mim_view(im, rng, 64)
    np.testing.assert_array_equal(ex["image"], ref, err_msg=f"seed {seed}, order {order}, flip {flip}")
    np.testing.assert_array_equal(ex["mask"], mg(rng).reshape(-1))
    seen.add((order, flip))
  assert len(seen) == 12  # every order with and without the flip


def test_tokenizer_and_finetune_crops_match_torchvision_resized_crop(photo):
  """RandomResizedCrop + flip: torchvision crops the box, then resizes it (the one-pass resize(box=) differs at
  the crop's border); ours gives the same pixels."""
  im = photo.resize((200, 150), Image.BICUBIC)
  t = transforms.TokenizerTrain(48)
  flips = 0
  for seed in range(20):
    ours = t(im, np.random.default_rng(seed))["image"]
    rng = np.random.default_rng(seed)
    left, top, w, h = transforms.random_resized_crop_box(rng, *im.size, scale=(0.08, 1.0))
    ref = tvf.resized_crop(im, top, left, h, w, [48, 48], tvf.InterpolationMode.BICUBIC)
    flip = rng.random() < 0.5
    flips += flip
    np.testing.assert_array_equal(ours, np.asarray(tvf.hflip(ref) if flip else ref), err_msg=f"seed {seed}")
  assert 0 < flips < 20


# ------------------------------------------------------------------------------------------------
# RandomResizedCrop box, torchvision get_params
# ------------------------------------------------------------------------------------------------
OFFICIAL_RATIO = (3 / 4, 4 / 3)


@pytest.mark.parametrize("width,height,scale,ratio", [
    (500, 375, (0.08, 1.0), OFFICIAL_RATIO), (500, 375, (0.2, 1.0), OFFICIAL_RATIO),
    (64, 64, (0.08, 1.0), OFFICIAL_RATIO), (64, 64, (0.2, 1.0), OFFICIAL_RATIO),
    (500, 100, (0.08, 1.0), OFFICIAL_RATIO),  # the fallback in ~1/4 of the draws
    (500, 375, (0.08, 1.0), (1 / 2, 1.0))])  # a range not symmetric in log: which of w / h is the aspect shows
def test_random_resized_crop_box_distribution_matches_torchvision(width, height, scale, ratio):
  """4000 boxes each: area fraction, log aspect, relative placement left / (W - w), top / (H - h), against
  torchvision RandomResizedCrop.get_params."""
  n = 4000
  rng = np.random.default_rng(2)
  ours = np.array([transforms.random_resized_crop_box(rng, width, height, scale=scale, ratio=ratio)
                   for _ in range(n)])
  torch.manual_seed(2)
  img = torch.empty(3, height, width)
  ref = []
  for _ in range(n):
    top, left, h, w = tvt.RandomResizedCrop.get_params(img, list(scale), list(ratio))
    ref.append((left, top, w, h))
  ref = np.array(ref)
  for boxes in (ours, ref):
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] > 0)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= width) and np.all(boxes[:, 1] + boxes[:, 3] <= height)
  area = lambda b: b[:, 2] * b[:, 3] / (width * height)
  _same_distribution(area(ours), area(ref), "area fraction")
  _same_distribution(np.log(ours[:, 2] / ours[:, 3]), np.log(ref[:, 2] / ref[:, 3]), "log aspect")
  for axis, size, what in ((0, width, "left / (W - w)"), (1, height, "top / (H - h)")):
    rel = lambda b: b[b[:, 2 + axis] < size, axis] / (size - b[b[:, 2 + axis] < size, 2 + axis])
    _same_distribution(rel(ours), rel(ref), what)


@pytest.mark.parametrize("width,height", [(1000, 50), (50, 1000), (1200, 60)])
def test_random_resized_crop_fallback_matches_torchvision(width, height):
  """Images too elongated for any in-range box: all 10 tries fail and both take the same centred box."""
  rng = np.random.default_rng(3)
  torch.manual_seed(3)
  img = torch.empty(3, height, width)
  for _ in range(20):
    top, left, h, w = tvt.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
    assert transforms.random_resized_crop_box(rng, width, height) == (left, top, w, h)
  assert (w, h) != (width, height)


# ------------------------------------------------------------------------------------------------
# Random erasing, timm RandomErasing(0.25, mode='pixel', max_count=1)
# ------------------------------------------------------------------------------------------------
def _box(mask):
  """(top, left, h, w) of the one rectangle in a 2-d mask, None when empty."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not len(rows):
    return None
  top, left, h, w = rows[0], cols[0], rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
  assert mask.sum() == h * w, "not a rectangle"
  return top, left, h, w


@pytest.mark.parametrize("height,width", [(224, 224), (40, 24)])
def test_random_erasing_box_distribution_matches_timm(height, width):
  """6000 images: the probability an image is erased (binomial, p = 0.25), and of the erased boxes the area
  fraction, log aspect h / w and relative placement (KS), against timm RandomErasing on a zero tensor."""
  n = 6000
  ours_defaults = {k: v.default for k, v in inspect.signature(transforms.random_erasing_mask).parameters.items()}
  re = RandomErasing(probability=0.25, mode="pixel", device="cpu")
  assert ours_defaults["prob"] == re.probability and re.max_count == 1 and re.per_pixel
  assert ours_defaults["area"] == (re.min_area, re.max_area)
  assert ours_defaults["log_aspect"] == re.log_aspect_ratio
  rng = np.random.default_rng(4)
  ours = [_box(transforms.random_erasing_mask(rng, height, width)) for _ in range(n)]
  random.seed(4)
  torch.manual_seed(4)
  ref = [_box(re(torch.zeros(3, height, width)).numpy().any(0)) for _ in range(n)]
  ours_erased = np.array([b for b in ours if b is not None], np.float64)
  ref_erased = np.array([b for b in ref if b is not None], np.float64)
  _binomial(len(ours_erased), n, 0.25, "ours erased")
  _binomial(len(ref_erased), n, 0.25, "timm erased")
  area = lambda b: b[:, 2] * b[:, 3] / (height * width)
  _same_distribution(area(ours_erased), area(ref_erased), "erased area fraction")
  _same_distribution(np.log(ours_erased[:, 2] / ours_erased[:, 3]), np.log(ref_erased[:, 2] / ref_erased[:, 3]),
                     "erased log aspect")
  for axis, size, what in ((0, height, "top / (H - h)"), (1, width, "left / (W - w)")):
    rel = lambda b: b[:, axis] / (size - b[:, 2 + axis])  # timm erases only boxes smaller than the image
    _same_distribution(rel(ours_erased), rel(ref_erased), what)


def test_random_erasing_pixel_noise_matches_timm():
  """The device fill (apply_random_erasing): per pixel and per channel N(0, 1) inside the box, the image
  untouched outside; the values against timm's 'pixel' mode fill of the same boxes and against N(0, 1)."""
  rng = np.random.default_rng(5)
  masks = np.stack([transforms.random_erasing_mask(rng, 32, 32, prob=1.0) for _ in range(16)])
  images = jnp.asarray(np.random.default_rng(6).uniform(-2, 2, (16, 32, 32, 3)), jnp.float32)
  out = np.asarray(finetune.apply_random_erasing(jax.random.PRNGKey(0), images, jnp.asarray(masks)))
  inside = masks.astype(bool)
  np.testing.assert_array_equal(out[~inside], np.asarray(images)[~inside])
  values = out[inside]  # (pixels, 3)
  assert values.shape[0] > 1000
  assert not np.any(values == np.asarray(images)[inside])
  res = stats.kstest(values.reshape(-1), "norm")
  assert res.pvalue > P_MIN, f"erasing noise vs N(0, 1): KS D={res.statistic:.4f}, p={res.pvalue:.2e}"
  # per pixel and per channel: not one colour per box ('rand' mode), nor one value shared by the 3 channels
  assert abs(np.corrcoef(values[:, 0], values[:, 1])[0, 1]) < 0.05
  assert len(np.unique(values[:, 0])) > 0.99 * len(values)
  torch.manual_seed(5)
  ref = [_get_pixels(True, False, (3, h, w), device="cpu").numpy().reshape(-1)  # timm's fill of the same boxes
         for _, _, h, w in (_box(m) for m in masks)]
  _same_distribution(values.reshape(-1), np.concatenate(ref), "erasing noise vs timm pixel mode")


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix, timm Mixup(mode='batch', correct_lam=True, label_smoothing=0.1)
# ------------------------------------------------------------------------------------------------
H, W = 24, 40
# sqrt(1 - lam) = r gives cut sizes int(24 r) x int(40 r) far from integer boundaries (so float32 and float64 agree):
EVEN_CUTS = (0.27, 0.62, 0.77)  # (6, 10), (14, 24), (18, 30)
ODD_CUTS = (0.33, 0.46, 0.88)  # (7, 13), (11, 18), (21, 35)


def _official_rand_bbox(img_shape, lam, count, np_rng):
  """timm 0.4.12's rand_bbox (the version BEiT v2's requirements.txt pins): the box ends at cy + cut_h // 2, so an
  odd cut is one pixel shorter than cut_h. timm >= 1.0 (installed here) ends it at cy + (cut_h + 1) // 2; the
  even-size case of both is checked against the installed one below."""
  ratio = np.sqrt(1 - np.asarray(lam))
  img_h, img_w = img_shape[-2:]
  cut_h, cut_w = (img_h * ratio).astype(np.int64), (img_w * ratio).astype(np.int64)  # int(), for arrays too
  cy = np_rng.randint(0, img_h, size=count)
  cx = np_rng.randint(0, img_w, size=count)
  return (np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h),
          np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w))


def test_official_rand_bbox_is_installed_timm_for_even_cuts():
  """The 0.4.12 stand-in, drawn from the same numpy state as installed timm's rand_bbox: the same boxes for even
  cut sizes; for odd ones the same starts and an end one pixel shorter (before clipping)."""
  for r in EVEN_CUTS + ODD_CUTS:
    lam = 1 - r * r
    np.random.seed(7)
    installed = timm_mixup.rand_bbox((H, W), lam, count=500)
    official = _official_rand_bbox((H, W), lam, 500, np.random.RandomState(7))
    for i, (cut, size) in enumerate(((int(H * r), H), (int(H * r), H), (int(W * r), W), (int(W * r), W))):
      got, want = official[i], installed[i]
      if i % 2 == 0 or cut % 2 == 0:
        np.testing.assert_array_equal(got, want)
      else:
        inside = want < size
        np.testing.assert_array_equal(got[inside], want[inside] - 1)
        assert np.all((got[~inside] == size) | (got[~inside] == size - 1))
        assert np.any(inside)


def _cutmix_boxes(monkeypatch, lams, n, seed):
  """Our cutmix box for each lam, n draws: image 0 = zeros, image 1 = ones (so the pasted rectangle of image 0
  is where it reads 1), lam fixed by replacing the Beta draw. Returns {lam: (boxes (n, 4) yl yh xl xh,
  target lams (n,))}."""
  holder = {}
  monkeypatch.setattr(finetune, "sample_beta", lambda key, a, b: holder["lam"])
  x = jnp.stack([jnp.zeros((H, W, 1)), jnp.ones((H, W, 1))])
  labels = jnp.array([3, 7])

  @jax.jit
  def run(keys, lam):
    holder["lam"] = lam
    img, tgt = jax.vmap(lambda k: finetune.mixup_cutmix(k, x, labels, 10, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                        switch_prob=1.0))(keys)
    return img[:, 0, :, :, 0], tgt

  out = {}
  for lam in lams:
    img, tgt = jax.device_get(run(jax.random.split(jax.random.PRNGKey(seed), n), jnp.float32(lam)))
    assert set(np.unique(img)) <= {0.0, 1.0}
    boxes = []
    for m in img > 0.5:
      b = _box(m)
      boxes.append((0, 0, 0, 0) if b is None else (b[0], b[0] + b[2], b[1], b[1] + b[3]))
    out[lam] = np.array(boxes), (tgt[:, 0, 3] - 0.01) / 0.9  # target of image 0: lam * 0.91 + (1 - lam) * 0.01
  return out


def _compare_boxes(ours, ref, lam, what):
  area = lambda b: (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) / (H * W)
  _same_distribution(area(ours), area(ref), f"{what} lam {lam:.3f}: area fraction")
  for i, edge in enumerate(("yl", "yh", "xl", "xh")):
    _same_distribution(ours[:, i], ref[:, i], f"{what} lam {lam:.3f}: {edge}")


def test_cutmix_box_matches_timm_rand_bbox(monkeypatch):
  """3000 boxes per lam: edges and area against installed timm rand_bbox (even cut sizes, where every timm
  version agrees) and against timm 0.4.12's (odd sizes, where timm >= 1.0 makes the box a pixel longer); the
  target lam is 1 - pasted area / image area (correct_lam=True) for every draw."""
  n = 3000
  lams = [1 - r * r for r in EVEN_CUTS + ODD_CUTS]
  ours = _cutmix_boxes(monkeypatch, lams, n, seed=8)
  for r, lam in zip(EVEN_CUTS + ODD_CUTS, lams):
    boxes, target_lam = ours[lam]
    assert int(H * np.sqrt(np.float32(1) - np.float32(lam))) == int(H * r)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / (H * W)
    np.testing.assert_allclose(target_lam, 1 - area, atol=2e-6)
    np.random.seed(8)
    if r in EVEN_CUTS:
      ref = np.stack(timm_mixup.rand_bbox((H, W), lam, count=n), 1)
      _compare_boxes(boxes, ref, lam, "vs timm rand_bbox")
      _, ref_lam = timm_mixup.cutmix_bbox_and_lam((H, W), lam, correct_lam=True, count=n)
      # 1 - area, exact, not the float32 target lam: KS on a lattice of values needs the ties to be ties
      _same_distribution(1 - area, ref_lam, f"lam {lam:.3f}: corrected lam")
    else:
      ref = np.stack(_official_rand_bbox((H, W), lam, n, np.random.RandomState(8)), 1)
      _compare_boxes(boxes, ref, lam, "vs timm 0.4.12 rand_bbox")


def _patch_timm_draws(monkeypatch, lam, rand=0.0, randint=()):
  """timm Mixup's numpy draws, fixed: np.random.rand (apply, switch), np.random.beta (lam), np.random.randint
  (the cutmix centre, y then x)."""
  centre = iter(randint)
  monkeypatch.setattr(timm_mixup.np.random, "rand", lambda *a: rand)
  monkeypatch.setattr(timm_mixup.np.random, "beta", lambda a, b, size=None: lam)
  monkeypatch.setattr(timm_mixup.np.random, "randint", lambda lo, hi, size=None: next(centre))


def _timm_mix(x_nhwc, labels, **kw):
  mix = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, mode="batch", correct_lam=True,
                         label_smoothing=0.1, num_classes=10, **kw)
  x, t = mix(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))), torch.from_numpy(labels))
  return x.numpy().transpose(0, 2, 3, 1), t.numpy()


def test_mixup_matches_timm(monkeypatch):
  """Mixup at a fixed lam: images == lam x + (1 - lam) x.flip(0) and targets == timm mixup_target (smoothing
  0.1), from timm Mixup itself on the same batch (6 images, image i mixed with image 5 - i)."""
  x = np.random.default_rng(9).normal(size=(6, H, W, 3)).astype(np.float32)
  labels = np.array([0, 3, 3, 9, 1, 5])
  for lam in (0.2, 0.63):
    monkeypatch.setattr(finetune, "sample_beta", lambda key, a, b: jnp.float32(lam))
    img, tgt = finetune.mixup_cutmix(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(labels), 10,
                                     switch_prob=0.0)
    _patch_timm_draws(monkeypatch, lam)
    ref_img, ref_tgt = _timm_mix(x, labels, switch_prob=0.0)
    assert np.abs(ref_img - x).max() > 0.1
    np.testing.assert_allclose(np.asarray(img), ref_img, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tgt), ref_tgt, atol=1e-6)


def test_cutmix_matches_timm(monkeypatch):
  """CutMix at a fixed lam: our pasted rectangle comes from the mirror image, the rest is untouched, and image
  and targets equal timm Mixup's given the same centre (read back from our box)."""
  x = np.random.default_rng(10).normal(size=(6, H, W, 3)).astype(np.float32)
  labels = np.array([2, 3, 4, 9, 1, 5])
  for r in EVEN_CUTS:
    lam = 1 - r * r
    cut_h, cut_w = int(H * r), int(W * r)
    monkeypatch.setattr(finetune, "sample_beta", lambda key, a, b: jnp.float32(lam))
    for seed in range(4):
      img, tgt = finetune.mixup_cutmix(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(labels), 10,
                                       switch_prob=1.0)
      img = np.asarray(img)
      pasted = np.all(img == x[::-1], axis=(0, 3)) & ~np.all(img == x, axis=(0, 3))
      assert pasted.any(), f"lam {lam}: no rectangle of the mirror batch pasted"
      top, left, h, w = _box(pasted)
      untouched = np.ones((H, W), bool)
      untouched[top:top + h, left:left + w] = False
      np.testing.assert_array_equal(img[:, untouched], x[:, untouched])
      cy = top + cut_h // 2 if top > 0 else top + h - cut_h // 2
      cx = left + cut_w // 2 if left > 0 else left + w - cut_w // 2
      _patch_timm_draws(monkeypatch, lam, randint=(cy, cx))
      ref_img, ref_tgt = _timm_mix(x, labels, switch_prob=1.0)
      np.testing.assert_array_equal(img, ref_img)
      np.testing.assert_allclose(np.asarray(tgt), ref_tgt, atol=1e-6)


def test_mixup_cutmix_switch_and_lam_distribution_match_timm():
  """20000 batches with the recipe's draws (mixup 0.8, cutmix 1.0, switch 0.5): the cutmix frequency and the lam
  distributions of each branch (mixup: Beta(0.8, 0.8); cutmix: the area-corrected lam of a Beta(1, 1) box),
  against timm Mixup's own _params_per_batch draws (and timm 0.4.12's box), and mixup's lam against the
  Beta(0.8, 0.8) cdf (a Beta(1, 1) is at most 0.033 away from it: 10000 draws see that)."""
  n = 20000
  x = jnp.stack([jnp.zeros((H, W, 1)), jnp.ones((H, W, 1))])
  labels = jnp.array([3, 7])

  def one(key):  # what the test needs of image 0 (zeros, mixed with the ones): keeps the transfer small
    img, tgt = finetune.mixup_cutmix(key, x, labels, 10)
    img0 = img[0, :, :, 0]
    return (jnp.all((img0 == 0) | (img0 == 1)), jnp.sum(img0 == 1), img0[0, 0], jnp.max(img0) - jnp.min(img0),
            (tgt[0, 3] - 0.01) / 0.9)  # target of image 0: lam * 0.91 + (1 - lam) * 0.01

  keys = jax.random.split(jax.random.PRNGKey(11), n)
  is_cut, pasted, value, spread, lam = jax.device_get(jax.jit(jax.vmap(one))(keys))
  # mixup: image 0 becomes 1 - lam everywhere; cutmix: lam = 1 - pasted area (exact, so lattice values tie)
  assert spread[~is_cut].max() < 1e-6
  np.testing.assert_allclose(value[~is_cut], 1 - lam[~is_cut], atol=1e-5)
  cut_lam = 1 - pasted[is_cut] / (H * W)
  np.testing.assert_allclose(lam[is_cut], cut_lam, atol=2e-6)

  mix = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                         num_classes=10)
  np.random.seed(11)
  draws = [mix._params_per_batch() for _ in range(n)]
  ref_cut = np.array([c for _, c in draws])
  ref_lam = np.array([lam_ for lam_, _ in draws])
  _same_counts([is_cut.sum(), (~is_cut).sum()], [ref_cut.sum(), (~ref_cut).sum()], "cutmix vs mixup")
  _binomial(is_cut.sum(), n, 0.5, "cutmix frequency")
  _same_distribution(lam[~is_cut], ref_lam[~ref_cut], "mixup lam")
  res = stats.kstest(lam[~is_cut], stats.beta(0.8, 0.8).cdf)
  assert res.pvalue > P_MIN, f"mixup lam vs Beta(0.8, 0.8): KS D={res.statistic:.4f}, p={res.pvalue:.2e}"
  yl, yh, xl, xh = _official_rand_bbox((H, W), ref_lam[ref_cut], int(ref_cut.sum()), np.random.RandomState(12))
  _same_distribution(cut_lam, 1 - (yh - yl) * (xh - xl) / (H * W), "cutmix corrected lam")


def test_grouped_mixup_cutmix_mixes_within_each_group():
  """grouped_mixup_cutmix, 4 groups of 4: every image is mixed with the mirror image of its own group (timm per
  GPU batch), each group with its own lam and its own mixup / cutmix switch."""
  b, g = 16, 4
  x = jnp.asarray(np.arange(1, b + 1, dtype=np.float32)[:, None, None, None] * np.ones((b, 8, 8, 1), np.float32))
  labels = jnp.arange(b)
  partner = np.array([(i // g) * g + (g - 1 - i % g) for i in range(b)])
  lams, modes = [], []
  mix = jax.jit(lambda key: finetune.grouped_mixup_cutmix(key, x, labels, b, g))
  for seed in range(6):
    img, tgt = jax.device_get(mix(jax.random.PRNGKey(seed)))
    sm = np.asarray(finetune.smooth_one_hot(labels, b, 0.1))
    lam = (tgt[np.arange(b), np.arange(b)] - 0.1 / b) / 0.9
    np.testing.assert_allclose(tgt, lam[:, None] * sm + (1 - lam[:, None]) * sm[partner], atol=1e-5)
    xi, xp = np.asarray(x)[:, :, :, 0], np.asarray(x)[partner, :, :, 0]
    for i in range(b):
      own, other = img[i, :, :, 0] == xi[i], img[i, :, :, 0] == xp[i]
      if np.all(own | other):  # cutmix: a rectangle of the partner, area 1 - lam
        modes.append("cut")
        assert abs(other.mean() - (1 - lam[i])) < 1e-5
      else:
        modes.append("mix")
        np.testing.assert_allclose(img[i, :, :, 0], lam[i] * xi[i] + (1 - lam[i]) * xp[i], atol=1e-4)
    group_lams = lam.reshape(-1, g)
    assert np.allclose(group_lams, group_lams[:, :1], atol=1e-5)  # one lam per group
    lams += list(group_lams[:, 0])
  assert len(set(np.round(lams, 4))) > len(lams) // 2  # groups draw their own lam
  assert {"cut", "mix"} <= set(modes)
