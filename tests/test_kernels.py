"""Pallas kernels against their explicit references, in interpret mode (the same kernel code a GPU compiles):
values and every gradient, at a width that is a power of two and one that is not (the masked block)."""
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
  (y, n), vjp = jax.vjp(kernel, *args)
  (y_ref, n_ref), vjp_ref = jax.vjp(reference, *args)
  assert y.dtype == jnp.float32 and n.dtype == out_dtype
  _close(y, y_ref, 1e-6, "y")
  # bf16 outputs: the same float32 value rounds to the same bf16 unless it sits on a rounding edge
  _close(n, n_ref, 1e-5 if out_dtype == jnp.float32 else 2 ** -8, "LN(y)")
  k = jax.random.split(jax.random.key(1), 2)
  cotangents = (jax.random.normal(k[0], y.shape), jax.random.normal(k[1], n.shape).astype(out_dtype))
  names = ("dx", "dh", "dgamma", "drow_scale", "dscale", "dbias")
  for name, got, want in zip(names, vjp(cotangents), vjp_ref(cotangents)):
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
