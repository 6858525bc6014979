"""Semantic segmentation: UperNet on a BEiT backbone, as the official `semantic_segmentation/` (mmseg 0.x):
backbone_beit.py's BEiT with its four necks, mmseg's UPerHead and the auxiliary FCNHead (docs/method.md §4.3).

Layout NHWC. BatchNorm everywhere is mmseg's SyncBN: under jit on global arrays the batch statistics are
those of the global batch, so it is synchronised across devices and hosts by construction.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from beitv2_jax.models.build import execution_of
from beitv2_jax.models.vit import VisionTransformer, gelu

Array = jax.Array
BN_MOMENTUM, BN_EPS = 0.9, 1e-5  # torch BatchNorm momentum 0.1, eps 1e-5


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
  """F.interpolate(mode='bilinear', align_corners=False) for NHWC: half-pixel centres, no antialiasing."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def adaptive_avg_pool(x: Array, out: int) -> Array:
  """nn.AdaptiveAvgPool2d(out) for NHWC: bin i spans [floor(i H / out), ceil((i + 1) H / out))."""
  h, w = x.shape[1:3]
  bins = lambda n: [((i * n) // out, -(-((i + 1) * n) // out)) for i in range(out)]
  rows = [jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in bins(w)], axis=1) for r0, r1 in bins(h)]
  return jnp.stack(rows, axis=1)


def _kaiming_fan_out_normal(key, shape, dtype=jnp.float32):
  """mmcv kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal') for a (kh, kw, in, out) kernel."""
  fan_out = shape[0] * shape[1] * shape[3]
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)


def _torch_conv_transpose_init(out_channels: int, k: int):
  """nn.ConvTranspose2d's default init: U(+-1/sqrt(fan_in)) for kernel and bias, where torch takes fan_in from
  the weight's dim 1, i.e. out_channels * k * k."""
  bound = 1.0 / math.sqrt(out_channels * k * k)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ConvModule(nn.Module):
  """mmcv ConvModule(conv_cfg=None, norm_cfg=SyncBN, act_cfg=ReLU): conv without bias, BN, ReLU."""
  features: int
  kernel: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding=self.kernel // 2, use_bias=False,
                kernel_init=_kaiming_fan_out_normal, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=jnp.float32,
                     name="bn")(x.astype(jnp.float32))
    return nn.relu(x)


class ConvTranspose2x(nn.Module):
  """nn.ConvTranspose2d(d, d, kernel_size=2, stride=2): each input pixel becomes a 2x2 block."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = _torch_conv_transpose_init(self.features, 2)
    return nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
                            kernel_init=init, bias_init=init, dtype=self.dtype, name="conv")(x)


class SegHead(nn.Module):
  """mmseg BaseDecodeHead.cls_seg: Dropout2d (whole channels) then the 1x1 `conv_seg` (init N(0, 0.01))."""
  num_classes: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01), dtype=jnp.float32,
                   name="conv_seg")(x.astype(jnp.float32))


class UPerHead(nn.Module):
  """mmseg UPerHead: pyramid pooling on the coarsest level, FPN top-down, fused at the finest level."""
  num_classes: int
  channels: int = 768
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[Array], train: bool) -> Array:
    conv = lambda k, name: ConvModule(self.channels, k, self.dtype, name=name)
    top = levels[-1]
    psp = [top] + [resize_bilinear(conv(1, f"psp_modules_{i}")(adaptive_avg_pool(top, s), train), top.shape[1:3])
                   for i, s in enumerate(self.pool_scales)]
    laterals = [conv(1, f"lateral_convs_{i}")(x, train) for i, x in enumerate(levels[:-1])]
    laterals.append(conv(3, "bottleneck")(jnp.concatenate(psp, axis=-1), train))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, f"fpn_convs_{i}")(laterals[i], train) for i in range(len(laterals) - 1)] + [laterals[-1]]
    size = outs[0].shape[1:3]
    fused = conv(3, "fpn_bottleneck")(jnp.concatenate([resize_bilinear(o, size) for o in outs], axis=-1), train)
    return SegHead(self.num_classes, self.dropout, name="cls")(fused, train)


class FCNHead(nn.Module):
  """mmseg FCNHead(num_convs=1, concat_input=False): one 3x3 ConvModule, then cls_seg (the auxiliary head)."""
  num_classes: int
  channels: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = ConvModule(self.channels, 3, self.dtype, name="convs_0")(x, train)
    return SegHead(self.num_classes, self.dropout, name="cls")(x, train)


class UperNetBEiT(nn.Module):
  """BEiT backbone (a relative position table per block, layer scale, no absolute position embedding, no
  final norm), the patch tokens of blocks `out_indices` as (B, H/16, W/16, D) maps, made a pyramid at 1/4,
  1/8, 1/16, 1/32 by the official necks (fpn1: ConvT, SyncBN, GELU, ConvT; fpn2: ConvT; fpn3: identity; fpn4:
  2x max-pool), UPerHead on all four and FCNHead on the third. Returns (logits at 1/4, auxiliary logits at
  1/16), both (B, h, w, num_classes) in float32."""
  num_classes: int
  img_size: int = 512
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.15
  out_indices: Sequence[int] = (3, 5, 7, 11)
  channels: int = 768
  aux_channels: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = "none"
  attention: str = "auto"
  add_norm: str = "xla"
  residual_dtype: Any = jnp.float32
  patch_embed: str = "conv"

  def backbone(self) -> VisionTransformer:
    return VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                             depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, num_classes=0,
                             use_abs_pos_emb=False, rel_pos="layer", init_values=self.init_values,
                             drop_path_rate=self.drop_path_rate, final_norm="none", init_style="finetune",
                             **execution_of(self), name="backbone")

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    b, h, w, _ = images.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    hidden = self.backbone()(images, train=train)["hidden"]
    maps = [hidden[i][:, 1:].astype(jnp.float32).reshape(b, gh, gw, self.embed_dim) for i in self.out_indices]
    d = self.embed_dim
    x = ConvTranspose2x(d, self.dtype, name="fpn1_0")(maps[0])
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=jnp.float32,
                     name="fpn1_1")(x.astype(jnp.float32))
    levels = [ConvTranspose2x(d, self.dtype, name="fpn1_3")(gelu(x)),
              ConvTranspose2x(d, self.dtype, name="fpn2_0")(maps[1]),
              maps[2],
              nn.max_pool(maps[3], (2, 2), strides=(2, 2))]
    logits = UPerHead(self.num_classes, self.channels, dropout=self.dropout, dtype=self.dtype,
                      name="decode_head")(levels, train)
    aux = FCNHead(self.num_classes, self.aux_channels, self.dropout, self.dtype,
                  name="auxiliary_head")(levels[2], train)
    return logits, aux
