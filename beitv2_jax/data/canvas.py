"""The last resize of a training view, on the device, pixel-exact with PIL's (config `data.resize`).

PIL's bicubic / bilinear resize is fixed-point: each output pixel of a pass is
`clip8((sum_k in[start + k] * coef[k] + 2^21) >> 22)`, with integer coefficients (22 fractional bits) made
once per (input size, output size), one pass, its result rounded to uint8, then the other (Pillow's
libImaging/Resample.c; since Pillow 13 the vertical pass runs first when the height shrinks by more than twice
as many pixels as the width, `vertical_first`). The host computes the same coefficient tables (`taps`, float64
arithmetic in the C code's order), ships the crop instead of the resized view (top-left in a fixed
`canvas` x `canvas` uint8 array, so the step compiles once) with one table per axis, and `images` runs both
passes on the device as banded matmuls in float32: each coefficient split into a high and a low 11-bit half keeps
every product and every partial sum an integer below 2^24, so both matmuls are exact and their recombination
in int32 is PIL's sum, bit for bit. A crop larger than the canvas is resized on the host and shipped with
identity tables (coefficient 2^22 on one tap: the pass returns its input). The device always runs the
column pass first: a crop PIL resizes rows first is shipped transposed, with its tables swapped, and its
result transposed back (`canvas_transposed`).

A horizontal flip after the resize (the VQ-KD recipe's RandomHorizontalFlip) is the column table read in
reverse; a flip before it (MIM, where the crop is flipped) is done to the crop on the host.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL

PRECISION_BITS = 22  # Resample.c: 32 - 8 (the uint8 result) - 2 (headroom for the filter's negative lobes)
_HALF_BITS = 11      # the coefficients' split for exact float32 matmuls (see the module docstring)
# support (in output-pixel units at scale 1) of PIL's filters, and the filters themselves (Resample.c)
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _bicubic(x: np.ndarray) -> np.ndarray:
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": _bicubic, "bilinear": _bilinear}
INTERPOLATIONS = tuple(_FILTERS)


def _check(interpolation: str):
  if interpolation not in _FILTERS:
    raise ValueError(f"resize on the device supports {INTERPOLATIONS}, not {interpolation!r} (data.resize='host')")


_PASS_ORDER_BY_SIZE = int(PIL.__version__.split(".")[0]) >= 13  # python-pillow/Pillow#9549


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
  """Whether Pillow resizes (in_h, in_w) -> (out_h, out_w) rows first: from Pillow 13, when the height is
  reduced and by more than twice the width's reduction, in pixels (the rule read off Pillow's output over all
  sizes, tested against it); before Pillow 13, never."""
  return _PASS_ORDER_BY_SIZE and in_h > out_h and 2 * (in_w - out_w) < in_h - out_h


def _support(in_size: int, out_size: int, interpolation: str) -> tuple[float, float, int]:
  """(filterscale, support, ksize) of precompute_coeffs: the filter widened by the downscale, its taps."""
  _check(interpolation)
  filterscale = max(float(in_size) / out_size, 1.0)
  support = _SUPPORT[interpolation] * filterscale
  return filterscale, support, int(math.ceil(support)) * 2 + 1


def max_taps(canvas: int, out_size: int, interpolation: str = "bicubic") -> int:
  """Table width: PIL's `ksize` for the strongest downscale a canvas allows (canvas -> out_size)."""
  return _support(canvas, out_size, interpolation)[2]


