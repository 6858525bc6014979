"""Attention implementations agree: the explicit XLA form (the reference), the padded fused path run through
jax's XLA implementation (every backend: checks the padding and masking), and cuDNN (GPU only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beitv2_jax.models import attention as attention_lib
from beitv2_jax.models.vit import VisionTransformer

on_gpu = jax.default_backend() == "gpu"


def _inputs(b, n, h, dh, dtype, seed=0, batched_bias=False):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, dh), jnp.float32).astype(dtype) for kk in ks[:3])
  bias = jax.random.normal(ks[3], ((b,) if batched_bias else ()) + (h, n, n), jnp.float32)
  return q, k, v, bias


def _loss_and_grads(fn, q, k, v, bias):
  w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)  # a fixed, non-trivial cotangent
  loss = lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)  # jitted: one compile, not one per op


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("n", [17, 24])  # odd (padded to 24) and already a multiple of 8
@pytest.mark.parametrize("batched_bias", [False, True])
@jax.default_matmul_precision("highest")  # GPUs default to TF32-like float32 matmuls
def test_padded_path_matches_reference_fp32(n, batched_bias):
  q, k, v, bias = _inputs(3, n, 2, 8, jnp.float32, batched_bias=batched_bias)
  ref = jax.jit(attention_lib._xla_attention)(q, k, v, bias)
  out = jax.jit(lambda *a: attention_lib.padded_fused_attention(*a, implementation="xla"))(q, k, v, bias)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  (l_ref, g_ref) = _loss_and_grads(attention_lib._xla_attention, q, k, v, bias)
  (l_out, g_out) = _loss_and_grads(lambda *a: attention_lib.padded_fused_attention(*a, implementation="xla"),
                                   q, k, v, bias)
  np.testing.assert_allclose(l_out, l_ref, rtol=1e-5)
  for name, a, b in zip("qkv", g_out[:3], g_ref[:3]):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")
  # the bias gradient reaches only the real tokens' entries, with the reference's values
  assert g_out[3].shape == bias.shape
  np.testing.assert_allclose(g_out[3], g_ref[3], atol=1e-5, rtol=1e-4)


@jax.default_matmul_precision("highest")
def test_padded_path_without_bias_masks_the_padding():
  q, k, v, _ = _inputs(2, 9, 2, 8, jnp.float32)
  ref = attention_lib._xla_attention(q, k, v, None)
  out = attention_lib.padded_fused_attention(q, k, v, None, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


@jax.default_matmul_precision("highest")
def test_valid_tokens_mask_the_callers_padding_on_both_paths():
  """attention(..., valid=V) on q, k, v carrying tokens after the first V (padding a caller added, here
  random): the real rows equal the reference on the unpadded tokens, for the explicit form and the
  fused path run through jax's XLA implementation."""
  q, k, v, bias = _inputs(2, 9, 2, 8, jnp.float32)
  ref = attention_lib._xla_attention(q, k, v, bias)
  junk = jax.random.normal(jax.random.key(5), (2, 3, 2, 8))
  qp, kp, vp = (jnp.concatenate([t, junk], axis=1) for t in (q, k, v))
  out = attention_lib.attention(qp, kp, vp, bias, "xla", valid=9)
  np.testing.assert_allclose(out[:, :9], ref, atol=2e-6, rtol=1e-5)
  fused = attention_lib.padded_fused_attention(qp, kp, vp, bias, implementation="xla", valid=9)
  np.testing.assert_allclose(fused[:, :9], ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_padding_mask_is_finite_in_16_bit_and_the_padded_path_agrees(dtype):
  """The padded keys' mask value is finite in the dtype the fused kernel gets (-2^41 is -inf in float16,
  and -inf - -inf is NaN in a running max), and the padded fused path in 16 bits matches the float32
  reference within 16-bit rounding (2e-2 relative)."""
  bias = attention_lib.masked_padding_bias(None, 197, 200, dtype)
  assert bias.dtype == dtype and bool(jnp.isfinite(bias).all()) and float(bias.min()) < -1e4
  q, k, v, b = _inputs(2, 13, 2, 8, dtype)
  ref = attention_lib._xla_attention(*(t.astype(jnp.float32) for t in (q, k, v)), b)
  out = attention_lib.padded_fused_attention(q, k, v, b, implementation="xla")
  assert bool(jnp.isfinite(out).all()) and _rel(out, ref) < 2e-2


def test_resolve_and_errors():
  assert attention_lib.resolve("xla", jnp.bfloat16, 64) == "xla"
  expected_auto = "cudnn" if on_gpu else "xla"
  assert attention_lib.resolve("auto", jnp.bfloat16, 64) == expected_auto
  assert attention_lib.resolve("auto", jnp.float32, 64) == "xla"
  assert attention_lib.resolve("auto", jnp.bfloat16, 12) == "xla"   # head dim not a multiple of 8
  with pytest.raises(ValueError, match="attention must be one of"):
    attention_lib.resolve("flash", jnp.bfloat16, 64)
  q, k, v, bias = _inputs(1, 5, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="needs bfloat16 or float16"):
    attention_lib.attention(q, k, v, bias, "cudnn")


@pytest.mark.skipif(not on_gpu, reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("batched_bias", [False, True])
def test_cudnn_matches_reference_at_vit_b_shapes(batched_bias):
  """ViT-B/16: 197 tokens, 12 heads of 64, bf16. Tolerances are bf16's (METHOD: 1e-3 .. 1e-2 relative)."""
  q, k, v, bias = _inputs(8, 197, 12, 64, jnp.bfloat16, batched_bias=batched_bias)
  ref_fn = lambda q, k, v, b: attention_lib._xla_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                           v.astype(jnp.float32), b)
  fused = lambda *a: attention_lib.attention(*a, impl="cudnn")
  out = jax.jit(fused)(q, k, v, bias)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
  assert _rel(out, ref_fn(q, k, v, bias)) < 1e-2
  _, g_out = jax.jit(lambda *a: _loss_and_grads(fused, *a))(q, k, v, bias)
  _, g_ref = jax.jit(lambda *a: _loss_and_grads(ref_fn, *a))(q, k, v, bias)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_out, g_ref):
    assert _rel(a, b) < 2e-2, name


