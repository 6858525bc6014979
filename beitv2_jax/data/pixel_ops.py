"""RandAugment's colour ops on the device, PIL's pixels exactly (fine-tuning with data.resize='device').

When the fine-tune view is resized in the step (data/canvas.py), the RandAugment ops after that resize have to
run there too. The host draws them (transforms.rand_augment_plan: the draws never read the pixels), and when
every op an example draws is one of these, ships each as a kind and its arguments:
- KIND_LUT: Invert, Posterize, Solarize, SolarizeAdd and Brightness map each channel value on its own; the
  host makes the 256-entry table by running PIL's op on a ramp of the 256 values, the device looks it up.
- KIND_EQUALIZE: ImageOps.equalize, from each channel's histogram, in its integer arithmetic.
- KIND_AUTOCONTRAST: ImageOps.autocontrast, each channel's [lowest, highest] value stretched to [0, 255]:
  `int(ix * scale + offset)` in float64, which is floor((ix - lo) 255 / (hi - lo)) except where that quotient
  is a whole number the float64 arithmetic lands just below (12094 of the 16.7M (lo, hi, ix), tabulated here).
- KIND_CONTRAST: ImageEnhance.Contrast, a blend with the mean grey (PIL's integer RGB -> L, its mean rounded
  as `int(mean + 0.5)` of ImageStat), itself a table over the 256 values.
- KIND_COLOR: ImageEnhance.Color, a blend of each pixel with its own grey.
- KIND_SHARPNESS: ImageEnhance.Sharpness, a blend with ImageFilter.SMOOTH's 3x3 filter (borders kept), in
  integers (`smooth`: its float32 sums never land near enough to a whole number for their rounding to count).
Image.blend computes `in1 + alpha * (in2 - in1)` in float32 (alpha as a C float), truncated to uint8 and
clipped; here the same two float32 roundings are computed in integer arithmetic (`blend`), since XLA may fuse
the float32 product and sum into one multiply-add that rounds once where C rounds twice. The rest (Rotate,
Shear, Translate: PIL's bicubic affine in float64) stay on the host: an example that draws one of them is
augmented there and shipped resized, with KIND_NONE for its layers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KIND_NONE, KIND_LUT, KIND_EQUALIZE, KIND_AUTOCONTRAST, KIND_CONTRAST, KIND_COLOR, KIND_SHARPNESS = range(7)
# the RandAugment ('inc1') ops the device runs, and how
DEVICE_KINDS = {"Invert": KIND_LUT, "PosterizeIncreasing": KIND_LUT, "SolarizeIncreasing": KIND_LUT,
                "SolarizeAdd": KIND_LUT, "BrightnessIncreasing": KIND_LUT, "Equalize": KIND_EQUALIZE,
                "AutoContrast": KIND_AUTOCONTRAST, "ContrastIncreasing": KIND_CONTRAST,
                "ColorIncreasing": KIND_COLOR, "SharpnessIncreasing": KIND_SHARPNESS}
BLEND_KINDS = (KIND_CONTRAST, KIND_COLOR, KIND_SHARPNESS)  # the kinds that take a factor
_VALUES = 256


def no_ops(num_layers: int) -> dict:
  """The wire fields of an example with nothing left to do on the device (every layer KIND_NONE)."""
  return {"ra_kind": np.zeros(num_layers, np.int32),
          "ra_lut": np.tile(np.arange(_VALUES, dtype=np.uint8), (num_layers, 1)),
          "ra_factor": np.ones(num_layers, np.float32)}


def grey(x: jax.Array) -> jax.Array:
  """PIL's RGB -> L (Convert.c): (R * 19595 + G * 38470 + B * 7471 + 2^15) >> 16, int32 (..., 3) -> (...)."""
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _bit_length(x: jax.Array) -> jax.Array:
  return 32 - jax.lax.clz(x.astype(jnp.uint32)).astype(jnp.int32)


