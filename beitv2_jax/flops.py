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


def upernet_forward_flops(img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float,
                          channels: int, aux_channels: int, num_classes: int,
                          pool_scales: tuple[int, ...] = (1, 2, 3, 6)) -> float:
  """Forward FLOPs of UperNet on a BEiT backbone (models/upernet.py) on one img_size crop: the backbone, the
  transposed-conv necks, UPerHead's convolutions and the auxiliary FCNHead. At 512 px for ViT-B with 768
  channels the head outweighs the backbone (its 3x3 fusion conv runs on 3072 channels at 128x128)."""
  g, d, c = img_size // patch_size, embed_dim, channels
  sizes = [4 * g, 2 * g, g, g // 2]  # the pyramid: 1/4, 1/8, 1/16, 1/32 of the crop
  taps3 = lambda s: (3 * s - 2) ** 2  # a padded 3x3 conv on s x s: the kernel taps that land inside the map
  macs = (g * g * 4 * d * d) * 2 + (2 * g) ** 2 * 4 * d * d       # fpn1's two and fpn2's transposed convs
  macs += sum(s * s * d * c for s in pool_scales)                   # pyramid pooling 1x1 convs
  macs += taps3(sizes[3]) * (d + len(pool_scales) * c) * c         # its 3x3 bottleneck
  macs += sum(s * s * d * c + taps3(s) * c * c for s in sizes[:3])  # FPN laterals (1x1) and outputs (3x3)
  macs += taps3(sizes[0]) * 4 * c * c + sizes[0] ** 2 * c * num_classes  # fusion 3x3 and the classifier
  macs += taps3(sizes[2]) * d * aux_channels + sizes[2] ** 2 * aux_channels * num_classes  # auxiliary FCN head
  return vit_forward_flops(img_size, patch_size, embed_dim, depth, mlp_ratio) + 2.0 * macs
