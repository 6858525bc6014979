"""Residual add + LayerNorm in one Pallas kernel, forward and backward (issue: GPU speed past XLA's fusions).

A pre-LN block ends each branch with `x = x + drop_path(gamma * h)` and starts the next with `LN(x)`. XLA
writes the new residual stream, reads it back for the row statistics, and in the backward pass reads it and
the branch output again for each of its reductions. This kernel makes one pass over a row per direction:

  forward   (x, h, gamma, row_scale, scale, bias) -> y = x + row_scale * gamma * h   (float32: the stream)
                                                     n = (y - mean) * rstd * scale + bias   (out_dtype)
  backward  (dy, dn) -> dx = dy + rstd * (g - mean(g) - yhat * mean(g * yhat)),  g = dn * scale
                        dh = dx * row_scale * gamma
            and, over all rows (XLA reductions): dscale = sum(dn * yhat), dbias = sum(dn),
                                                  dgamma = sum(dx * row_scale * h)

`row_scale` carries drop path (0 or 1 / keep_prob per example; ones without it) and gets no gradient.
The mean and variance are two-pass over the row (the variance of y - mean), in float32.

One row per program: a (D,) row, D <= 8192, read as one power-of-two block under a mask (Triton's blocks are
powers of two; ViT-B's 768 is not). Interpret mode runs the same kernels on any backend (tests on CPU).
The math, written out without Pallas, is `add_layernorm_reference`; the tests hold the kernel to it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu  # masked row loads and stores (Triton; interpret: any)

MAX_WIDTH = 8192


def add_layernorm_reference(x, h, gamma, row_scale, scale, bias, eps: float, out_dtype=jnp.float32):
  """The explicit formula: (y, LN(y) in out_dtype). x (..., D) float32, h (..., D), row_scale (...)."""
  row_scale = jax.lax.stop_gradient(row_scale)  # a drop-path mask: no gradient, as in the kernel
  y = x + row_scale[..., None] * (gamma * h.astype(jnp.float32))
  mean = y.mean(-1, keepdims=True)
  yc = y - mean
  rstd = jax.lax.rsqrt((yc * yc).mean(-1, keepdims=True) + eps)
  return y, (yc * rstd * scale + bias).astype(out_dtype)


def _row(ref, cols, mask):
  return plgpu.load(ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)


def _forward_kernel(x_ref, h_ref, gamma_ref, rs_ref, scale_ref, bias_ref,  # inputs
                    y_ref, n_ref, mean_ref, rstd_ref,                     # outputs
                    *, eps: float, block: int):
  width = x_ref.shape[0]
  cols = jnp.arange(block)
  mask = cols < width
  y = _row(x_ref, cols, mask) + rs_ref[...] * _row(gamma_ref, cols, mask) * _row(h_ref, cols, mask)
  mean = jnp.sum(y) / width
  yc = jnp.where(mask, y - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(yc * yc) / width + eps)
  n = yc * rstd * _row(scale_ref, cols, mask) + _row(bias_ref, cols, mask)
  plgpu.store(y_ref.at[cols], y, mask=mask)
  plgpu.store(n_ref.at[cols], n.astype(n_ref.dtype), mask=mask)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(y_ref, h_ref, gamma_ref, rs_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dn_ref,  # inputs
                     dx_ref, dh_ref,                                                                  # outputs
                     *, block: int):
  width = y_ref.shape[0]
  cols = jnp.arange(block)
  mask = cols < width
  rstd = rstd_ref[...]
  yhat = jnp.where(mask, (_row(y_ref, cols, mask) - mean_ref[...]) * rstd, 0.0)
  g = _row(dn_ref, cols, mask) * _row(scale_ref, cols, mask)
  c1 = jnp.sum(g * yhat) / width
  c2 = jnp.sum(g) / width
  dx = _row(dy_ref, cols, mask) + rstd * (g - c2 - yhat * c1)
  plgpu.store(dx_ref.at[cols], dx, mask=mask)
  dh = dx * rs_ref[...] * _row(gamma_ref, cols, mask)
  plgpu.store(dh_ref.at[cols], dh.astype(dh_ref.dtype), mask=mask)


def _block(width: int) -> int:
  if width > MAX_WIDTH:
    raise ValueError(f"add_layernorm: feature width {width} > {MAX_WIDTH} (one row per program)")
  return pl.next_power_of_2(width)


def _per_row(kernel, out_shape, block: int, interpret, name: str, in_axes):
  """A pallas_call on one row, vmapped over rows (vmap adds the grid axis). Triton's compiler parameters
  select the Triton lowering on GPUs (as jax's own Pallas layer_norm: a warp per 256 columns, 1 to 8).
  interpret=None: the compiled kernel where the program is lowered for CUDA, interpret mode elsewhere (chosen
  at lowering, so an ahead-of-time compile for a GPU on a CPU host gets the Triton kernel)."""
  params = plgpu.CompilerParams(num_warps=min(max(block // 256, 1), 8))
  calls = {mode: jax.vmap(pl.pallas_call(kernel, out_shape=out_shape, grid=(), interpret=mode, name=name,
                                         compiler_params=params), in_axes=in_axes) for mode in (False, True)}
  if interpret is not None:
    return calls[bool(interpret)]
  return lambda *args: jax.lax.platform_dependent(*args, cuda=calls[False], default=calls[True])


def _forward(x, h, gamma, row_scale, scale, bias, eps, out_dtype, interpret):
  if x.dtype != jnp.float32:  # y and dx are float32: the residual stream's dtype
    raise TypeError(f"add_layernorm: x must be float32 (the residual stream), got {x.dtype}")
  width = x.shape[-1]
  rows = (x.reshape(-1, width), h.reshape(-1, width), row_scale.reshape(-1))
  block = _block(width)
  kernel = functools.partial(_forward_kernel, eps=eps, block=block)
  out_shape = [jax.ShapeDtypeStruct((width,), jnp.float32), jax.ShapeDtypeStruct((width,), out_dtype),
               jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)]
  y, n, mean, rstd = _per_row(kernel, out_shape, block, interpret, "add_layernorm_fwd", (0, 0, None, 0, None, None))(
      rows[0], rows[1], gamma.astype(jnp.float32), rows[2].astype(jnp.float32), scale.astype(jnp.float32),
      bias.astype(jnp.float32))
  return y.reshape(x.shape), n.reshape(x.shape), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def add_layernorm(x, h, gamma, row_scale, scale, bias, eps: float = 1e-6, out_dtype=jnp.float32,
                  interpret: bool | None = None):
  """(y, n): the new residual stream y = x + row_scale * gamma * h (float32) and LN(y) in out_dtype.
  x: (..., D) float32; h: (..., D) any float dtype; gamma, scale, bias: (D,); row_scale: x.shape[:-1].
  interpret: None compiles the kernel for CUDA and interprets it on other platforms; True / False force."""
  y, n, _, _ = _forward(x, h, gamma, row_scale, scale, bias, eps, out_dtype, interpret)
  return y, n


def _fwd(x, h, gamma, row_scale, scale, bias, eps, out_dtype, interpret):
  y, n, mean, rstd = _forward(x, h, gamma, row_scale, scale, bias, eps, out_dtype, interpret)
  return (y, n), (y, h, gamma, row_scale, scale, bias, mean, rstd)


def _bwd(eps, out_dtype, interpret, res, cotangents):
  y, h, gamma, row_scale, scale, bias, mean, rstd = res
  dy, dn = cotangents
  width = y.shape[-1]
  flat = lambda a: a.reshape(-1, width)
  block = _block(width)
  kernel = functools.partial(_backward_kernel, block=block)
  out_shape = [jax.ShapeDtypeStruct((width,), jnp.float32), jax.ShapeDtypeStruct((width,), h.dtype)]
  rs = row_scale.reshape(-1).astype(jnp.float32)
  dx, dh = _per_row(kernel, out_shape, block, interpret, "add_layernorm_bwd", (0, 0, None, 0, None, 0, 0, 0, 0))(
      flat(y), flat(h), gamma.astype(jnp.float32), rs, scale.astype(jnp.float32), mean, rstd,
      flat(dy).astype(jnp.float32), flat(dn))
  # the reductions over rows: XLA's (one fused pass over dn, y, dx, h each)
  dn32 = flat(dn).astype(jnp.float32)
  yhat = (flat(y) - mean[:, None]) * rstd[:, None]
  dscale = jnp.sum(dn32 * yhat, 0)
  dbias = jnp.sum(dn32, 0)
  dgamma = jnp.sum(dx * rs[:, None] * flat(h).astype(jnp.float32), 0)
  return (dx.reshape(y.shape), dh.reshape(h.shape), dgamma.astype(gamma.dtype),
          jnp.zeros_like(row_scale), dscale.astype(scale.dtype), dbias.astype(bias.dtype))


add_layernorm.defvjp(_fwd, _bwd)
