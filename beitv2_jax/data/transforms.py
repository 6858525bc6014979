"""Per-example augmentations of the official recipes (unilm beit2/datasets.py; timm create_transform for
fine-tuning), on PIL images, driven by a `np.random.Generator` that grain seeds per example (so every run
and every resume sees the same ones).

Images leave the host as uint8 (4x less to copy than float32); `to_unit` / `imagenet_normalize` run on
the device inside the jitted step and are exactly ToTensor (/255) and Normalize.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps, ImageStat

from beitv2_jax.data import canvas as canvas_lib, pixel_ops
from beitv2_jax.data.decode import decoded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit(images_uint8: jax.Array) -> jax.Array:
  """ToTensor: uint8 [0, 255] -> float32 [0, 1], on the device (what the tokenizer and teachers take)."""
  return images_uint8.astype(jnp.float32) / 255.0


def imagenet_normalize(images_uint8: jax.Array) -> jax.Array:
  """ToTensor + Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), on the device."""
  return (to_unit(images_uint8) - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
          "nearest": Image.NEAREST}


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (left, top, w, h); 10 tries, then a centre crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def crop(im: Image.Image, box) -> Image.Image:
  left, top, w, h = box
  return im.crop((left, top, left + w, top + h))


def resize_center_crop(im: Image.Image, size: int, crop_pct: float = 0.875,
                       interpolation: str = "bicubic") -> Image.Image:
  """Eval: Resize(int(size / crop_pct)) on the shorter side, then CenterCrop(size)."""
  short = int(size / crop_pct)
  w, h = im.size
  if w <= h:
    nw, nh = short, int(short * h / w)
  else:
    nw, nh = int(short * w / h), short
  im = im.resize((nw, nh), INTERP[interpolation])
  left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
  return im.crop((left, top, left + size, top + size))


BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def jitter_draws(rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.4) -> list[tuple[int, float]]:
  """torchvision ColorJitter(b, c, s).get_params: the ops in a random order, each with a factor U[1-x, 1+x];
  [(BRIGHTNESS | CONTRAST | SATURATION, factor), ...] in the order they run."""
  strengths = (brightness, contrast, saturation)
  return [(int(i), rng.uniform(max(0.0, 1 - strengths[i]), 1 + strengths[i]))
          for i in rng.permutation(3) if strengths[i] > 0]


_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))


def _blend_lut(level: int, factor: float) -> list[int]:
  """What `Image.blend(flat image of `level`, im, factor)` does to each channel value 0..255, computed by PIL's
  own blend (so exactly): ImageEnhance.Brightness is this with level 0, Contrast with the image's mean grey."""
  return list(Image.blend(Image.new("L", (256, 1), level), _RAMP, factor).tobytes())


def _apply_lut(im: Image.Image, lut: list[int]) -> Image.Image:
  """`im.point(lut * bands)` without Pillow's per-call `round` of every one of the 256 x bands entries (a
  Python loop that costs more than the lookup itself on a crop): the tables here are already integers."""
  return im._new(im.im.point(lut * len(im.getbands()), None))


def _mean_grey(im: Image.Image) -> int:
  """ImageEnhance.Contrast's flat level: the rounded mean of the image's L channel."""
  return int(ImageStat.Stat(im.convert("L")).mean[0] + 0.5)


def color_jitter_crop(im: Image.Image, box, draws: list[tuple[int, float]]) -> Image.Image:
  """torchvision ColorJitter's ops (`draws`) on the whole image, then `crop(..., box)`, pixel for pixel (tested
  against torchvision's functional ops), doing most of the work on the crop. Every op is a blend with a "degenerate" image: black (brightness) and the pixel's own grey
  (saturation) are per pixel, so they commute with cropping; contrast blends with the WHOLE image's mean grey
  at that point, which is the one statistic taken from the full image. Brightness and contrast act on each
  channel value alone, so they run as lookup tables (composed when adjacent); the ops before contrast run on
  the full image only when saturation is among them (its effect on the mean grey has no cheap exact form)."""
  ops = list(draws)
  at_contrast = next((k for k, (op, _) in enumerate(ops) if op == CONTRAST), len(ops))
  if any(op == SATURATION for op, _ in ops[:at_contrast]):
    for op, factor in ops[:at_contrast]:
      im = ImageEnhance.Color(im).enhance(factor) if op == SATURATION else _apply_lut(im, _blend_lut(0, factor))
    ops = ops[at_contrast:]
  out, lut = crop(im, box), None  # lut: the pending per-value map of the ops since the last saturation
  for op, factor in ops:
    if op == SATURATION:
      if lut is not None:
        out, lut = _apply_lut(out, lut), None
      out = ImageEnhance.Color(out).enhance(factor)
      continue
    level = 0 if op == BRIGHTNESS else _mean_grey(im if lut is None else _apply_lut(im, lut))
    step = _blend_lut(level, factor)
    lut = step if lut is None else [step[v] for v in lut]
  return out if lut is None else _apply_lut(out, lut)


