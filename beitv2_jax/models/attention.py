"""Scaled dot-product attention with an additive bias (BEiT's relative-position bias), two ways.

- "xla": the explicit form: q * scale, q @ k^T in float32, + bias, float32 softmax, @ v. Runs everywhere
  and is the reference (it matches the official PyTorch code line by line).
- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
  NVIDIA GPUs with bfloat16/float16 inputs only. The (N x N) score matrix never reaches device memory.
  cuDNN wants an even sequence length when a bias is trained (ViT-B/16 has 197 tokens), so the tokens are
  padded to a multiple of 8 and the padded keys get a large negative bias; the padded query rows are
  dropped. The bias gradient flows back into the unpadded part only.
- "auto" (the default): "cudnn" where it applies (an NVIDIA GPU of compute capability 8.0 or newer, a 16-bit
  dtype, head dim a multiple of 8 and at most 128), else "xla".
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_PAD_MULTIPLE = 8
# cuDNN mishandles the difference of two very large negatives; jax's own mask value for 16-bit inputs.
_MASK_VALUE = -2.0 * 2.0 ** 40


def resolve(impl: str, dtype, head_dim: int) -> str:
  """The implementation `impl` means for these inputs on this backend ("auto" -> "xla" | "cudnn")."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl != "auto":
    return impl
  fits = (_cudnn_flash_device() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fits else "xla"


def _cudnn_flash_device() -> bool:
  """An NVIDIA GPU (not ROCm) of compute capability >= 8.0, what cuDNN's flash attention needs; read the
  way jax's own cuDNN attention checks it."""
  if jax.default_backend() != "gpu":
    return False
  device = jax.devices()[0]
  try:
    capability = tuple(int(x) for x in device.compute_capability.split("."))
    return "cuda" in device.client.platform_version and capability >= (8, 0)
  except (AttributeError, ValueError):
    return False


def attention(q: Array, k: Array, v: Array, bias: Optional[Array] = None, impl: str = "auto",
              valid: Optional[int] = None) -> Array:
  """q, k, v: (B, N, H, Dh) in the compute dtype; bias: (H, V, V) or (B, H, V, V), added to the scaled
  scores, for the first V = `valid` tokens (default all N). Tokens after them are padding the caller added
  (models/vit.py pads before the q/k/v projections, for the fused kernel): their keys are masked and their
  rows are garbage. Returns (B, N, H, Dh) in the dtype of v."""
  impl = resolve(impl, q.dtype, q.shape[-1])
  if impl == "xla":
    if valid is not None and valid < q.shape[1]:
      bias = masked_padding_bias(bias, valid, q.shape[1], jnp.float32)
    return _xla_attention(q, k, v, bias)
  return padded_fused_attention(q, k, v, bias, implementation="cudnn", valid=valid)


def _xla_attention(q, k, v, bias):
  q = q * q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def padded_length(n: int, impl: str, pad_multiple: int = _PAD_MULTIPLE) -> int:
  """Tokens the fused kernel wants for `n` real ones (the explicit form takes any count)."""
  return n + (-n) % pad_multiple if impl == "cudnn" else n


def pad_tokens(x: Array, impl: str) -> Array:
  """(B, N, D) tokens with zero tokens appended up to padded_length(N, impl) (none for the explicit form):
  padded before the q/k/v projections, q, k and v come out of them padded (callers pass `valid=N`)."""
  pad = padded_length(x.shape[1], impl) - x.shape[1]
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x


def masked_padding_bias(bias: Optional[Array], valid: int, n: int, dtype) -> Array:
  """The (.., H, valid, valid) bias (or None) widened to (.., n, n) with the keys from `valid` on masked
  (-2^41), in `dtype`, shaped (1 or B, H or 1, n, n) as jax.nn.dot_product_attention takes it."""
  if bias is None:
    bias = jnp.zeros((1, 1, valid, valid), jnp.float32)
  pad = n - valid
  if pad:
    bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 2) + [(0, pad), (0, pad)])
    bias = jnp.where(jnp.arange(n) >= valid, jnp.asarray(_mask_value(dtype), bias.dtype), bias)
  return bias.reshape((1,) * (4 - bias.ndim) + bias.shape).astype(dtype)


def _mask_value(dtype) -> float:
  """-2^41 where it is finite; float16 tops out at 65504, so -2^41 would be -inf there (and inf - inf
  in the kernel's running max is NaN): 0.7 of float16's largest value, as jax masks float16."""
  return -0.7 * float(jnp.finfo(jnp.float16).max) if jnp.dtype(dtype) == jnp.float16 else _MASK_VALUE


def fused_attention(q, k, v, bias, valid: int, implementation: str = "cudnn"):
  """jax.nn.dot_product_attention on q, k, v that already hold N >= `valid` tokens, the first `valid` real:
  the keys after them are masked. Returns all N rows (the padded ones are garbage for the caller to drop).
  Padding the tokens once, before the q/k/v projections (what models/vit.py does), spares the copies
  that padding q, k and v separately would make."""
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}: set "
                     "model.dtype='bfloat16' or attention='xla'")
  bias = masked_padding_bias(bias, valid, q.shape[1], q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=q.shape[-1] ** -0.5,
                                      implementation=implementation)


def padded_fused_attention(q, k, v, bias, implementation: str = "cudnn", pad_multiple: int = _PAD_MULTIPLE,
                           valid: Optional[int] = None):
  """fused_attention on q, k, v padded here to a multiple of `pad_multiple` tokens (none added when the
  caller padded already), the added rows dropped. `implementation="xla"` runs the same padding logic on
  any backend (tests)."""
  n = q.shape[1]
  pad = (-n) % pad_multiple
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q, k, v = widen(q), widen(k), widen(v)
  return fused_attention(q, k, v, bias, n if valid is None else valid, implementation)[:, :n]
