"""transformers' ViT-family vision towers as our own Flax modules whose parameter trees are transformers'
(the Flax trees where transformers had Flax classes, the PyTorch module paths otherwise), so that their
checkpoints load by renaming alone. Each returns the patch-token features VQ-KD distils:

- CLIPVision (`CLIPModel`): post_layernorm(all tokens)[:, 1:] @ visual_projection.
  (transformers' CLIPVisionModel applies post_layernorm only to the pooled output; we apply it to all.)
- DINOViT (`ViTModel`, DINO weights): the final layernorm's patch tokens.
- Dinov2ViT (`Dinov2Model` / `Dinov2WithRegistersModel`): layer scale, optional register tokens; the final
  layernorm's patch tokens (registers and [CLS] dropped).
- SiglipVision (`SiglipVisionModel`): no [CLS]; post_layernorm of every token.

Matmuls run in `dtype`; LayerNorms, residual stream and outputs in float32.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from beitv2_jax.models import attention as attention_lib

Array = jax.Array


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True)}


class _Attention(nn.Module):
  """Multi-head attention with biased q/k/v projections named after the checkpoint's modules; without an
  output name it returns the merged heads (HF ViT keeps its output projection in another module)."""
  heads: int
  names: tuple  # (q, k, v, out or None) module names
  dtype: Any

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    dense = lambda name, nout=d: nn.Dense(nout, dtype=self.dtype, name=name)
    q_name, k_name, v_name, o_name = self.names
    q, k, v = (dense(name)(x).reshape(b, n, self.heads, -1) for name in (q_name, k_name, v_name))
    out = attention_lib.attention(q, k, v).reshape(b, n, d)  # "auto": fused on GPUs in 16-bit
    return dense(o_name)(out) if o_name else out


class _Nest(nn.Module):
  """Runs `fn(module, *args)` inside a module named after one path component (to mirror HF nesting)."""
  fn: Callable

  @nn.compact
  def __call__(self, *args):
    return self.fn(self, *args)


class CLIPVision(nn.Module):
  """transformers' FlaxCLIPModel vision tower + visual_projection, parameter-compatible."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  projection_dim: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """pixels: CLIP-normalised NHWC. Returns (B, N, projection_dim)."""
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name=name)
    act = ACTIVATIONS[self.hidden_act]

    def vision_model(m, pixels):
      def embeddings(m, pixels):
        cls = m.param("class_embedding", nn.initializers.normal(0.02), (self.hidden_size,))
        x = nn.Conv(self.hidden_size, (self.patch_size,) * 2, (self.patch_size,) * 2, "VALID", use_bias=False,
                    dtype=self.dtype, name="patch_embedding")(pixels.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.hidden_size).astype(jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)), x], axis=1)
        pos = nn.Embed(x.shape[1], self.hidden_size, name="position_embedding")(jnp.arange(x.shape[1]))
        return x + pos

      x = _Nest(embeddings, name="embeddings")(pixels)
      x = ln("pre_layrnorm")(x)

      def encoder(m, x):
        def layers(m, x):
          for i in range(self.num_layers):
            def layer(m, x):
              h = _Attention(self.num_heads, ("q_proj", "k_proj", "v_proj", "out_proj"), self.dtype,
                             name="self_attn")(ln("layer_norm1")(x))
              x = x + h.astype(jnp.float32)

              def mlp(m, y):
                y = act(nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(y))
                return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(y)
              return x + _Nest(mlp, name="mlp")(ln("layer_norm2")(x)).astype(jnp.float32)
            x = _Nest(layer, name=str(i))(x)
          return x
        return _Nest(layers, name="layers")(x)

      x = _Nest(encoder, name="encoder")(x)
      return ln("post_layernorm")(x)  # applied to every token: the VQ-KD target, not HF's pooled output

    x = _Nest(vision_model, name="vision_model")(pixels)
    proj = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
    return proj(x[:, 1:]).astype(jnp.float32)


