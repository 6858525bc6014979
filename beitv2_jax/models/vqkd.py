"""VQ-KD tokenizer (docs/method.md §1.1): ViT encoder -> Linear-Tanh-Linear to 32-d -> l2norm -> quantize ->
ViT decoder over the code map -> Linear-Tanh-Linear to the teacher's dim.

The codebook lives outside the module (`quantizer.Codebook`), so `encode` and `decode` are pure.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beitv2_jax.models import quantizer
from beitv2_jax.models.build import execution_of
from beitv2_jax.models.vit import VisionTransformer, rescale_init, trunc_normal

Array = jax.Array


def encoder_defaults(**kw) -> dict:
  """modeling_vqkd's get_model_default_params for the encoder: abs pos-emb, no rel-pos, no layer scale."""
  d = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
           use_abs_pos_emb=True, rel_pos="none", init_values=0.0, final_norm="fc_norm",
           init_style="finetune")
  d.update(kw)
  return d


def decoder_defaults(grid: int, **kw) -> dict:
  """The decoder is the same ViT over the (grid x grid x 32) code map with a 1x1 'patch embed'."""
  return encoder_defaults(img_size=grid, patch_size=1, **kw)


def vqkd_kwargs(*, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, decoder_embed_dim,
                decoder_depth, decoder_num_heads, codebook_size, codebook_dim, teacher_dim) -> dict:
  """A tokenizer's `config.model` -> VQKD's (stored) keyword arguments. teacher_dim: the teacher's feature
  dim, which the decoder reconstructs."""
  grid = img_size // patch_size
  enc = encoder_defaults(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio)
  dec = decoder_defaults(grid, embed_dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                         mlp_ratio=mlp_ratio)
  return dict(encoder=enc, decoder=dec, codebook_size=codebook_size, codebook_dim=codebook_dim,
              teacher_dim=teacher_dim)


def preprocess(images01: Array) -> Array:
  """Official pre_process: if the batch max is <= 1, scale by 255; then map [0, 255] to [-1, 1]."""
  x = images01.astype(jnp.float32)
  x = jnp.where(jnp.max(x) <= 1.0, x * 255.0, x)
  return x / 127.5 - 1.0


class VQKD(nn.Module):
  encoder: dict
  decoder: dict
  codebook_size: int = 8192
  codebook_dim: int = 32
  teacher_dim: int = 512
  dtype: Any = jnp.float32
  attention: str = "auto"
  add_norm: str = "xla"
  residual_dtype: Any = jnp.float32
  patch_embed: str = "conv"

  @nn.nowrap
  def encoder_module(self) -> VisionTransformer:
    """The encoder as a standalone module (params: this model's `encoder` subtree)."""
    return VisionTransformer(**self.encoder, **execution_of(self), parent=None)

  def setup(self):
    run = execution_of(self)  # no scan / remat fields: its blocks run unrolled
    self.enc = VisionTransformer(**self.encoder, **run, name="encoder")
    self.dec = VisionTransformer(**self.decoder, **run, name="decoder")
    dense = lambda n, name: nn.Dense(n, kernel_init=trunc_normal(0.02), dtype=jnp.float32, name=name)
    d_enc, d_dec = self.encoder["embed_dim"], self.decoder["embed_dim"]
    self.encode_task_layer_0 = dense(d_enc, "encode_task_layer_0")
    self.encode_task_layer_2 = dense(self.codebook_dim, "encode_task_layer_2")
    self.decode_task_layer_0 = dense(d_dec, "decode_task_layer_0")
    self.decode_task_layer_2 = dense(self.teacher_dim, "decode_task_layer_2")

  @property
  def grid(self) -> int:
    return self.encoder["img_size"] // self.encoder["patch_size"]

  def encode(self, images01: Array) -> Array:
    """(B, H, W, 3) images in [0, 1] -> (B, N, codebook_dim) l2-normalised vectors, float32."""
    out = self.enc(preprocess(images01))
    h = out["patch_tokens"].astype(jnp.float32)  # fc_norm on every patch token
    # encode_task_layer runs in fp32 (autocast disabled in the official code).
    z = self.encode_task_layer_2(jnp.tanh(self.encode_task_layer_0(h)))
    return quantizer.l2norm(z)

  def decode(self, zq: Array, train: bool = False) -> Array:
    """(B, N, codebook_dim) quantised vectors -> (B, N, teacher_dim) reconstructed teacher features."""
    b, n, c = zq.shape
    g = int(round(n ** 0.5))
    out = self.dec(zq.reshape(b, g, g, c), train=train)
    h = out["patch_tokens"]
    return self.decode_task_layer_2(jnp.tanh(self.decode_task_layer_0(h)))

  def __call__(self, images01: Array) -> Array:
    """Used for init only: encode, then decode the (unquantised) vectors."""
    return self.decode(self.encode(images01))

  def fix_init(self, params: dict) -> dict:
    params = dict(params)
    params["encoder"] = rescale_init(params["encoder"], [("blocks", 1)])
    params["decoder"] = rescale_init(params["decoder"], [("blocks", 1)])
    return params