@pytest.mark.skipif(not on_gpu, reason="cuDNN attention needs an NVIDIA GPU")
def test_vit_logits_cudnn_vs_xla():
  """The whole ViT (rel-pos bias in every block) in bf16: cuDNN attention against the explicit form."""
  kw = dict(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(0), (4, 64, 64, 3))
  model_x = VisionTransformer(**kw, attention="xla")
  params = model_x.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)
  ref = model_x.apply({"params": params}, x)["logits"]
  out = VisionTransformer(**kw, attention="cudnn").apply({"params": params}, x)["logits"]
  assert _rel(out, ref) < 2e-2


def _fused_path_on_cpu(monkeypatch) -> list:
  """Every attention takes the fused path ("cudnn"), its call run through jax's XLA implementation of the
  same fused call (this CPU has no cuDNN). Returns the list each call of attention_lib.attention appends
  (tokens, valid) to: what the model hands it (handed too few tokens, it pads q, k and v itself, so the
  fused call sees the padded count either way)."""
  seen = []
  real_attention, real_fused = attention_lib.attention, attention_lib.fused_attention

  def recorded(q, k, v, *args, **kwargs):
    seen.append((q.shape[1], kwargs.get("valid")))
    return real_attention(q, k, v, *args, **kwargs)

  monkeypatch.setattr(attention_lib, "resolve", lambda impl, dtype, head_dim: "cudnn")
  monkeypatch.setattr(attention_lib, "attention", recorded)
  monkeypatch.setattr(attention_lib, "fused_attention",
                      lambda q, k, v, bias, valid, implementation: real_fused(q, k, v, bias, valid, implementation="xla"))
  return seen


@jax.default_matmul_precision("highest")
def test_vit_pads_tokens_once_for_the_fused_path(monkeypatch):
  """The fused path pads the 17 tokens of a 64 px / 16 px ViT to 24 before the q/k/v projections and drops
  the padded rows after the output projection. Run through jax's XLA implementation of the same fused
  call (CPU), the logits and every parameter's gradient equal the explicit form's."""
  kw = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, rel_pos="layer")
  x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 3))
  model = VisionTransformer(**kw, attention="xla")
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)

  def loss(params, model):
    return jnp.sum(model.apply({"params": params}, x)["logits"] ** 2)

  # jitted: op by op, the backward pass dispatches (and compiles) hundreds of small ops
  ref_loss, ref_grads = jax.jit(lambda p: jax.value_and_grad(loss)(p, model))(params)
  seen = _fused_path_on_cpu(monkeypatch)
  fused = VisionTransformer(**kw, attention="cudnn")
  out_loss, out_grads = jax.jit(lambda p: jax.value_and_grad(loss)(p, fused))(params)
  assert seen and all(s == (24, 17) for s in seen), seen
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(out_grads):
    np.testing.assert_allclose(g, flat_ref[path], atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tower", ["clip", "siglip", "dino", "dinov2_registers"])
def test_teacher_towers_pad_tokens_once_for_the_fused_path(monkeypatch, tower):
  """The teachers' towers (hf_vits) on the fused path pad their tokens once before the first layer (65 with
  [CLS], 49 without, 67 with [CLS] and 2 registers -> the next multiple of 8), mask them as keys in every
  layer and drop them after the last: run through jax's XLA implementation of the fused call (CPU), the
  output equals the explicit form's."""
  from beitv2_jax.models import hf_vits
  kw = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4, image_size=32)
  make, size, tokens = {
      "clip": (lambda: hf_vits.CLIPVision(**kw, projection_dim=16), 32, 65),
      "siglip": (lambda: hf_vits.SiglipVision(**dict(kw, image_size=28)), 28, 49),
      "dino": (lambda: hf_vits.DINOViT(**kw), 32, 65),
      "dinov2_registers": (lambda: hf_vits.Dinov2ViT(**kw, num_register_tokens=2), 32, 67)}[tower]
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 3))
  model = make()
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  ref = jax.jit(lambda p: model.apply({"params": p}, x))(params)
  seen = _fused_path_on_cpu(monkeypatch)
  out = jax.jit(lambda p: model.apply({"params": p}, x))(params)
  padded = tokens + (-tokens) % 8
  assert padded > tokens and seen == [(padded, tokens)] * kw["num_layers"], seen
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
