"""RandAugment's colour ops on the device (data/pixel_ops.py): PIL's pixels exactly, op by op, in chains, and
the share of fine-tune examples the device takes at the recipe's draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from beitv2_jax.data import pixel_ops, transforms

_blend = jax.jit(pixel_ops.blend)
_rand_augment = jax.jit(pixel_ops.rand_augment)
# every (base, image) pair of values
_BASE = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
_IMAGE = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)


def _enhance_factors():
  """The recipe's factors (1 +- 0.9 level / 10 over the clipped magnitudes), random ones, and the edge cases:
  0 and 1 (PIL copies an input), the powers of two where float32's exponent changes."""
  levels = np.linspace(0, 10, 41)
  rng = np.random.default_rng(0)
  return sorted({*(1 + 0.9 * levels / 10), *(1 - 0.9 * levels / 10), *rng.uniform(0.1, 1.9, 40),
                 0.0, 1.0, 0.5, 0.25, 0.125, 1.5, 1.225, 1.45})


def test_blend_is_pils_for_every_pair_of_values():
  """Image.blend's float32 arithmetic, in integers, for all 65536 (base, image) pairs at 130 factors. (The
  float32 expression jitted instead is 181 pairs off at 1.225: XLA fuses it into one multiply-add.)"""
  for factor in _enhance_factors():
    want = np.asarray(Image.blend(Image.fromarray(_BASE), Image.fromarray(_IMAGE), factor))
    got = np.asarray(_blend(jnp.asarray(_BASE, jnp.int32), jnp.asarray(_IMAGE, jnp.int32), jnp.float32(factor)))
    np.testing.assert_array_equal(got, want, err_msg=f"factor {factor}")


def test_grey_is_pils_rgb_to_l():
  rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [128, 128, 127],
                [254, 1, 128]]
  want = np.asarray(Image.fromarray(rgb).convert("L"))
  np.testing.assert_array_equal(np.asarray(pixel_ops.grey(jnp.asarray(rgb, jnp.int32))), want)


def _images():
  """Photos, and the edge cases of the statistics: one value (equalize's and autocontrast's identity), two
  values, a few high ones, noise, narrow ranges (autocontrast's float64 exceptions)."""
  import skimage.data
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
  ims = [np.asarray(Image.fromarray(p).resize((40, 36), Image.BICUBIC)) for p in photos]
  rng = np.random.default_rng(2)
  two = np.zeros((36, 40, 3), np.uint8)
  two[:5] = 255
  ims += [np.full((36, 40, 3), 7, np.uint8), two, (rng.integers(0, 3, (36, 40, 3)) * 127).astype(np.uint8),
          rng.integers(250, 256, (36, 40, 3), dtype=np.uint8), rng.integers(0, 256, (36, 40, 3), dtype=np.uint8),
          rng.integers(0, 26, (36, 40, 3), dtype=np.uint8), rng.integers(10, 61, (36, 40, 3), dtype=np.uint8)]
  return np.stack(ims)


def _autocontrast_exception_hit(image) -> bool:
  """Whether a value of the image is one where autocontrast's float64 table is below the exact quotient."""
  keys = set(pixel_ops._autocontrast_exceptions().tolist())
  for c in range(3):
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    if any(lo * 65536 + hi * 256 + int(v) in keys for v in np.unique(image[..., c])):
      return True
  return False


def _on_device(images, plans, layers=2):
  fields = [transforms.device_fields(plan, layers) for plan in plans]
  stack = lambda k: jnp.asarray(np.stack([f[k] for f in fields]))
  return np.asarray(_rand_augment(jnp.asarray(images), stack("ra_kind"), stack("ra_lut"), stack("ra_factor")))


def _on_host(image, plan):
  return np.asarray(transforms.apply_plan(Image.fromarray(image), plan))


