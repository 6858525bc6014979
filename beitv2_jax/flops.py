"""Model FLOPs per image, the count MFU is measured against: matmuls only (softmax, norms and the elementwise
rest are left out). 1 MAC = 2 FLOPs; a backward pass costs twice a forward; remat recomputation is not counted."""
from __future__ import annotations


def vit_forward_flops(img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0,
                      in_chans: int = 3, tokens: int | None = None) -> float:
  """Forward FLOPs of a ViT with a CLS token (ViT-B/16 at 224: 35.1 GFLOPs = 2 x 17.56 GMACs)."""
  n_patches = (img_size // patch_size) ** 2
  n = tokens or n_patches + 1
  d, m = embed_dim, int(embed_dim * mlp_ratio)
  per_block = n * (4 * d * d + 2 * d * m) + 2 * n * n * d  # qkv+proj, mlp, q@k and attn@v
  patch_embed = n_patches * patch_size * patch_size * in_chans * d
  return 2.0 * (depth * per_block + patch_embed)


def block_forward_flops(tokens: int, embed_dim: int, mlp_ratio: float = 4.0) -> float:
  d, m = embed_dim, int(embed_dim * mlp_ratio)
  return 2.0 * (tokens * (4 * d * d + 2 * d * m) + 2 * tokens * tokens * d)


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out