class DINOViT(nn.Module):
  """transformers' FlaxViTModel (DINO weights), parameter-compatible; returns the final-norm patch tokens."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name=name)
    act = ACTIVATIONS[self.hidden_act]
    d = self.hidden_size

    def embeddings(m, pixels):
      cls = m.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
      def patch_embeddings(m, p):
        return nn.Conv(d, (self.patch_size,) * 2, (self.patch_size,) * 2, "VALID", dtype=self.dtype,
                       name="projection")(p.astype(self.dtype))
      x = _Nest(patch_embeddings, name="patch_embeddings")(pixels)
      b = x.shape[0]
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.reshape(b, -1, d).astype(jnp.float32)], 1)
      return x + m.param("position_embeddings", nn.initializers.normal(0.02), (1, x.shape[1], d))

    x = _Nest(embeddings, name="embeddings")(pixels)

    def encoder(m, x):
      def layers(m, x):
        for i in range(self.num_layers):
          def layer(m, x):
            h = ln("layernorm_before")(x)
            h = _HFViTAttention(self.num_heads, self.dtype, name="attention")(h)
            x = x + h.astype(jnp.float32)
            h = ln("layernorm_after")(x)
            h = _Nest(lambda m, y: act(nn.Dense(self.intermediate_size, dtype=self.dtype, name="dense")(y)),
                      name="intermediate")(h)
            h = _Nest(lambda m, y: nn.Dense(d, dtype=self.dtype, name="dense")(y), name="output")(h)
            return x + h.astype(jnp.float32)
          x = _Nest(layer, name=str(i))(x)
        return x
      return _Nest(layers, name="layer")(x)

    x = _Nest(encoder, name="encoder")(x)
    return ln("layernorm")(x)[:, 1:]


class _HFViTAttention(nn.Module):
  """HF ViT nesting: attention/attention/{query,key,value} and attention/output/dense."""
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    h = _Attention(self.heads, ("query", "key", "value", None), self.dtype, name="attention")(x)
    return _Nest(lambda m, y: nn.Dense(x.shape[-1], dtype=self.dtype, name="dense")(y), name="output")(h)


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"teacher activation {name!r} is not supported: expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _mlp(m, x, hidden: int, out: int, act, dtype):
  """fc1 -> act -> fc2, inside a module named `mlp` (CLIP, DINOv2, SigLIP)."""
  return nn.Dense(out, dtype=dtype, name="fc2")(act(nn.Dense(hidden, dtype=dtype, name="fc1")(x)))


class Dinov2ViT(nn.Module):
  """transformers' Dinov2Model (and Dinov2WithRegistersModel with `num_register_tokens`), parameter-compatible
  (PyTorch module paths). Built for `image_size` px: its position table has that grid, resized from the
  checkpoint's when it differs (teacher.load_teacher). Returns the final layernorm's patch tokens."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  num_register_tokens: int = 0
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name=name)
    act = _activation(self.hidden_act)
    d, r = self.hidden_size, self.num_register_tokens

    def embeddings(m, pixels):
      cls = m.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
      x = _Nest(lambda m, p: nn.Conv(d, (self.patch_size,) * 2, (self.patch_size,) * 2, "VALID", dtype=self.dtype,
                                     name="projection")(p.astype(self.dtype)), name="patch_embeddings")(pixels)
      b = x.shape[0]
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.reshape(b, -1, d).astype(jnp.float32)], 1)
      x = x + m.param("position_embeddings", nn.initializers.normal(0.02), (1, x.shape[1], d))
      if r:  # after the position embeddings, between [CLS] and the patches
        reg = m.param("register_tokens", nn.initializers.zeros, (1, r, d))
        x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, r, d)), x[:, 1:]], 1)
      return x

    def layer_scale(name):
      return _Nest(lambda m, y: y * m.param("lambda1", nn.initializers.ones, (d,)), name=name)

    def layer(m, x):
      h = _HFViTAttention(self.num_heads, self.dtype, name="attention")(ln("norm1")(x))
      x = x + layer_scale("layer_scale1")(h.astype(jnp.float32))
      h = _Nest(lambda m, y: _mlp(m, y, self.intermediate_size, d, act, self.dtype), name="mlp")(ln("norm2")(x))
      return x + layer_scale("layer_scale2")(h.astype(jnp.float32))

    def layers(m, x):
      for i in range(self.num_layers):
        x = _Nest(layer, name=str(i))(x)
      return x

    x = _Nest(embeddings, name="embeddings")(pixels)
    x = _Nest(lambda m, x: _Nest(layers, name="layer")(x), name="encoder")(x)
    return ln("layernorm")(x)[:, 1 + r:]


class SiglipVision(nn.Module):
  """transformers' SiglipVisionModel (the `vision_model` of SiglipModel), parameter-compatible (PyTorch
  module paths); no [CLS] token. Returns post_layernorm of every patch token (its last_hidden_state; the
  attention-pooling head is not used)."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name=name)
    act = _activation(self.hidden_act)
    d = self.hidden_size

    def embeddings(m, pixels):
      x = nn.Conv(d, (self.patch_size,) * 2, (self.patch_size,) * 2, "VALID", dtype=self.dtype,
                  name="patch_embedding")(pixels.astype(self.dtype))
      x = x.reshape(x.shape[0], -1, d).astype(jnp.float32)
      return x + nn.Embed(x.shape[1], d, name="position_embedding")(jnp.arange(x.shape[1]))

    def layer(m, x):
      h = _Attention(self.num_heads, ("q_proj", "k_proj", "v_proj", "out_proj"), self.dtype,
                     name="self_attn")(ln("layer_norm1")(x))
      x = x + h.astype(jnp.float32)
      h = _Nest(lambda m, y: _mlp(m, y, self.intermediate_size, d, act, self.dtype), name="mlp")(ln("layer_norm2")(x))
      return x + h.astype(jnp.float32)

    def layers(m, x):
      for i in range(self.num_layers):
        x = _Nest(layer, name=str(i))(x)
      return x

    def vision_model(m, pixels):
      x = _Nest(embeddings, name="embeddings")(pixels)
      x = _Nest(lambda m, x: _Nest(layers, name="layers")(x), name="encoder")(x)
      return ln("post_layernorm")(x)

    return _Nest(vision_model, name="vision_model")(pixels)