# ------------------------------------------------------------------------------------------------
# RandAugment, timm `rand-m9-mstd0.5-inc1`
# ------------------------------------------------------------------------------------------------
_LEVEL_DENOM = 10.0


def _affine(im, matrix, fill, resample):
  return im.transform(im.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(im, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return im.point(lut * len(im.getbands()))


RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# the ops whose magnitude takes a random sign (timm's _randomly_negate)
SIGNED_OPS = frozenset(("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))


def enhance_factor(level: float, negate: bool) -> float:
  """The ImageEnhance factor of timm's Color / Contrast / Brightness / Sharpness ops: 1 +- 0.9 level / 10."""
  m = level / _LEVEL_DENOM * 0.9
  return 1.0 + (-m if negate else m)


def apply_op(im: Image.Image, name: str, level: float, negate: bool = False,
             fill=(124, 116, 104), resample=Image.BICUBIC, translate_pct: float = 0.45) -> Image.Image:
  """timm's op `name` at `level` (0..10); `negate`: the sign drawn for the SIGNED_OPS."""
  m = level / _LEVEL_DENOM
  signed = lambda v: -v if negate else v
  if name == "AutoContrast":
    return ImageOps.autocontrast(im)
  if name == "Equalize":
    return ImageOps.equalize(im)
  if name == "Invert":
    return ImageOps.invert(im)
  if name == "Rotate":
    return im.rotate(signed(m * 30.0), resample=resample, fillcolor=fill)
  if name == "PosterizeIncreasing":
    bits = 4 - int(m * 4)
    if bits <= 0:  # keep 0 bits: black (older PIL did this; PIL >= 10 rejects bits=0)
      return im.point([0] * 256 * len(im.getbands()))
    return im if bits >= 8 else ImageOps.posterize(im, bits)
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(im, 256 - int(m * 256))
  if name == "SolarizeAdd":
    return _solarize_add(im, int(m * 110))
  if name.endswith("Increasing"):
    factor = enhance_factor(level, negate)
    enh = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
           "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}[name[:-10]]
    return enh(im).enhance(factor)
  if name == "ShearX":
    return _affine(im, (1, signed(m * 0.3), 0, 0, 1, 0), fill, resample)
  if name == "ShearY":
    return _affine(im, (1, 0, 0, signed(m * 0.3), 1, 0), fill, resample)
  if name == "TranslateXRel":
    return _affine(im, (1, 0, signed(m * translate_pct) * im.size[0], 0, 1, 0), fill, resample)
  if name == "TranslateYRel":
    return _affine(im, (1, 0, 0, 0, 1, signed(m * translate_pct) * im.size[1]), fill, resample)
  raise ValueError(f"unknown RandAugment op {name}")


def rand_augment_plan(rng: np.random.Generator, num_layers: int = 2, magnitude: float = 9.0,
                      magnitude_std: float = 0.5, prob: float = 0.5) -> list[tuple[str, float, bool]]:
  """timm RandAugment's draws: `num_layers` ops drawn uniformly with replacement, each applied with prob 0.5 at a
  magnitude ~ N(9, 0.5) clipped to [0, 10] (the 'inc1' increasing-severity op set), then its sign for the
  SIGNED_OPS. [(name, level, negate)] of the ops that apply, in order; the pixels play no part."""
  plan = []
  for i in rng.choice(len(RAND_INCREASING_OPS), num_layers, replace=True):
    if rng.random() > prob:
      continue
    level = magnitude if magnitude_std <= 0 else rng.normal(magnitude, magnitude_std)
    name = RAND_INCREASING_OPS[i]
    negate = name in SIGNED_OPS and rng.random() < 0.5
    plan.append((name, float(np.clip(level, 0.0, _LEVEL_DENOM)), bool(negate)))
  return plan


def rand_augment(im: Image.Image, rng: np.random.Generator, num_layers: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> Image.Image:
  """timm RandAugment (rand_augment_plan's ops, applied)."""
  return apply_plan(im, rand_augment_plan(rng, num_layers, magnitude, magnitude_std, prob))


def apply_plan(im: Image.Image, plan: list[tuple[str, float, bool]]) -> Image.Image:
  for name, level, negate in plan:
    im = apply_op(im, name, level, negate)
  return im


_RGB_RAMP = Image.merge("RGB", (_RAMP,) * 3)


def device_fields(plan: list[tuple[str, float, bool]], num_layers: int) -> Optional[dict]:
  """The plan as the wire fields of pixel_ops.rand_augment (layer j: kind, table, blend factor), or None when
  one of its ops runs only on the host. A table op's table is PIL's op run on the 256 values."""
  fields = pixel_ops.no_ops(num_layers)
  for j, (name, level, negate) in enumerate(plan):
    kind = pixel_ops.DEVICE_KINDS.get(name)
    if kind is None:
      return None
    fields["ra_kind"][j] = kind
    if kind == pixel_ops.KIND_LUT:
      fields["ra_lut"][j] = np.asarray(apply_op(_RGB_RAMP, name, level, negate))[0, :, 0]
    elif kind in pixel_ops.BLEND_KINDS:
      fields["ra_factor"][j] = enhance_factor(level, negate)
  return fields


def random_erasing_mask(rng: np.random.Generator, h: int, w: int, prob: float = 0.25,
                        area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3))) -> np.ndarray:
  """timm RandomErasing(mode='pixel', max_count=1): the box to fill with N(0, 1) noise after
  normalisation, as an (h, w) uint8 mask. The noise itself is drawn on the device."""
  mask = np.zeros((h, w), np.uint8)
  if rng.random() > prob:
    return mask
  for _ in range(10):
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(*log_aspect))
    eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if ew < w and eh < h:
      top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
      mask[top:top + eh, left:left + ew] = 1
      break
  return mask


# ------------------------------------------------------------------------------------------------
# Task transforms: record dict + rng -> example dict of numpy arrays
# ------------------------------------------------------------------------------------------------
def as_uint8(im: Image.Image) -> np.ndarray:
  return np.asarray(im, dtype=np.uint8)


def resized_view(region: Image.Image, size: int, interpolation: str = "bicubic", canvas: int = 0,
                 flip_after: bool = False) -> dict:
  """A crop's training view: {'image': it resized to size x size (then flipped left-right with `flip_after`)},
  or with `canvas` the wire fields from which the step resizes it to the same pixels (data/canvas.py)."""
  if canvas:
    return canvas_lib.pack(as_uint8(region), size, canvas, interpolation, flip_after,
                           resize_on_host=lambda pixels: as_uint8(resized(Image.fromarray(pixels), size,
                                                                          interpolation)))
  return {"image": as_uint8(resized(region, size, interpolation, flip_after))}


def resized(region: Image.Image, size: int, interpolation: str = "bicubic", flip_after: bool = False) -> Image.Image:
  """The crop resized to size x size on the host, then flipped left-right with `flip_after`."""
  view = region.resize((size, size), INTERP[interpolation])
  return view.transpose(Image.FLIP_LEFT_RIGHT) if flip_after else view


class TokenizerTrain:
  """RandomResizedCrop(size, scale 0.08-1, bicubic) + flip; [0, 1] images (the VQ-KD recipe), no colour jitter.
  Takes a PIL image, or an undecoded JPEG (decode.EncodedJpeg) of which it decodes the rows down to the box.
  With `canvas`, the example carries the crop for the device to resize (data/canvas.py), not `image`."""
  decodes_rows = True

  def __init__(self, size: int, scale=(0.08, 1.0), canvas: int = 0):
    self.size, self.scale, self.canvas = size, scale, canvas

  def __call__(self, im, rng) -> dict:
    box = random_resized_crop_box(rng, *im.size, scale=self.scale)
    region = crop(decoded(im, rows=box[1] + box[3]), box)
    return resized_view(region, self.size, canvas=self.canvas, flip_after=rng.random() < 0.5)


class EvalTransform:
  """Resize(size / 0.875, bicubic) + CenterCrop(size)."""

  def __init__(self, size: int, crop_pct: float = 0.875):
    self.size, self.crop_pct = size, crop_pct

  def __call__(self, im: Image.Image, rng) -> dict:
    return {"image": as_uint8(resize_center_crop(im, self.size, self.crop_pct))}


class MIMTrain:
  """DataAugmentationForBEiT (beit2/datasets.py): ColorJitter(0.4, 0.4, 0.4), flip, ONE crop box (scale
  min_crop_scale-1) resized twice: `image` (the ViT view, ImageNet-normalised on device) and `tokenizer_image`
  (the tokenizer view, [0, 1]), plus the block-wise `mask`.

  Pixel-equal to the official order (jitter the whole image, flip, crop, resize; tested against torchvision's
  functional ops), but cheaper: the jitter runs on the crop (color_jitter_crop), the flip on the crop, and when
  both views have the same size and interpolation (the official recipes) they are the same pixels, so the
  example carries `image` only and the device makes both views from it (half the resizing and the transport).
  """

  def __init__(self, size: int, mask_generator, min_crop_scale: float = 0.2, second_size: Optional[int] = None,
               interpolation: str = "bicubic", second_interpolation: str = "bicubic", color_jitter: float = 0.4,
               canvas: int = 0):
    self.size, self.second_size = size, second_size or size
    self.mask_generator, self.scale = mask_generator, (min_crop_scale, 1.0)
    self.interp, self.interp2, self.jitter = interpolation, second_interpolation, color_jitter
    self.canvas = canvas  # > 0: `image` is shipped as its crop in a canvas, resized on the device

  @property
  def one_view(self) -> bool:
    """The two views are the same pixels (no `tokenizer_image` in the examples)."""
    return (self.second_size, self.interp2) == (self.size, self.interp)

  def __call__(self, im: Image.Image, rng) -> dict:
    draws = jitter_draws(rng, self.jitter, self.jitter, self.jitter) if self.jitter > 0 else []
    flip = rng.random() < 0.5
    left, top, w, h = random_resized_crop_box(rng, *im.size, scale=self.scale)
    if flip:  # the box on the flipped image is this box, mirrored, on the unflipped one
      left = im.size[0] - left - w
    region = color_jitter_crop(im, (left, top, w, h), draws)
    if flip:
      region = region.transpose(Image.FLIP_LEFT_RIGHT)
    example = resized_view(region, self.size, self.interp, self.canvas)
    if not self.one_view:
      example["tokenizer_image"] = as_uint8(region.resize((self.second_size,) * 2, INTERP[self.interp2]))
    example["mask"] = self.mask_generator(rng).reshape(-1).astype(bool)
    return example


class FinetuneTrain:
  """timm create_transform(is_training): RandomResizedCrop(0.08-1, bicubic), flip, RandAugment
  rand-m9-mstd0.5-inc1, (normalise), RandomErasing(0.25, pixel). `erase` marks the erased box. Takes a PIL
  image, or an undecoded JPEG (decode.EncodedJpeg) of which it decodes the rows down to the box.

  With `canvas`, an example whose RandAugment ops the device can run exactly (pixel_ops.DEVICE_KINDS: 69% of
  them at the recipe's draws) carries its crop for the device to resize (data/canvas.py) and those ops as
  `ra_*` fields; the others are augmented here and carry their finished view in the canvas, ops KIND_NONE.
  The draws are the same either way (the plan is drawn before any pixel is touched)."""
  decodes_rows = True

  def __init__(self, size: int, rand_augment_layers: int = 2, magnitude: float = 9.0, reprob: float = 0.25,
               scale=(0.08, 1.0), canvas: int = 0):
    self.size, self.layers, self.magnitude, self.reprob, self.scale = size, rand_augment_layers, magnitude, reprob, scale
    self.canvas = canvas

  def __call__(self, im, rng) -> dict:
    box = random_resized_crop_box(rng, *im.size, scale=self.scale)
    region = crop(decoded(im, rows=box[1] + box[3]), box)
    flip = rng.random() < 0.5
    plan = rand_augment_plan(rng, self.layers, self.magnitude) if self.layers > 0 else []
    on_device = device_fields(plan, self.layers) if self.canvas else None
    if on_device is not None:
      example = {**resized_view(region, self.size, canvas=self.canvas, flip_after=flip), **on_device}
    else:
      example = {"image": as_uint8(apply_plan(resized(region, self.size, flip_after=flip), plan))}
      if self.canvas:
        example = {**canvas_lib.pack_resized(example["image"], self.canvas), **pixel_ops.no_ops(self.layers)}
    example["erase"] = random_erasing_mask(rng, self.size, self.size, self.reprob)
    return example
