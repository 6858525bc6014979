"""benchmarks/label_precision.py measures what it says: float16 / bfloat16 really execute in that dtype, and
its label-disagreement counts match a recomputation that shares none of its code path (modules built by
api.build_module from the dtype's name, the whole set in one batch, nearest code by a float64 numpy
argmax over the codebook)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beitv2_jax import api
from beitv2_jax.models.build import DTYPES
from beitv2_jax.models.vqkd import VQKD
from beitv2_jax.models.vqkd import vqkd_kwargs
from helpers import ROOT

N_IMAGES = 26  # every photo: 1664 patches of an 8x8 grid


@pytest.fixture(scope="module")
def lp():
  path = os.path.join(ROOT, "benchmarks", "label_precision.py")
  spec = importlib.util.spec_from_file_location("label_precision", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def random_tokenizer_file(path: str) -> str:
  """A tiny random tokenizer (32 px, 8x8 patches, 1 block of width 64 and 2 heads) with 8192 codes of
  dim 32, the official count, so that near-ties are common enough for bf16 to flip some of the 1664
  labels (without flips the comparisons below would prove nothing), written in the official key layout.
  The parameters come from numpy: jitting the module's own random init compiles for ~10 s on 2 cores."""
  kwargs = vqkd_kwargs(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, mlp_ratio=4.0,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, codebook_size=8192,
                       codebook_dim=32, teacher_dim=512)
  module = VQKD(**kwargs)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  rng = np.random.default_rng(0)

  def fill(keys, leaf):  # the official init's scale: trunc_normal(0.02) weights, unit LayerNorms, zero biases
    name = keys[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name.endswith("bias"):
      return np.zeros(leaf.shape, np.float32)
    return np.clip(rng.normal(0.0, 0.02, leaf.shape), -0.04, 0.04).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  codebook = rng.normal(size=(8192, 32))
  codebook = (codebook / np.linalg.norm(codebook, axis=1, keepdims=True)).astype(np.float32)
  api.export_state_dict(api.Model("tokenizer", module, params, kwargs, codebook, "random"), path)
  return path


@pytest.fixture(scope="module")
def setup(lp, tmp_path_factory):
  # Through the script's own loader: beitv2_jax.load(file, dtype=...) for each dtype, float16 included.
  path = random_tokenizer_file(str(tmp_path_factory.mktemp("lp") / "tok.safetensors"))
  models = lp.tokenizers(path, num_heads=2)
  assert {name: m.module.dtype for name, m in models.items()} == {name: DTYPES[name] for name in models}
  (_, images), = lp.load_images("photos:all", models["float32"].img_size, N_IMAGES)
  return models, images


@pytest.fixture(scope="module")
def measured(lp, setup):
  models, images = setup
  return lp.measure(models, [("photos", images)], batch=N_IMAGES)["total"]


def reference_labels(model, images, dtype_name):
  """(z float64, ids) from an independently built module in `dtype_name`, nearest code by numpy argmax."""
  module = api.build_module("tokenizer", model.config, dtype_name)
  # uint8 / 255 inside the jit as in pretraining: XLA may turn it into a multiply by 1/255, one ulp off the
  # division done outside, and one ulp at the input is enough to move a bf16 rounding and so a label.
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x.astype(jnp.float32) / 255.0, method=VQKD.encode))
  z = np.asarray(encode(model.params, jnp.asarray(images)), np.float64)
  return z, np.argmax(z @ np.asarray(model.codebook, np.float64).T, axis=-1)


def test_float16_is_a_dtype_name():
  assert DTYPES["float16"] is jnp.float16
  cfg = {"encoder": {}, "decoder": {}}
  assert api.build_module("tokenizer", cfg, "float16").dtype is jnp.float16


def test_float32_against_itself_disagrees_nowhere(lp, setup):
  models, images = setup
  same = {name: models["float32"] for name in lp.DTYPE_NAMES}
  t = lp.measure(same, [("photos", images)], batch=16)["total"]  # padded: the padding test reuses this compile
  for pair in ("fp16 vs fp32", "bf16 vs fp32", "fp16 vs bf16"):
    assert t["differ"][pair] == 0, pair
  assert t["z_rms"]["float16"] == 0.0 and t["z_rms"]["bfloat16"] == 0.0


