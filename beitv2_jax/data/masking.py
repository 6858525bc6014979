"""Block-wise masking of BEiT v2 (the official `MaskingGenerator`), with the exact count of v2.

Randomness comes from a `np.random.Generator` that grain seeds per example, so a resumed run regenerates
the same masks. At 224/16 (14x14) the official setting is 75 masked patches, blocks of >= 16 patches with
aspect ratio in [0.3, 1/0.3]; other grids take the count from `mask_ratio`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


class MaskingGenerator:
  def __init__(self, grid=(14, 14), num_masking_patches: int = 75, min_num_patches: int = 16,
               max_num_patches: Optional[int] = None, min_aspect: float = 0.3, max_aspect: Optional[float] = None):
    self.height, self.width = grid
    self.num_patches = self.height * self.width
    if not 0 < num_masking_patches <= self.num_patches:
      raise ValueError(f"num_masking_patches={num_masking_patches} must be in [1, {self.num_patches}]")
    self.num_masking_patches = num_masking_patches
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  @classmethod
  def from_ratio(cls, grid, mask_ratio: float, min_num_patches: Optional[int] = None):
    """75/196 at 14x14 (the official count); round(ratio * N) elsewhere, with blocks >= N/12 patches."""
    n = grid[0] * grid[1]
    count = 75 if tuple(grid) == (14, 14) and abs(mask_ratio - 75 / 196) < 0.02 else int(round(mask_ratio * n))
    return cls(grid, count, min_num_patches if min_num_patches is not None else max(1, min(16, n // 12)))

  def _mask_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
    delta = 0
    for _ in range(10):
      # python's random.uniform(a, b) = a + (b - a) * u, which also allows b < a (numpy's does not)
      target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
      aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        num_masked = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          region = mask[top:top + h, left:left + w]
          delta += int((region == 0).sum())
          region[:] = 1
          self.last_blocks.append((max_mask_patches, h, w))
        if delta > 0:
          break
    return delta

  def __call__(self, rng: np.random.Generator, return_fill: bool = False):
    """Returns a (height, width) int32 mask with exactly `num_masking_patches` ones."""
    mask = np.zeros((self.height, self.width), np.int32)
    self.last_blocks = []  # (budget, h, w) of every block placed, for inspection
    count = 0
    while count < self.num_masking_patches:
      max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
      delta = self._mask_block(mask, max_mask_patches, rng)
      if delta == 0:
        break
      count += delta
    fill = self.num_masking_patches - count
    flat = mask.reshape(-1)
    if fill > 0:  # v2: top up with random unmasked patches to the exact count
      flat[rng.choice(np.flatnonzero(flat == 0), fill, replace=False)] = 1
    elif fill < 0:
      flat[rng.choice(np.flatnonzero(flat == 1), -fill, replace=False)] = 0
    assert mask.sum() == self.num_masking_patches
    return (mask, fill) if return_fill else mask
