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
  def __call__(self, x, valid: int):
    """x: (B, N, D) whose first `valid` tokens are real; the rest is padding (_stack), masked as keys."""
    b, n, d = x.shape
    dense = lambda name, nout=d: nn.Dense(nout, dtype=self.dtype, name=name)
    q_name, k_name, v_name, o_name = self.names
    q, k, v = (dense(name)(x).reshape(b, n, self.heads, -1) for name in (q_name, k_name, v_name))
    out = attention_lib.attention(q, k, v, valid=valid).reshape(b, n, d)  # "auto": fused on GPUs in 16-bit
    return dense(o_name)(out) if o_name else out


class _Nest(nn.Module):
  """Runs `fn(module, *args)` inside a module named after one path component (to mirror HF nesting)."""
  fn: Callable

  @nn.compact
  def __call__(self, *args):
    return self.fn(self, *args)


class _Tower(nn.Module):
  """The fields every tower takes (transformers' config names in our spelling) and the pieces they share."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32


# Helpers of the towers' compact methods. Plain functions, not Module methods: a Module method would
# become the parent of the submodules it creates, and these must land in the _Nest that calls them.
def _ln(t: _Tower, name):
  return nn.LayerNorm(epsilon=t.layer_norm_eps, dtype=jnp.float32, name=name)


def _patches(t: _Tower, pixels, name, use_bias=True):
  """(B, H, W, 3) -> (B, N, hidden) float32: the patch convolution named `name`."""
  x = nn.Conv(t.hidden_size, (t.patch_size,) * 2, (t.patch_size,) * 2, "VALID", use_bias=use_bias,
              dtype=t.dtype, name=name)(pixels.astype(t.dtype))
  return x.reshape(x.shape[0], -1, t.hidden_size).astype(jnp.float32)


def _stack(t: _Tower, x, layer, *names):
  """`layer(m, x, valid)` in modules "0".."num_layers-1", nested under `names` (e.g. "encoder", "layers").

  Where attention runs fused (a GPU in 16-bit), the tokens are padded here, once for the whole stack, to the
  kernel's multiple and dropped after the last layer (models/vit.py pads each block's input): q, k and v
  then come out of their projections padded, instead of being padded (and the output sliced) in every
  layer. The padded tokens are masked as keys (`valid`), so the real tokens' outputs are unchanged; per-token
  ops leave them finite."""
  n = x.shape[1]
  x = attention_lib.pad_tokens(x, attention_lib.resolve("auto", t.dtype, t.hidden_size // t.num_heads))

  def run(m, x):
    for i in range(t.num_layers):
      x = _Nest(layer, name=str(i))(x, n)
    return x
  for name in reversed(names):
    run = (lambda inner, name: lambda m, x: _Nest(inner, name=name)(x))(run, name)
  return run(None, x)[:, :n]


def _clip_style_layer(t: _Tower, m, x, valid):
  """CLIP's and SigLIP's block: layer_norm1, self_attn (q/k/v/out_proj), layer_norm2, mlp (fc1, fc2)."""
  h = _Attention(t.num_heads, ("q_proj", "k_proj", "v_proj", "out_proj"), t.dtype,
                 name="self_attn")(_ln(t, "layer_norm1")(x), valid)
  x = x + h.astype(jnp.float32)
  h = _Nest(lambda m, y: _mlp(m, y, t.intermediate_size, t.hidden_size, _activation(t.hidden_act), t.dtype),
            name="mlp")(_ln(t, "layer_norm2")(x))
  return x + h.astype(jnp.float32)


class CLIPVision(_Tower):
  """transformers' FlaxCLIPModel vision tower + visual_projection, parameter-compatible."""
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """pixels: CLIP-normalised NHWC. Returns (B, N, projection_dim)."""
    d = self.hidden_size

    def embeddings(m, pixels):
      cls = m.param("class_embedding", nn.initializers.normal(0.02), (d,))
      x = _patches(self, pixels, "patch_embedding", use_bias=False)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
      return x + nn.Embed(x.shape[1], d, name="position_embedding")(jnp.arange(x.shape[1]))

    def vision_model(m, pixels):
      x = _ln(self, "pre_layrnorm")(_Nest(embeddings, name="embeddings")(pixels))
      x = _stack(self, x, lambda m, x, valid: _clip_style_layer(self, m, x, valid), "encoder", "layers")
      return _ln(self, "post_layernorm")(x)  # applied to every token: the VQ-KD target, not HF's pooled output

    x = _Nest(vision_model, name="vision_model")(pixels)
    proj = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
    return proj(x[:, 1:]).astype(jnp.float32)


