"""Resampling of position tables as PyTorch does it, in numpy, so that a checkpoint used at another grid
gives the numbers its own code would: `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`, with or without `antialias` (jax.image.resize's bicubic is Keys' a = -0.5 with
antialiasing always on when shrinking, which neither matches)."""
from __future__ import annotations

import numpy as np


def torch_bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """(n_out, n_in) weights of torch's 1-D bicubic resampling, align_corners=False.

  Without antialias: Keys' kernel with a = -0.75, source coordinate (i + 0.5) * n_in / n_out - 0.5, four
  taps, indices clamped at the borders. With antialias (torch's `_upsample_bicubic2d_aa`, as PIL): a = -0.5,
  the kernel stretched by n_in / n_out when shrinking, taps outside the input dropped and the weights
  renormalised."""
  a = -0.5 if antialias else -0.75

  def cubic(x):  # Keys' kernel
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  if antialias:
    support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    for i in range(n_out):
      center = scale * (i + 0.5)
      lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
      w = cubic((np.arange(lo, hi) - center + 0.5) * inv)
      m[i, lo:hi] = w / w.sum()
    return m
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += cubic(k - t)
  return m


def resize_grid(grid: np.ndarray, dst: tuple[int, int], antialias: bool = False) -> np.ndarray:
  """(h, w, D) -> (H, W, D), torch's bicubic (see torch_bicubic_matrix), computed in float64."""
  g = np.asarray(grid, np.float64)
  new = np.einsum("ah,hwd->awd", torch_bicubic_matrix(g.shape[0], dst[0], antialias), g)
  return np.einsum("bw,awd->abd", torch_bicubic_matrix(g.shape[1], dst[1], antialias), new)


def resize_pos_embed(pos: np.ndarray, dst_grid: tuple[int, int], antialias: bool = False) -> np.ndarray:
  """(1, 1+h*w, D) -> (1, 1+H*W, D), bicubic on the patch part (the [CLS] entry kept), as the official
  BEiT code (no antialias) and transformers' DINOv2 / SigLIP interpolate_pos_encoding do it."""
  n = pos.shape[1] - 1
  src = int(round(np.sqrt(n)))
  if src * src != n:
    raise ValueError(f"position table of {n} patch entries is not a square grid")
  if (src, src) == tuple(dst_grid):
    return pos
  new = resize_grid(np.asarray(pos[0, 1:]).reshape(src, src, -1), dst_grid, antialias)
  return np.concatenate([pos[:, :1], new.reshape(1, -1, pos.shape[-1])], axis=1).astype(np.float32)
