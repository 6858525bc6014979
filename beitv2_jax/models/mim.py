"""BEiT v2 masked image modeling student with patch aggregation (docs/method.md §3.1, §3.2)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models.build import execution_of
from beitv2_jax.models.vit import LN_EPS, Block, VisionTransformer, rescale_init, trunc_normal

Array = jax.Array


def backbone_defaults(size: str = "base", **kw) -> dict:
  """modeling_pretrain's beit_{base,large}_patch16_224_8k_vocab_cls_pt backbone."""
  dims = {"base": (768, 12, 12, 0.1), "large": (1024, 24, 16, 1e-5)}[size]
  d = dict(img_size=224, patch_size=16, embed_dim=dims[0], depth=dims[1], num_heads=dims[2],
           mlp_ratio=4.0, use_abs_pos_emb=False, rel_pos="shared", init_values=dims[3],
           use_mask_token=True, final_norm="none", init_style="pretrain", num_classes=0)
  d.update(kw)
  return d


def mim_kwargs(*, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, init_values, drop_path_rate,
               early_layers, head_layers, agg_init_style, vocab_size) -> dict:
  """A pretraining `config.model` -> BEiTForMIM's (stored) keyword arguments: the backbone of
  `backbone_defaults` at this size, the aggregation head over block `early_layers`'s output."""
  backbone = backbone_defaults(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                               num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values,
                               drop_path_rate=drop_path_rate)
  return dict(backbone=backbone, vocab_size=vocab_size, early_layers=early_layers, head_layers=head_layers,
              agg_init_style=agg_init_style)


def masked_positions(mask: Array, num_masked: int) -> Array:
  """(B, N) bool -> (B, num_masked) indices of the masked patches in row-major order (static shape)."""
  return jnp.argsort(~mask, axis=1, stable=True)[:, :num_masked]


def agg_drop_path_rates(rate: float, depth: int, early: int, head: int) -> list[float]:
  """Official: linspace(0, rate, max(depth, early + head))[early : early + head]."""
  return np.linspace(0, rate, max(depth, early + head))[early:early + head].tolist()


class BEiTForMIM(nn.Module):
  """Params: `backbone/...` (the BEiT ViT), `norm`, `lm_head`, `cls_pt_layers_j` (aggregation head).

  __call__(images, mask, num_masked) -> (main, agg) logits, each (B, num_masked, vocab) at the masked
  positions in row-major order. Both heads share `norm` and `lm_head` (shared_lm_head=True).
  """
  backbone: dict
  vocab_size: int = 8192
  early_layers: int = 9
  head_layers: int = 2
  # The official aggregation blocks are created after `apply(_init_weights)` and keep PyTorch's default
  # init (kaiming-uniform kernels, non-zero biases); we follow that ("torch"), "pretrain" is the option.
  agg_init_style: str = "torch"
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = "none"
  attention: str = "auto"
  add_norm: str = "xla"
  residual_dtype: Any = jnp.float32
  patch_embed: str = "conv"

  def setup(self):
    if not 0 < self.early_layers <= self.backbone["depth"]:
      raise ValueError(f"early_layers={self.early_layers} must be in [1, depth={self.backbone['depth']}]")
    self.vit = VisionTransformer(**self.backbone, **execution_of(self), name="backbone")
    self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")
    self.lm_head = nn.Dense(self.vocab_size, kernel_init=trunc_normal(0.02, 1.0), dtype=self.dtype,
                            name="lm_head")
    b = self.backbone
    self.agg_rates = agg_drop_path_rates(b.get("drop_path_rate", 0.0), b["depth"], self.early_layers,
                                         self.head_layers)
    self.cls_pt_layers = [
        Block(num_heads=b["num_heads"], mlp_ratio=b.get("mlp_ratio", 4.0), init_values=b["init_values"],
              use_drop_path=b.get("drop_path_rate", 0.0) > 0, init_style=self.agg_init_style,
              dtype=self.dtype, attention=self.attention, add_norm=self.add_norm,
              residual_dtype=self.residual_dtype, name=f"cls_pt_layers_{j}")
        for j in range(self.head_layers)]

  def logits(self, tokens: Array, idx: Array) -> Array:
    patches = jnp.take_along_axis(tokens[:, 1:], idx[..., None], axis=1)
    return self.lm_head(self.norm(patches).astype(self.dtype)).astype(jnp.float32)

  def __call__(self, images: Array, mask: Array, num_masked: int, train: bool = False):
    out = self.vit(images, mask, train=train)
    idx = masked_positions(mask, num_masked)
    main = self.logits(out["x"], idx)
    # Patch aggregation: last block's CLS (before the final norm) + patch tokens output by block
    # `early_layers` (1-based), through `head_layers` blocks sharing the rel-pos bias, norm and lm_head.
    early = out["hidden"][self.early_layers - 1]
    x = jnp.concatenate([out["x"][:, :1], early[:, 1:]], axis=1)
    for block, rate in zip(self.cls_pt_layers, self.agg_rates):
      x = block(x, out["rel_pos_bias"], rate, train)
    x = x.astype(jnp.float32)  # a bfloat16 residual stream (residual_dtype) ends here
    agg = self.logits(x, idx)
    return main, agg

  @nn.nowrap
  def vit_module(self) -> VisionTransformer:
    """The backbone as a standalone module (params: this model's `backbone` subtree)."""
    return VisionTransformer(**self.backbone, **execution_of(self), parent=None)

  def fix_init(self, params: dict) -> dict:
    params = dict(params)
    params["backbone"] = rescale_init(params["backbone"], [("blocks", 1)])
    return rescale_init(params, [("cls_pt_layers", self.early_layers + 1)])
