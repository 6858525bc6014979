"""Pallas kernels against their explicit references, in interpret mode (the same kernel code a GPU compiles):
values and every gradient, at a width that is a power of two and one that is not (the masked block)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beitv2_jax.kernels.add_layernorm import MAX_WIDTH, add_layernorm, add_layernorm_reference

EPS = 1e-6


def _inputs(width, h_dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (3, 5, width)) * 2.0 + 1.0  # off-centre rows: the mean matters
  h = jax.random.normal(k[1], (3, 5, width)).astype(h_dtype)
  gamma = jax.random.uniform(k[2], (width,)) + 0.1
  row_scale = jnp.array([1.0, 0.0, 1.25])[:, None] * jnp.ones((3, 5))  # no drop, dropped, kept at 1 / 0.8
  scale = jax.random.normal(k[3], (width,))
  bias = jax.random.normal(k[4], (width,))
  return x, h, gamma, row_scale, scale, bias


def _close(a, b, tol, what):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
  assert err <= tol, f"{what}: max error {err:.2e} of the largest value > {tol:.0e}"


@pytest.mark.parametrize("width, h_dtype, out_dtype", [(64, jnp.float32, jnp.float32), (48, jnp.float32, jnp.float32),
                                                       (48, jnp.bfloat16, jnp.bfloat16)])
def test_add_layernorm_values_and_gradients_equal_the_reference(width, h_dtype, out_dtype):
  args = _inputs(width, h_dtype)
  kernel = lambda *a: add_layernorm(*a, EPS, out_dtype, True)
  reference = lambda *a: add_layernorm_reference(*a, EPS, out_dtype)
  k = jax.random.split(jax.random.key(1), 2)
  shape = args[0].shape
  cotangents = (jax.random.normal(k[0], shape), jax.random.normal(k[1], shape).astype(out_dtype))
  # outputs and the pullback of the cotangents in one compiled program per implementation
  both = lambda fn: jax.jit(lambda a, ct: (fn(*a), jax.vjp(fn, *a)[1](ct)))(args, cotangents)
  (y, n), grads = both(kernel)
  (y_ref, n_ref), grads_ref = both(reference)
  assert y.dtype == jnp.float32 and n.dtype == out_dtype
  _close(y, y_ref, 1e-6, "y")
  # bf16 outputs: the same float32 value rounds to the same bf16 unless it sits on a rounding edge
  _close(n, n_ref, 1e-5 if out_dtype == jnp.float32 else 2 ** -8, "LN(y)")
  names = ("dx", "dh", "dgamma", "drow_scale", "dscale", "dbias")
  for name, got, want in zip(names, grads, grads_ref):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    _close(got, want, 1e-5 if h_dtype == jnp.float32 or name != "dh" else 2 ** -8, name)


def test_add_layernorm_chained_in_a_jitted_loss_has_the_references_gradient():
  """Two blocks' worth (the stream y of one feeds the next), under jit and grad: custom_vjp wired right."""
  x, h, gamma, row_scale, scale, bias = _inputs(48, jnp.float32)

  def loss(impl, x, h, gamma, scale, bias):
    y, n = impl(x, h, gamma, row_scale, scale, bias)
    y2, n2 = impl(y, jnp.tanh(n), gamma * 0.5, row_scale, scale, bias)
    return jnp.sum(y2 * 0.3) + jnp.sum(n2 ** 2) + jnp.sum(n * y)

  kernel = lambda *a: add_layernorm(*a, EPS, jnp.float32, True)
  reference = lambda *a: add_layernorm_reference(*a, EPS)
  got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3, 4)))(x, h, gamma, scale, bias)
  want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3, 4))(x, h, gamma, scale, bias)
  for name, a, b in zip(("dx", "dh", "dgamma", "dscale", "dbias"), got, want):
    _close(a, b, 1e-5, name)


