"""Frozen teachers for VQ-KD (docs/method.md §1.3), as our own Flax modules whose parameter trees are transformers'
Flax trees, so they work whether or not the installed transformers still ships Flax classes.

- CLIP (`CLIPModel` checkpoints): target = post_layernorm(all tokens)[:, 1:] @ visual_projection -> 512-d.
  (transformers' CLIPVisionModel applies post_layernorm only to the pooled output; we apply it to all.)
- DINO (`ViTModel` checkpoints, e.g. facebook/dino-vitb16): target = final layernorm, patch tokens -> 768-d.

Weights: a hub id (downloaded with huggingface_hub when the network allows) or a local folder with
`config.json` and `flax_model.msgpack` or `model.safetensors` (PyTorch names). `random_teacher` builds a
randomly initialised CLIP of a given size for offline debugging.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.trees import flatten, unflatten
from beitv2_jax.models import attention as attention_lib

Array = jax.Array
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True)}


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


# ------------------------------------------------------------------------------------------------
# The teacher as used by the tokenizer
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
  """A frozen teacher: `target(images01)` -> (B, N, dim) features, computed from [0, 1] images."""
  module: nn.Module
  params: Any
  kind: str  # "clip" | "dino"
  dim: int
  source: str

  def normalise(self, images01: Array) -> Array:
    # The official chain: tokenizer pre_process to [-1, 1], then the teacher's scaling layer back to [0, 1]
    # (clamped) and its mean/std.
    from beitv2_jax.models.vqkd import preprocess
    x01 = jnp.clip((preprocess(images01) + 1.0) * 127.5, 0.0, 255.0) / 255.0
    mean, std = (CLIP_MEAN, CLIP_STD) if self.kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return (x01 - jnp.asarray(mean)) / jnp.asarray(std)

  def apply(self, params, images01: Array, grid: int = 0) -> Array:
    """Teacher features (B, N, dim). With `grid` set and different from the teacher's own token grid
    (a non-official option, `teacher_resize`), the image is resized to the teacher's input size and its
    feature map resized (bilinear, antialiased) to grid x grid."""
    x = self.normalise(images01)
    b, size = x.shape[0], self.module.image_size
    if x.shape[1] != size or x.shape[2] != size:
      x = jax.image.resize(x, (b, size, size, x.shape[-1]), "bicubic")
    feats = jax.lax.stop_gradient(self.module.apply({"params": params}, x))
    g = self.grid()
    if grid and grid != g:
      feats = jax.image.resize(feats.reshape(b, g, g, -1), (b, grid, grid, feats.shape[-1]), "linear")
      feats = feats.reshape(b, grid * grid, -1)
    return feats

  def target(self, images01: Array) -> Array:
    return self.apply(self.params, images01)

  def grid(self) -> int:
    return self.module.image_size // self.module.patch_size


def _clip_module(cfg: dict, dtype) -> CLIPVision:
  v = cfg.get("vision_config", cfg)
  return CLIPVision(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                    num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                    patch_size=v["patch_size"], image_size=v["image_size"],
                    projection_dim=cfg.get("projection_dim", 512), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                    hidden_act=v.get("hidden_act", "quick_gelu"), dtype=dtype)


# The official DINO teacher is DINO's own ViT, LayerNorm eps 1e-6; transformers' conversion of the same
# weights (facebook/dino-vitb16) says 1e-12 in its config. The official value wins.
DINO_LN_EPS = 1e-6


def _dino_module(cfg: dict, dtype) -> DINOViT:
  return DINOViT(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                 num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                 patch_size=cfg["patch_size"], image_size=cfg["image_size"],
                 layer_norm_eps=DINO_LN_EPS, hidden_act=cfg.get("hidden_act", "gelu"), dtype=dtype)


def _torch_key(path: tuple, kind: str) -> str:
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  key = ".".join(path[:-1] + (leaf,))
  return key


def _from_torch_names(sd: dict, template: dict, kind: str, prefixes: tuple) -> dict:
  out, missing = {}, []
  for path, ref in flatten(template).items():
    key = _torch_key(path, kind)
    cand = [p + key for p in prefixes]
    found = next((c for c in cand if c in sd), None)
    if found is None:
      missing.append(key)
      continue
    a = np.asarray(sd[found], np.float32)
    if path[-1] == "kernel":
      a = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
    if a.shape != tuple(ref.shape):
      raise ValueError(f"teacher weight {found}: shape {a.shape} does not match the config's {ref.shape}")
    out[path] = a
  if missing:
    raise ValueError(f"teacher checkpoint is missing {len(missing)} keys, e.g. {missing[:5]}")
  return unflatten(out)


def load_teacher(source: str, dtype=jnp.float32) -> Teacher:
  """source: a hub id (`openai/clip-vit-base-patch16`, `facebook/dino-vitb16`) or a local folder."""
  folder = source
  if not os.path.isdir(folder):
    if os.path.sep in source and not source.count("/") == 1:
      raise FileNotFoundError(f"teacher folder not found: {source}")
    try:
      from huggingface_hub import snapshot_download
      folder = snapshot_download(source, allow_patterns=["config.json", "*.msgpack", "*.safetensors"])
    except Exception as e:  # offline, or no such repo
      raise FileNotFoundError(f"teacher '{source}' is neither a local folder nor downloadable "
                              f"from the hub ({type(e).__name__}: {e})") from e
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"teacher folder {folder} has no config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  kind = "clip" if "vision_config" in cfg or cfg.get("model_type", "").startswith("clip") else "dino"
  module = _clip_module(cfg, dtype) if kind == "clip" else _dino_module(cfg, dtype)
  size = module.image_size
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
  msgpack = os.path.join(folder, "flax_model.msgpack")
  st = os.path.join(folder, "model.safetensors")
  if os.path.exists(msgpack):
    from flax.serialization import msgpack_restore
    with open(msgpack, "rb") as f:
      tree = msgpack_restore(f.read())
    if kind == "dino" and "vit" in tree and "embeddings" not in tree:
      tree = tree["vit"]
    flat_t = flatten(template)
    flat = flatten(tree)
    params = unflatten({p: np.asarray(flat[p], np.float32) for p in flat_t if p in flat})
    missing = [p for p in flat_t if p not in flat]
    if missing:
      raise ValueError(f"teacher msgpack is missing {len(missing)} params, e.g. {['/'.join(m) for m in missing[:5]]}")
  elif os.path.exists(st):
    from safetensors.numpy import load_file
    params = _from_torch_names(load_file(st), template, kind, ("", "vit.") if kind == "dino" else ("",))
  else:
    raise FileNotFoundError(f"teacher folder {folder} has neither flax_model.msgpack nor model.safetensors")
  dim = module.projection_dim if kind == "clip" else module.hidden_size
  return Teacher(module, params, kind, dim, source)


# The architecture of the teachers the recipes name (the fields of their transformers config.json that our
# modules read), so that a teacher of the same shape can be built without downloading its weights:
# beitv2_jax.aot compiles the tokenizer step offline with one (config.teacher="random" sized by these).
TEACHER_ARCHITECTURES = {
    "openai/clip-vit-base-patch16": dict(kind="clip", width=768, depth=12, heads=12, dim=512, patch_size=16,
                                         image_size=224),
    "facebook/dino-vitb16": dict(kind="dino", width=768, depth=12, heads=12, dim=768, patch_size=16,
                                 image_size=224),
}


def random_teacher(image_size: int, patch_size: int, width: int = 64, depth: int = 2, heads: int = 2,
                   dim: int = 32, seed: int = 0, dtype=jnp.float32, kind: str = "clip") -> Teacher:
  """A randomly initialised teacher (a CLIP vision tower, or DINO's ViT with kind="dino"), for offline
  debugging and compiling only: its features carry no meaning."""
  if kind == "clip":
    module = CLIPVision(hidden_size=width, intermediate_size=4 * width, num_layers=depth, num_heads=heads,
                        patch_size=patch_size, image_size=image_size, projection_dim=dim, dtype=dtype)
  elif kind == "dino":
    if dim != width:
      raise ValueError(f"a DINO teacher's features are its hidden states: dim={dim} must equal width={width}")
    module = _dino_module(dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                               num_attention_heads=heads, patch_size=patch_size, image_size=image_size), dtype)
  else:
    raise ValueError(f"random teacher kind must be 'clip' or 'dino', got {kind!r}")
  params = jax.jit(lambda k: module.init(k, jnp.zeros((1, image_size, image_size, 3)))["params"])(jax.random.key(seed))
  name = "CLIP" if kind == "clip" else "DINO ViT"
  return Teacher(module, params, kind, dim, f"random {name} (width {width}, depth {depth}, seed {seed})")