def test_fractions_match_an_independent_recomputation(lp, setup, measured):
  models, images = setup
  t = measured
  ref = {name: reference_labels(models["float32"], images, name) for name in lp.DTYPE_NAMES}
  n = images.shape[0] * models["float32"].grid ** 2
  assert t["images"] == N_IMAGES and t["patches"] == n
  for pair, a, b in lp.PAIRS[:3]:
    expected = int((ref[a][1] != ref[b][1]).sum())
    assert t["differ"][pair] == expected, (pair, t["differ"][pair], expected)
    assert t["fraction"][pair] == expected / n
  # The measurement must be able to see a difference: bf16 flips labels here, fp16 fewer.
  assert t["differ"]["bf16 vs fp32"] > 0
  assert t["differ"]["fp16 vs fp32"] < t["differ"]["bf16 vs fp32"]
  # The fp16-search column rounds the dot products to fp16, which makes exact ties that the float32 norms
  # break one way or the other by summation order: its label must be one of the tied best codes.
  z16 = ref["float16"][0].reshape(-1, ref["float16"][0].shape[-1])
  cb = np.asarray(models["float32"].codebook, np.float32)
  dots = (z16.astype(np.float16).astype(np.float32) @ cb.astype(np.float16).astype(np.float32).T).astype(np.float16)
  ids16 = lp.run_dtype(models["float16"], images, N_IMAGES)[1]["+search16"]
  best = dots[np.arange(len(dots)), ids16.reshape(-1)] == dots.max(-1)
  assert best.mean() > 0.998, best.mean()
  for pair, other in (("fp16+search16 (official autocast) vs fp32", "float32"),
                      ("fp16 vs fp16+search16", "float16"), ("bf16 vs fp16+search16", "bfloat16")):
    assert t["differ"][pair] == int((ids16 != ref[other][1]).sum()), pair
  # The TPU-default search (inputs rounded to bf16): numpy's argmax on the rounded float32 z, in float64.
  z32, ids32 = lp.run_dtype(models["float32"], images, N_IMAGES)
  bf = lambda a: np.asarray(a, np.float32).astype(jnp.bfloat16).astype(np.float64)
  expected = np.argmax(bf(z32) @ bf(models["float32"].codebook).T, axis=-1)
  assert (ids32["+bf16"] == expected).mean() > 0.998
  assert t["differ"]["fp32, bf16 search vs fp32"] == int((ids32["+bf16"] != ref["float32"][1]).sum())


def test_float16_executes_in_float16(lp, setup, measured):
  models, images = setup
  # The block matmuls of the label function come out in float16 (bfloat16): q, k, v, attention @ v, proj,
  # fc1, fc2 in every block (the q @ k^T logits are float32 by design, and the fp16 search adds one f16).
  for name, tag in (("float16", "f16"), ("bfloat16", "bf16")):
    m = models[name]
    jaxpr = str(jax.make_jaxpr(lp.encode_fn(m.module))(m.params, jnp.asarray(m.codebook), jnp.asarray(images[:2])))
    outs = [line.split("=")[0].split(":")[1].split("[")[0].strip() for line in jaxpr.splitlines()
            if "= dot_general[" in line]
    assert outs.count(tag) >= 7 * m.module.encoder["depth"], (name, outs)
  # ...and their encoder output is off float32 by more than float32 rounding but by much less than bf16's.
  t = measured
  rms16, rms_bf = t["z_rms"]["float16"], t["z_rms"]["bfloat16"]
  assert 1e-6 < rms16 < rms_bf / 3, (rms16, rms_bf)
  assert t["nonfinite"] == {name: 0 for name in lp.DTYPE_NAMES}


def test_padding_the_last_batch_changes_no_label(lp, setup):
  models, images = setup
  z_one, ids_one = lp.run_dtype(models["float32"], images, N_IMAGES)
  z_pad, ids_pad = lp.run_dtype(models["float32"], images, 16)  # 16 + 10 real images, 6 black ones
  assert z_pad.shape == z_one.shape
  np.testing.assert_allclose(z_pad, z_one, atol=1e-5)
  assert (ids_pad[""] == ids_one[""]).mean() > 0.999