def test_add_layernorm_refuses_a_row_wider_than_one_block():
  x = jnp.zeros((2, MAX_WIDTH + 1))
  ones = jnp.ones((MAX_WIDTH + 1,))
  with pytest.raises(ValueError, match="feature width 8193 > 8192"):
    add_layernorm(x, x, ones, jnp.ones((2,)), ones, ones, EPS, jnp.float32, True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
def test_add_layernorm_compiled_for_the_gpu_equals_the_reference():
  """benchmarks/gpu_check.sh runs this: the Triton kernel itself (not interpret mode) at ViT-B's width."""
  args = _inputs(768, jnp.bfloat16)
  (y, n), vjp = jax.vjp(lambda *a: add_layernorm(*a, EPS, jnp.bfloat16, False), *args)
  (y_ref, n_ref), vjp_ref = jax.vjp(lambda *a: add_layernorm_reference(*a, EPS, jnp.bfloat16), *args)
  _close(y, y_ref, 1e-6, "y")
  _close(n, n_ref, 2 ** -8, "LN(y)")
  cot = (jnp.ones_like(y), jnp.ones_like(n))
  for name, got, want in zip(("dx", "dh", "dgamma", "drow_scale", "dscale", "dbias"), vjp(cot), vjp_ref(cot)):
    _close(got, want, 2 ** -8 if name == "dh" else 1e-5, name)


@jax.default_matmul_precision("highest")  # float32 matmuls as float32 on GPUs too (gpu_check.sh runs this file)
def test_model_with_the_fused_add_norm_equals_the_xla_blocks():
  """model.add_norm="pallas" (interpret mode here) against "xla" on the tiny MIM model with layer scale and
  drop path in training: the same parameter tree at init, the same losses' values and gradients (1e-5)."""
  from beitv2_jax.models.mim import BEiTForMIM
  backbone = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=0.1,
                  drop_path_rate=0.2, use_mask_token=True, rel_pos="shared", final_norm="none",
                  init_style="pretrain")
  models = {impl: BEiTForMIM(backbone=backbone, vocab_size=32, early_layers=1, head_layers=1, add_norm=impl)
            for impl in ("xla", "pallas")}
  k = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(k[0], (2, 32, 32, 3))
  mask = jnp.zeros((2, 64), bool).at[:, ::4].set(True)
  params = {impl: jax.jit(m.init, static_argnums=3)({"params": k[1], "dropout": k[2]}, images, mask, 16)["params"]
            for impl, m in models.items()}
  assert jax.tree.structure(params["xla"]) == jax.tree.structure(params["pallas"])
  for a, b in zip(jax.tree.leaves(params["xla"]), jax.tree.leaves(params["pallas"])):
    np.testing.assert_array_equal(a, b)

  def loss(impl, p, rng):
    main, agg = models[impl].apply({"params": p}, images, mask, 16, train=True, rngs={"dropout": rng})
    return jnp.mean(main ** 2) + jnp.mean(jnp.tanh(agg))
  grads = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl))) for impl in models}  # one compile each
  for seed in range(3):  # drop-path draws differ per seed: some examples dropped, some kept
    rng = jax.random.key(10 + seed)
    want, g_want = grads["xla"](params["xla"], rng)
    got, g_got = grads["pallas"](params["xla"], rng)
    _close(got, want, 1e-5, "loss")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
      _close(a, b, 1e-5, jax.tree_util.keystr(path))


def test_an_unknown_add_norm_is_refused_before_anything_runs():
  from beitv2_jax import config_defaults
  from helpers import load_config
  c = load_config("pretrain_tiny")
  c.model.add_norm = "fused"
  with pytest.raises(ValueError, match=r"model.add_norm='fused': must be one of \('xla', 'pallas'\)"):
    config_defaults.validate(c)
  c.model.add_norm = "pallas"
  config_defaults.validate(c)


def test_the_fused_add_norm_is_refused_where_it_cannot_run_compiled():
  """The process's backend by default, or a compile target's (beitv2_jax.aot from a CPU host)."""
  from beitv2_jax.models.vit import check_add_norm
  assert check_add_norm("pallas") and not check_add_norm("xla")  # CPU here: interpret mode
  assert check_add_norm("pallas", backend="gpu", platform="cuda", device_count=1)
  for where, why in ((dict(backend="tpu"), "Triton kernel .*on TPUs use 'xla'"),
                     (dict(backend="gpu", platform="rocm", device_count=1), "NVIDIA GPUs only"),
                     (dict(backend="gpu", platform="cuda", device_count=2), "one GPU for now \\(2 here")):
    with pytest.raises(ValueError, match=why):
      check_add_norm("pallas", **where)
    assert not check_add_norm("xla", **where)


def test_add_layernorm_refuses_a_residual_stream_that_is_not_float32():
  x, h, gamma, row_scale, scale, bias = _inputs(48, jnp.float32)
  with pytest.raises(TypeError, match="x must be float32 .* got bfloat16"):
    add_layernorm(x.astype(jnp.bfloat16), h, gamma, row_scale, scale, bias, EPS, jnp.float32, True)