@functools.lru_cache(maxsize=4096)
def taps(in_size: int, out_size: int, width: int, interpolation: str = "bicubic") -> np.ndarray:
  """PIL's fixed-point coefficients for resizing `in_size` pixels to `out_size` (box 0..in_size):
  int32 (out_size, 1 + width), per output pixel its first input pixel, then `width` coefficients (zero past
  the filter's last tap). precompute_coeffs + normalize_coeffs_8bpc of Resample.c, in its order of float64
  operations (sums taken tap by tap as the C loop does, not numpy's pairwise sum)."""
  scale = float(in_size) / out_size
  filterscale, support, ksize = _support(in_size, out_size, interpolation)
  if ksize > width:
    raise ValueError(f"resizing {in_size} -> {out_size} px takes {ksize} taps, the table has {width}")
  center = (np.arange(out_size) + 0.5) * scale
  xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  k = np.arange(ksize)
  valid = k[None, :] < xmax[:, None]
  w = np.where(valid, _FILTERS[interpolation](((k[None, :] + xmin[:, None]) - center[:, None] + 0.5)
                                              * (1.0 / filterscale)), 0.0)
  ww = np.zeros(out_size)
  for j in range(ksize):  # the C loop's order of additions
    ww = ww + w[:, j]
  w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
  scaled = w * (1 << PRECISION_BITS)
  kk = np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int32)
  table = np.zeros((out_size, 1 + width), np.int32)
  table[:, 0] = xmin
  table[:, 1:1 + ksize] = kk
  table.setflags(write=False)
  return table


def identity_taps(size: int, width: int) -> np.ndarray:
  """A table whose pass returns its input (for a view resized on the host)."""
  table = np.zeros((size, 1 + width), np.int32)
  table[:, 0] = np.arange(size)
  table[:, 1] = 1 << PRECISION_BITS
  return table


def pack(crop: np.ndarray, out_size: int, canvas: int, interpolation: str = "bicubic",
         flip_after: bool = False, resize_on_host=None) -> dict:
  """One example's wire fields for a view `crop` (uint8 (h, w, 3)) to be resized to `out_size`:
  {'canvas': (canvas, canvas, 3) uint8, 'canvas_rows' / 'canvas_cols': int32 tables, 'canvas_transposed': bool}.
  `flip_after`: the view is flipped left-right after the resize. A crop larger than the canvas is resized on
  the host by `resize_on_host(crop) -> (out_size, out_size, 3) uint8` (PIL, as without the canvas)."""
  h, w = crop.shape[:2]
  if h > canvas or w > canvas:
    view = resize_on_host(crop)
    return pack_resized(view[:, ::-1] if flip_after else view, canvas, interpolation)
  width = max_taps(canvas, out_size, interpolation)
  rows = taps(h, out_size, width, interpolation)
  cols = taps(w, out_size, width, interpolation)
  if flip_after:  # output column x is column out - 1 - x of the unflipped view
    cols = cols[::-1]
  transposed = vertical_first(h, w, out_size, out_size)
  if transposed:
    crop, rows, cols = crop.transpose(1, 0, 2), cols, rows
  return _fields(crop, rows, cols, canvas, transposed)


def pack_resized(view: np.ndarray, canvas: int, interpolation: str = "bicubic") -> dict:
  """pack's fields for a view the host has already resized (uint8 (out, out, 3)): identity tables."""
  out = view.shape[0]
  rows = identity_taps(out, max_taps(canvas, out, interpolation))
  return _fields(view, rows, rows, canvas, False)


def _fields(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray, canvas: int, transposed: bool) -> dict:
  board = np.zeros((canvas, canvas, 3), np.uint8)
  board[:pixels.shape[0], :pixels.shape[1]] = pixels
  return {"canvas": board, "canvas_rows": np.ascontiguousarray(rows), "canvas_cols": np.ascontiguousarray(cols),
          "canvas_transposed": np.bool_(transposed)}


BLOCK = 32  # output pixels per band: each band's taps span a window of ~BLOCK x scale + taps source pixels