def _embed_with_cls(tower: _Tower, m, pixels):
  """HF ViT / DINOv2 embeddings: [CLS] + patch_embeddings/projection, + position_embeddings (float32)."""
  d = tower.hidden_size
  cls = m.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
  x = _Nest(lambda m, p: _patches(tower, p, "projection"), name="patch_embeddings")(pixels)
  x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], 1)
  return x + m.param("position_embeddings", nn.initializers.normal(0.02), (1, x.shape[1], d))


class DINOViT(_Tower):
  """transformers' FlaxViTModel (DINO weights), parameter-compatible; returns the final-norm patch tokens."""
  layer_norm_eps: float = 1e-12

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    act, d = _activation(self.hidden_act), self.hidden_size

    def layer(m, x, valid):
      h = _HFViTAttention(self.num_heads, self.dtype, name="attention")(_ln(self, "layernorm_before")(x), valid)
      x = x + h.astype(jnp.float32)
      h = _ln(self, "layernorm_after")(x)
      h = _Nest(lambda m, y: act(nn.Dense(self.intermediate_size, dtype=self.dtype, name="dense")(y)),
                name="intermediate")(h)
      h = _Nest(lambda m, y: nn.Dense(d, dtype=self.dtype, name="dense")(y), name="output")(h)
      return x + h.astype(jnp.float32)

    x = _Nest(lambda m, p: _embed_with_cls(self, m, p), name="embeddings")(pixels)
    x = _stack(self, x, layer, "encoder", "layer")
    return _ln(self, "layernorm")(x)[:, 1:]


class _HFViTAttention(nn.Module):
  """HF ViT nesting: attention/attention/{query,key,value} and attention/output/dense."""
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x, valid: int):
    h = _Attention(self.heads, ("query", "key", "value", None), self.dtype, name="attention")(x, valid)
    return _Nest(lambda m, y: nn.Dense(x.shape[-1], dtype=self.dtype, name="dense")(y), name="output")(h)


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"teacher activation {name!r} is not supported: expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _mlp(m, x, hidden: int, out: int, act, dtype):
  """fc1 -> act -> fc2, inside a module named `mlp` (CLIP, DINOv2, SigLIP)."""
  return nn.Dense(out, dtype=dtype, name="fc2")(act(nn.Dense(hidden, dtype=dtype, name="fc1")(x)))


class Dinov2ViT(_Tower):
  """transformers' Dinov2Model (and Dinov2WithRegistersModel with `num_register_tokens`), parameter-compatible
  (PyTorch module paths). Built for `image_size` px: its position table has that grid, resized from the
  checkpoint's when it differs (teacher.load_teacher). Returns the final layernorm's patch tokens."""
  num_register_tokens: int = 0

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    d, r = self.hidden_size, self.num_register_tokens

    def embeddings(m, pixels):
      x = _embed_with_cls(self, m, pixels)
      if r:  # after the position embeddings, between [CLS] and the patches
        reg = m.param("register_tokens", nn.initializers.zeros, (1, r, d))
        x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (x.shape[0], r, d)), x[:, 1:]], 1)
      return x

    def layer_scale(name):
      return _Nest(lambda m, y: y * m.param("lambda1", nn.initializers.ones, (d,)), name=name)

    def layer(m, x, valid):
      h = _HFViTAttention(self.num_heads, self.dtype, name="attention")(_ln(self, "norm1")(x), valid)
      x = x + layer_scale("layer_scale1")(h.astype(jnp.float32))
      h = _Nest(lambda m, y: _mlp(m, y, self.intermediate_size, d, _activation(self.hidden_act), self.dtype),
                name="mlp")(_ln(self, "norm2")(x))
      return x + layer_scale("layer_scale2")(h.astype(jnp.float32))

    x = _Nest(embeddings, name="embeddings")(pixels)
    x = _stack(self, x, layer, "encoder", "layer")
    return _ln(self, "layernorm")(x)[:, 1 + r:]


class SiglipVision(_Tower):
  """transformers' SiglipVisionModel (the `vision_model` of SiglipModel), parameter-compatible (PyTorch
  module paths); no [CLS] token. Returns post_layernorm of every patch token (its last_hidden_state; the
  attention-pooling head is not used)."""
  hidden_act: str = "gelu_pytorch_tanh"

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    def embeddings(m, pixels):
      x = _patches(self, pixels, "patch_embedding")
      return x + nn.Embed(x.shape[1], self.hidden_size, name="position_embedding")(jnp.arange(x.shape[1]))

    def vision_model(m, pixels):
      x = _Nest(embeddings, name="embeddings")(pixels)
      x = _stack(self, x, lambda m, x, valid: _clip_style_layer(self, m, x, valid), "encoder", "layers")
      return _ln(self, "post_layernorm")(x)

    return _Nest(vision_model, name="vision_model")(pixels)