def blend(base: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """Image.blend(base, image, factor) on int32 values 0..255, factor float32 0 or in [2^-8, 8) (RandAugment's
  are in [0.1, 1.9]; below 2^-8 the shifts pass 30 bits, a negative factor's sign is ignored): C's float32
  `base + factor * (image - base)`, rounded to float32 after the product and after the sum, truncated and
  clipped to 0..255, computed in integers. (In floating point the compiler may fuse the product and the sum
  into one multiply-add, rounded once: XLA's CPU backend does, and an optimization barrier does not stop it.)

  factor = m 2^-q (m < 2^24, q <= 30 for factors >= 2^-8); |product| = m |d| 2^-q, m |d| < 2^32, rounded to
  24 significant bits (ties to even); then the sum's integer part T and its distance D (in units of 2^-q) below
  the next integer: float32 rounds the sum up to that integer when D is at most half its ulp."""
  bits = jax.lax.bitcast_convert_type(factor.astype(jnp.float32), jnp.int32)
  exponent = (bits >> 23) & 0xFF
  mantissa = jnp.where(exponent == 0, 0, (bits & 0x7FFFFF) | 0x800000).astype(jnp.uint32)
  q = (150 - exponent).astype(jnp.uint32)
  d = image - base
  product = mantissa * jnp.abs(d).astype(jnp.uint32)  # exact: < 2^24 * 255
  cut = jnp.maximum(_bit_length(product) - 24, 0).astype(jnp.uint32)  # bits below float32's 24
  kept, dropped = product >> cut, product & ((jnp.uint32(1) << cut) - 1)
  half = jnp.where(cut > 0, jnp.uint32(1) << jnp.maximum(cut, 1) - 1, 0)
  kept = kept + ((dropped > half) | ((dropped == half) & (cut > 0) & ((kept & 1) == 1))).astype(jnp.uint32)
  product = kept << cut
  whole = (product >> q).astype(jnp.int32)
  fraction = (product & ((jnp.uint32(1) << q) - 1)).astype(jnp.int32)
  one = (jnp.uint32(1) << q).astype(jnp.int32)
  negative = d < 0
  # the sum is floor_ + (one - gap) / one, exact when gap == one (fraction 0)
  floor_ = jnp.where(negative, base - whole - (fraction > 0), base + whole)
  gap = jnp.where(fraction == 0, one, jnp.where(negative, fraction, one - fraction))
  # the sum's binade 2^e: from its integer part, or below 1 from its numerator (one - gap) / one
  e = jnp.where(floor_ >= 1, _bit_length(jnp.maximum(floor_, 1)) - 1,
                _bit_length(jnp.maximum(one - gap, 1)) - 1 - q.astype(jnp.int32))
  t = q.astype(jnp.int32) + e - 24  # half an ulp of the sum is 2^t units of 2^-q
  rounds_up = (gap < one) & (floor_ >= 0) & (t >= 0) & (gap <= (1 << jnp.clip(t, 0, 30)))
  return jnp.clip(floor_ + rounds_up, 0, 255)


def _apply_tables(x: jax.Array, tables: jax.Array) -> jax.Array:
  """(B, H, W, 3) int32 values through per-example, per-channel tables (B, 3, 256)."""
  return jax.vmap(lambda t, im: t[jnp.arange(3), im])(tables, x)


def histograms(x: jax.Array) -> jax.Array:
  """Each channel's histogram: (B, H, W, 3) int32 values -> (B, 3, 256) int32 counts."""
  flat = x.reshape(x.shape[0], -1, 3)
  return jax.vmap(lambda im: jnp.zeros((3, _VALUES), jnp.int32).at[jnp.arange(3), im].add(1))(flat)


def equalize_tables(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize's table per channel, (B, 3, 256) histograms -> (B, 3, 256): `step` is (pixels - the
  count of the highest value present) // 255; identity when one value or a zero step; else the running count
  from step // 2, divided by step (and clipped, as Image.point clips the table to uint8)."""
  present = hist > 0
  highest = _VALUES - 1 - jnp.argmax(present[..., ::-1], axis=-1)
  step = (hist.sum(-1) - jnp.take_along_axis(hist, highest[..., None], axis=-1)[..., 0]) // 255
  before = jnp.cumsum(hist, axis=-1) - hist
  table = jnp.minimum((step[..., None] // 2 + before) // jnp.maximum(step, 1)[..., None], 255)
  identity = (present.sum(-1) <= 1) | (step == 0)
  return jnp.where(identity[..., None], jnp.arange(_VALUES), table)


@functools.lru_cache(maxsize=1)
def _autocontrast_exceptions() -> np.ndarray:
  """Sorted keys lo * 2^16 + hi * 2^8 + ix where ImageOps.autocontrast's float64 `int(ix * scale + offset)`
  (scale = 255 / (hi - lo), offset = -lo * scale) is one below the exact floor((ix - lo) 255 / (hi - lo))."""
  hi, ix = np.meshgrid(np.arange(_VALUES), np.arange(_VALUES), indexing="ij")
  keys = []
  for lo in range(_VALUES - 1):
    span = np.where(hi > lo, hi - lo, 1)
    scale = 255.0 / span
    float64 = np.trunc(ix * scale + -lo * scale)  # Python's int() of the same float64 operations
    below = (hi > lo) & (float64 < (ix - lo) * 255 // span) & (ix >= lo) & (ix <= hi)
    keys.append(lo * _VALUES * _VALUES + hi[below] * _VALUES + ix[below])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def autocontrast_tables(hist: jax.Array) -> jax.Array:
  """ImageOps.autocontrast(cutoff=0)'s table per channel, (B, 3, 256) histograms -> (B, 3, 256)."""
  present = hist > 0
  lo = jnp.argmax(present, axis=-1)[..., None]
  hi = (_VALUES - 1 - jnp.argmax(present[..., ::-1], axis=-1))[..., None]
  ix = jnp.arange(_VALUES)
  exact = (ix - lo) * 255 // jnp.maximum(hi - lo, 1)
  exceptions = jnp.asarray(_autocontrast_exceptions())
  key = lo * _VALUES * _VALUES + hi * _VALUES + ix
  # unrolled: the default binary search is a while loop, which a TPU step waits on (the step stays loop-free)
  at = jnp.clip(jnp.searchsorted(exceptions, key, method="scan_unrolled"), 0, exceptions.shape[0] - 1)
  table = jnp.clip(exact - (exceptions[at] == key), 0, 255)
  return jnp.where(hi <= lo, ix, table)


def contrast_tables(x: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast as a table per example (B, 3, 256): a blend with the rounded mean grey,
  floor(mean + 1/2) in integers: the quotient of sum / n, plus one when twice the remainder reaches n (a sum of
  n pixels never lands within 1/(2n) of the rounding point, so float64's `int(mean + 0.5)` agrees)."""
  n = x.shape[1] * x.shape[2]
  if 255 * n >= 1 << 31:
    raise ValueError(f"the device's Contrast sums {n} pixels of up to 255 in int32: at most {((1 << 31) - 1) // 255}")
  total = grey(x).sum(axis=(1, 2))
  level = total // n + (2 * (total % n) >= n)
  table = blend(level[:, None], jnp.arange(_VALUES)[None, :], factor[:, None])
  return jnp.broadcast_to(table[:, None, :], (x.shape[0], 3, _VALUES))


def smooth(x: jax.Array) -> jax.Array:
  """image.filter(ImageFilter.SMOOTH), (B, H, W, 3) int32 -> (B, H, W, 3) int32: Filter.c's 3x3 path sums
  0.5 + each inner pixel's weighted neighbours (weights 1, centre 5, each divided by 13) in float32 and
  truncates; the exact value is S / 13 + 1/2 for an integer S, never nearer than 1/26 to a whole number, so
  float32's rounding (1e-4 at most here) never moves it across one and the result is floor(S / 13 + 1/2) =
  (2 S + 13) // 26. The outermost rows and columns are copied."""
  h, w = x.shape[1], x.shape[2]
  window = lambda dy, dx: x[:, dy:h - 2 + dy, dx:w - 2 + dx]
  weighted = sum(window(dy, dx) for dy in range(3) for dx in range(3)) + 4 * window(1, 1)
  return x.at[:, 1:-1, 1:-1].set((2 * weighted + 13) // 26)


def rand_augment(images: jax.Array, kinds: jax.Array, luts: jax.Array, factors: jax.Array) -> jax.Array:
  """The layers shipped by the host, in order: (B, H, W, 3) uint8 images, kinds (B, L) int32, luts (B, L, 256)
  uint8, factors (B, L) float32 -> (B, H, W, 3) uint8. Every kind is computed for every example and the drawn
  one selected: a few element-wise passes and one histogram per layer, small beside the model's step."""
  x = images.astype(jnp.int32)
  for j in range(kinds.shape[1]):
    kind, factor = kinds[:, j], factors[:, j]
    host = jnp.broadcast_to(luts[:, j, None, :].astype(jnp.int32), (x.shape[0], 3, _VALUES))
    tables = jnp.where((kind == KIND_LUT)[:, None, None], host, jnp.arange(_VALUES))
    hist = histograms(x)
    tables = jnp.where((kind == KIND_EQUALIZE)[:, None, None], equalize_tables(hist), tables)
    tables = jnp.where((kind == KIND_AUTOCONTRAST)[:, None, None], autocontrast_tables(hist), tables)
    tables = jnp.where((kind == KIND_CONTRAST)[:, None, None], contrast_tables(x, factor), tables)
    looked_up = _apply_tables(x, tables)
    per_pixel = jnp.where((kind == KIND_COLOR)[:, None, None, None],
                          jnp.broadcast_to(grey(x)[..., None], x.shape), smooth(x))  # the blend's other image
    blended = blend(per_pixel, x, factor[:, None, None, None])
    x = jnp.where(((kind == KIND_COLOR) | (kind == KIND_SHARPNESS))[:, None, None, None], blended, looked_up)
  return x.astype(jnp.uint8)


def augmented(images: jax.Array, batch: dict) -> jax.Array:
  """The batch's images after the RandAugment layers its host left to the device (none: unchanged)."""
  if "ra_kind" not in batch:
    return images
  return rand_augment(images, batch["ra_kind"], batch["ra_lut"], batch["ra_factor"])