def _split(coef: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int32 coefficients -> their high and low 11-bit halves as float32 (high * 2^11 + low == coef, for negative
  ones too: the shift floors)."""
  return (coef >> _HALF_BITS).astype(jnp.float32), (coef & ((1 << _HALF_BITS) - 1)).astype(jnp.float32)


def _round_clip(high_sum: jax.Array, low_sum: jax.Array) -> jax.Array:
  """Resample.c's `clip8(2^21 + sum)`: the exact integer sum from its two halves, shifted, clipped."""
  acc = (high_sum.astype(jnp.int32) << _HALF_BITS) + low_sum.astype(jnp.int32) + (1 << (PRECISION_BITS - 1))
  return jnp.clip(acc >> PRECISION_BITS, 0, 255).astype(jnp.float32)


def _pass(x: jax.Array, table: jax.Array) -> jax.Array:
  """One PIL pass along axis 2: (B, R, S, C) float32 pixel values, (B, out, 1 + width) tables -> (B, R, out, C).

  Banded: the outputs go in bands of BLOCK, and each band reads only the window of source pixels its taps span
  (a band's first tap moves by < BLOCK x S / out + 1), so the matmuls are (R x window) @ (window x BLOCK) per
  band, not (R x S) @ (S x out): 1/5 of the FLOPs at 448 -> 224. Exact for any window that holds the taps."""
  batch, _, source, _ = x.shape
  out, width = table.shape[1], table.shape[2] - 1
  bands = -(-out // BLOCK)
  pad = bands * BLOCK - out  # padded outputs: no taps
  start = jnp.pad(table[..., 0], ((0, 0), (0, pad)), mode="edge").reshape(batch, bands, BLOCK)
  coef = jnp.pad(table[..., 1:], ((0, 0), (0, pad), (0, 0))).reshape(batch, bands, BLOCK, width)
  window = min(source, int(math.ceil((BLOCK - 1) * source / out)) + 2 + width)
  first = jnp.clip(start.min(axis=-1), 0, source - window)  # (B, bands); min: a flipped table's starts fall
  cut = lambda xb, at: jax.lax.dynamic_slice_in_dim(xb, at, window, axis=1)
  windows = jax.vmap(jax.vmap(cut, in_axes=(None, 0)), in_axes=(0, 0))(x, first)  # (B, bands, R, window, C)
  pos = (first[:, :, None, None] + jax.lax.broadcasted_iota(jnp.int32, (1, 1, window, 1), 2)
         - start[:, :, None, :])  # (B, bands, window, BLOCK): the tap index of each window pixel
  weights = jnp.zeros(pos.shape, jnp.int32)
  for k in range(width):
    weights = jnp.where(pos == k, coef[:, :, None, :, k], weights)
  high, low = _split(weights)
  mm = functools.partial(jnp.einsum, "bjrlc,bjlp->bjrpc", precision=jax.lax.Precision.HIGHEST)
  y = _round_clip(mm(windows, high), mm(windows, low))  # (B, bands, R, BLOCK, C)
  y = jnp.moveaxis(y, 1, 2).reshape(batch, x.shape[1], bands * BLOCK, x.shape[3])
  return y[:, :, :out]


def resize(board: jax.Array, rows: jax.Array, cols: jax.Array, transposed: jax.Array) -> jax.Array:
  """(B, C, C, 3) uint8 canvases + tables -> (B, out, out, 3) uint8: PIL's two passes, exactly (columns
  first; the examples marked `transposed` were shipped transposed so that this is PIL's order for them)."""
  x = _pass(board.astype(jnp.float32), cols)                       # (B, C, out, 3)
  x = jnp.swapaxes(_pass(jnp.swapaxes(x, 1, 2), rows), 1, 2)       # (B, out, out, 3)
  x = jnp.where(transposed[:, None, None, None], jnp.swapaxes(x, 1, 2), x)
  return x.astype(jnp.uint8)


def images(batch: dict, key: str = "image") -> jax.Array:
  """The batch's uint8 views: `batch[key]` when the host resized them, else resized here from the canvas."""
  if key in batch:
    return batch[key]
  return resize(batch["canvas"], batch["canvas_rows"], batch["canvas_cols"], batch["canvas_transposed"])
