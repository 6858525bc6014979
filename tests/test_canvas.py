"""Resizing training views on the device (data/canvas.py): PIL's pixels exactly, in both of PIL's pass orders,
through the transforms, and through whole training runs."""
import types

import jax
import numpy as np
import pytest
from PIL import Image

from beitv2_jax.data import canvas, transforms
from beitv2_jax.data.masking import MaskingGenerator
from beitv2_jax.train import loop
from helpers import assert_trees_equal, finetune_config, linprobe_config, params_of, pretrain_config, tokenizer_config

PIL_FILTER = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_resize = jax.jit(canvas.resize)


def _pil(crop, out, interpolation="bicubic", flip=False):
  view = np.asarray(Image.fromarray(crop).resize((out, out), PIL_FILTER[interpolation]))
  return view[:, ::-1] if flip else view


def _on_device(examples):
  stack = lambda k: np.stack([e[k] for e in examples])
  return np.asarray(_resize(stack("canvas"), stack("canvas_rows"), stack("canvas_cols"), stack("canvas_transposed")))


def _crops(rng, out, board, n):
  """Crop sizes over the whole canvas, and the edge cases: the output size on one side (PIL skips that pass),
  1-pixel sides, the canvas size, and both sides of Pillow 13's pass-order boundary 2 (w - out) = h - out."""
  sizes = [(out, out), (1, board), (board, 1), (board, board), (out + 10, out + 5), (out + 10, out + 4),
           (out + 11, out + 5), (out // 2, out + 3), (out + 3, out // 2)]
  sizes += [tuple(int(v) for v in rng.integers(1, board + 1, 2)) for _ in range(n - len(sizes))]
  for h, w in sizes:
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if rng.random() < 0.5:  # flat regions and hard edges: clipping at 0 and 255, exact ties
      photo = (photo // 64 * 85).astype(np.uint8)
    yield photo


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("out,board", [(32, 64), (224, 448)], ids=["32px", "224px"])
def test_the_device_resize_is_pils_pixel_for_pixel(interpolation, out, board):
  rng = np.random.default_rng(out)
  crops = list(_crops(rng, out, board, 48 if out == 32 else 16))
  flips = [bool(rng.random() < 0.5) for _ in crops]
  examples = [canvas.pack(c, out, board, interpolation, flip_after=f) for c, f in zip(crops, flips)]
  got = _on_device(examples)
  for i, (c, f) in enumerate(zip(crops, flips)):
    np.testing.assert_array_equal(got[i], _pil(c, out, interpolation, f), err_msg=f"crop {c.shape[:2]}, flip {f}")
  orders = {bool(e["canvas_transposed"]) for e in examples}
  assert orders == {False, True}, "both pass orders were exercised"


def test_pils_pass_order_is_the_one_the_rule_says():
  """The rule is read off Pillow's output: resizing in the other order gives different pixels for these crops
  (so the test above fails if the rule is wrong), and the rule's order gives PIL's."""
  rng = np.random.default_rng(0)
  out, board = 32, 64
  for h, w in [(60, 40), (60, 45), (40, 60), (50, 20)]:
    crop = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ex = canvas.pack(crop, out, board)
    swapped = dict(ex)
    if ex["canvas_transposed"]:  # run PIL's other order: columns first on the untransposed crop
      swapped = canvas.pack(crop, out, board)
      swapped["canvas"] = np.zeros_like(ex["canvas"])
      swapped["canvas"][:h, :w] = crop
      swapped["canvas_rows"], swapped["canvas_cols"] = ex["canvas_cols"], ex["canvas_rows"]
      swapped["canvas_transposed"] = np.bool_(False)
    else:
      swapped["canvas"] = np.zeros_like(ex["canvas"])
      swapped["canvas"][:w, :h] = crop.transpose(1, 0, 2)
      swapped["canvas_rows"], swapped["canvas_cols"] = ex["canvas_cols"], ex["canvas_rows"]
      swapped["canvas_transposed"] = np.bool_(True)
    right, wrong = _on_device([ex, swapped])
    np.testing.assert_array_equal(right, _pil(crop, out))
    assert (wrong != right).any(), (h, w)
  assert canvas.vertical_first(60, 40, 32, 32) and not canvas.vertical_first(40, 60, 32, 32)


def test_a_crop_larger_than_the_canvas_is_resized_on_the_host():
  rng = np.random.default_rng(1)
  crop = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
  calls = []

  def host(px):
    calls.append(px.shape)
    return _pil(px, 32)

  for flip in (False, True):
    ex = canvas.pack(crop, 32, 64, flip_after=flip, resize_on_host=host)
    np.testing.assert_array_equal(_on_device([ex])[0], _pil(crop, 32, flip=flip))
  assert calls == [(70, 50, 3)] * 2
  with pytest.raises(ValueError, match="supports"):
    canvas.pack(crop[:40], 32, 64, "lanczos")


def _photos(n=12):
  import skimage.data
  im = Image.fromarray(skimage.data.astronaut())
  return [im.resize((60 + 7 * i, 90 - 3 * i), Image.BICUBIC) for i in range(n)]


def test_the_transforms_with_a_canvas_give_the_host_transforms_examples():
  """TokenizerTrain and MIMTrain shipping the crop, resized on the device: the same image (and mask) as the
  host transform with the same draws, for every seed; some crops fall back to the host (larger than 64 px)."""
  mask = MaskingGenerator.from_ratio((8, 8), 0.4, 4)
  pairs = [(transforms.TokenizerTrain(32), transforms.TokenizerTrain(32, canvas=64)),
           (transforms.MIMTrain(32, mask), transforms.MIMTrain(32, mask, canvas=64))]
  for host, device in pairs:
    got, want, identity = [], [], 0
    for seed, im in enumerate(_photos() * 2):
      want.append(host(im, np.random.default_rng(seed)))
      got.append(device(im, np.random.default_rng(seed)))
      assert "image" not in got[-1]
      identity += int(got[-1]["canvas_cols"][0, 1] == 1 << canvas.PRECISION_BITS)
    resized = _on_device(got)
    for seed, (g, w) in enumerate(zip(got, want)):
      np.testing.assert_array_equal(resized[seed], w["image"], err_msg=f"{type(host).__name__} seed {seed}")
      if "mask" in w:
        np.testing.assert_array_equal(g["mask"], w["mask"])
    assert 0 < identity < len(got)


def test_the_config_chooses_where_views_are_resized():
  canvas_for = lambda **kw: loop.Task.resize_canvas(types.SimpleNamespace(config=tokenizer_config(**kw)))
  assert canvas_for() == 0 and canvas_for(**{"data.resize": "device"}) == 64
  assert canvas_for(**{"data.resize": "device", "data.resize_canvas": 96}) == 96
  from beitv2_jax.config_defaults import validate
  for bad in ({"data.resize": "gpu"}, {"data.resize_canvas": 16}):
    with pytest.raises(ValueError, match="data.resize"):
      validate(tokenizer_config(**bad))


@pytest.mark.parametrize("task", ["tokenizer", "pretrain", "finetune", "linprobe"])
def test_training_with_the_device_resize_is_bit_identical_to_the_host_resize(task, tmp_path):
  """Whole runs (grain pipeline, sharded batches, jitted steps): the state after 4 steps is the same bits for the
  tokenizer and fine-tuning (its RandAugment colour ops on the device too, data/pixel_ops.py). The step's views
  are the same pixels (tested above), but XLA fuses the ViT's input normalisation differently behind the
  resize: last-bit differences, 1.6e-7 at most measured for MIM, 2.4e-6 on the linear probe's head (its
  BatchNorm statistics scale them up). A wrong view, e.g. the flip dropped, moves parameters by 1e-4 and more
  (1.5e-4 on the probe's); fine-tuning without the device's RandAugment ops fails at once."""
  from beitv2_jax import main as entry
  make = {"tokenizer": tokenizer_config, "pretrain": lambda **kw: pretrain_config("random", **kw),
          "finetune": finetune_config, "linprobe": linprobe_config}[task]
  states = {}
  for place in ("host", "device"):
    entry.run(make(steps=4, **{"data.resize": place}), str(tmp_path / place))
    states[place] = params_of(str(tmp_path / place))
  assert int(states["device"]["step"]) == 4
  assert_trees_equal(states["host"], states["device"], atol={"pretrain": 1e-6, "linprobe": 2e-5}.get(task, 0))