def _unclipped_equalize_overflows(image) -> bool:
  """Whether ImageOps.equalize's table, before Image.point clips it, passes 255 at a value the image has."""
  for c in range(3):
    h = np.bincount(image[..., c].ravel(), minlength=256)
    present = np.nonzero(h)[0]
    step = (h.sum() - h[present[-1]]) // 255
    if len(present) > 1 and step and (step // 2 + np.cumsum(h)[present[-1]] - h[present[-1]]) // step > 255:
      return True
  return False


@pytest.mark.parametrize("name", sorted(pixel_ops.DEVICE_KINDS))
def test_each_device_op_is_pils_op(name):
  """Each op the device runs == transforms.apply_op (timm's op, tested against timm), at magnitudes 0..10 and
  both signs, on every test image, as the second layer after a no-op first."""
  images = _images()
  for level in (0.0, 2.5, 5.0, 9.0, 9.7, 10.0):
    for negate in ((False, True) if name in transforms.SIGNED_OPS else (False,)):
      plan = [(name, level, negate)]
      got = _on_device(images, [plan] * len(images))
      for i, image in enumerate(images):
        np.testing.assert_array_equal(got[i], _on_host(image, plan), err_msg=f"{name} {level} {negate} image {i}")
  if name == "Equalize":  # the clip of the table is exercised
    assert any(_unclipped_equalize_overflows(im) for im in images)
  if name == "AutoContrast":  # and the float64 exceptions
    assert any(_autocontrast_exception_hit(im) for im in images)


def test_chains_of_device_ops_are_pils_chains():
  """Layers drawn as the recipe draws them (every other example with both layers applied), among the ops the
  device runs, each example its own plan."""
  rng = np.random.default_rng(3)
  images = np.concatenate([_images()] * 4)
  plans = []
  while len(plans) < len(images):
    plan = transforms.rand_augment_plan(rng, prob=1.0 if len(plans) % 2 else 0.5)
    if transforms.device_fields(plan, 2) is not None:
      plans.append(plan)
  got = _on_device(images, plans)
  for i, (image, plan) in enumerate(zip(images, plans)):
    np.testing.assert_array_equal(got[i], _on_host(image, plan), err_msg=f"image {i} plan {plan}")
  assert sum(len(p) == 2 for p in plans) >= len(plans) // 2


def test_the_device_takes_the_examples_whose_ops_it_runs():
  """An example goes to the device when each of its 2 layers is skipped (prob 0.5) or draws one of the 10 of
  15 ops the device runs (all but the 5 geometric ones): (1 - 0.5 x 5/15)^2 = 0.694 of them."""
  rng = np.random.default_rng(4)
  n = 4000
  on_device = sum(transforms.device_fields(transforms.rand_augment_plan(rng), 2) is not None for _ in range(n))
  assert stats.binomtest(on_device, n, (1 - 0.5 * 5 / 15) ** 2).pvalue > 1e-4, on_device / n
  assert transforms.device_fields([("Rotate", 9.0, False)], 2) is None
  fields = transforms.device_fields([], 2)
  assert (fields["ra_kind"] == pixel_ops.KIND_NONE).all()


def test_finetune_examples_resized_and_augmented_on_the_device_are_the_host_ones():
  """FinetuneTrain shipping its crop and ops (canvas): after the step's resize and pixel_ops, the image the host
  transform makes with the same seed, and the same erasing box; both routes (device ops, host-finished views
  in the canvas) are taken."""
  from beitv2_jax.data import canvas
  import skimage.data
  photo = Image.fromarray(skimage.data.astronaut())
  photos = [photo.resize((50 + 5 * i, 70 - 2 * i), Image.BICUBIC) for i in range(12)] * 4
  host, device = transforms.FinetuneTrain(32), transforms.FinetuneTrain(32, canvas=64)
  want = [host(im, np.random.default_rng(seed)) for seed, im in enumerate(photos)]
  got = [device(im, np.random.default_rng(seed)) for seed, im in enumerate(photos)]
  batch = {k: jnp.asarray(np.stack([g[k] for g in got])) for k in got[0]}
  images = np.asarray(jax.jit(lambda b: pixel_ops.augmented(canvas.images(b), b))(batch))
  for seed, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(images[seed], w["image"], err_msg=f"seed {seed}")
    np.testing.assert_array_equal(g["erase"], w["erase"])
  with_ops = sum(bool(g["ra_kind"].any()) for g in got)
  finished = sum(g["canvas_cols"][0, 1] == 1 << canvas.PRECISION_BITS for g in got)
  assert with_ops > 0 and finished > 0, (with_ops, finished)


def test_contrast_on_a_view_too_large_for_int32_sums_is_refused():
  big = jax.ShapeDtypeStruct((1, 3000, 3000, 3), jnp.int32)
  with pytest.raises(ValueError, match="int32"):
    jax.eval_shape(pixel_ops.contrast_tables, big, jax.ShapeDtypeStruct((1,), jnp.float32))
  jax.eval_shape(pixel_ops.contrast_tables, jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.float32))


def test_autocontrast_is_pils_at_every_range_and_value():
  """Every (lowest, highest) pair of a channel with every value between them present: the whole table of
  ImageOps.autocontrast's float64 arithmetic that an image can reach, against PIL (10880 images of 16 x 16,
  each channel its own pair)."""
  lo, hi = np.triu_indices(256, k=1)  # the 32640 pairs lo < hi
  fill = np.arange(256)[None, :]
  values = (lo[:, None] + fill % (hi - lo + 1)[:, None]).astype(np.uint8)  # each pair's channel: lo..hi
  images = values.reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1)
  got = _on_device(images, [[("AutoContrast", 0.0, False)]] * len(images))
  want = np.stack([np.asarray(transforms.apply_op(Image.fromarray(im), "AutoContrast", 0.0)) for im in images])
  np.testing.assert_array_equal(got, want)


def test_smooth_is_pils_smooth_filter():
  """pixel_ops.smooth == image.filter(ImageFilter.SMOOTH) (Sharpness's degenerate image) on noise, on narrow
  ranges (sums that are multiples of 13: the rounding boundary), and on images of 1 to 3 pixels a side."""
  from PIL import ImageFilter
  rng = np.random.default_rng(5)
  images = [rng.integers(0, 256, (300, 200, 3)), rng.integers(0, 14, (300, 200, 3)),
            rng.integers(0, 2, (300, 200, 3)) * 13, rng.integers(0, 256, (3, 3, 3)), rng.integers(0, 256, (1, 5, 3)),
            rng.integers(0, 256, (2, 2, 3))]
  for im in images:
    im = im.astype(np.uint8)
    want = np.asarray(Image.fromarray(im).filter(ImageFilter.SMOOTH))
    got = np.asarray(jax.jit(pixel_ops.smooth)(jnp.asarray(im[None], jnp.int32)))[0]
    np.testing.assert_array_equal(got, want, err_msg=str(im.shape))
