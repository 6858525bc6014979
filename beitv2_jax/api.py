"""`beitv2_jax.load`: one call for every checkpoint kind the project knows.

  m = beitv2_jax.load(path, **overrides)
  m.kind                       # "classifier" | "mim" | "tokenizer" | "linprobe" | "segmenter"
  m.module, m.params, m.config
  logits = m(images)           # classifier: float32 NHWC, ImageNet-normalised -> (B, num_classes)
  main, agg = m(images, mask)  # mim: mask bool (B, N) row-major -> each (B, M, vocab) at masked positions
  ids = m.encode(images01)     # tokenizer: float32 NHWC in [0, 1] -> int32 (B, N) row-major
  feats = m.decode(ids)        # tokenizer: -> (B, N, teacher_dim) reconstructed teacher features
  feats = m.features(images)   # any kind: the encoder's image features (see `features`)
  logits = m(images)           # linprobe (a linear-probe workdir): its encoder's features -> BatchNorm -> head;
                               # images as its encoder's `features` takes them
  logits = m(images)           # segmenter (a `segment` workdir): normalised (B, S, S, 3) -> (B, S, S, classes)
  classes = m.segment(image)   # segmenter: one uint8 (H, W, 3) image of any size -> (H, W) int32 class map,
                               # as its evaluation scores it (test rescale, sliding windows, resized back)

A linear-probe workdir stores the head and the BatchNorm statistics, not the frozen encoder: `load` reads
the encoder again from where the run read it (config.json's "encoder"; `load(path, encoder=...)` when it
has moved), or rebuilds the random-init baseline from the run's seed.

`path` may be: our workdir or checkpoint folder (what `python -m beitv2_jax.main` writes, or
`python -m beitv2_jax.convert`), an official .pth (tokenizer `vqkd_*.pth`, pretraining `*_pt1k*.pth`,
fine-tuned), or a timm `beitv2_*` .pth / .safetensors. The architecture is read from the keys and shapes
(head dim 64 unless `num_heads=` is given); `overrides` change VisionTransformer fields (e.g. `dtype`,
`drop_path_rate`, `scan`) or force `kind="classifier"` (with `num_classes=`) on a MIM checkpoint; a tokenizer
takes the execution ones its encoder and decoder run with (`attention`, `add_norm`, `residual_dtype`,
`patch_embed`).
Loading a file never runs code from it (see convert.read_state_dict); .safetensors is preferred.

Inputs that would give silently wrong answers are refused with a one-line ValueError naming the argument,
what was expected and what was received (S = the model's img_size, g = S / patch_size, N = g * g):
  images   (m(images), classifier / mim features): float (B, S, S, 3) NHWC, ImageNet-normalised
           ((x/255 - mean)/std, about -2.2..2.7): integer dtypes and |values| > 20 ([0, 255] pixels) refused.
  images01 (encode, tokenizer features): float (B, S, S, 3) in [0, 1]: integer dtypes and values outside
           [-0.01, 1.01] refused; values within that margin are clipped to [0, 1], because the tokenizer's
           own preprocess (models/vqkd.py, the official pre_process) scales a batch by 255 only when its max
           is <= 1 and reads any other batch as [0, 255] pixels.
  ids      (decode): integers of shape (B, N) in [0, codebook_size) (the gather would clamp the others).
  mask     (mim): bool or 0/1 of shape (B, N) or (B, g, g), B the images' batch; the same number of masked
           patches in every image.
Shapes and dtypes are checked always, values only on numpy or concrete jax arrays: inside jax.jit the
inputs are tracers and their values pass unchecked (a mim mask must be concrete: its count of masked
patches sets the output shape).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import convert, resample
from beitv2_jax.data import transforms
from beitv2_jax.models import quantizer
from beitv2_jax.models.build import EXECUTION_FIELDS, dtype_of, fields_call, split_execution
from beitv2_jax.models.mim import BEiTForMIM
from beitv2_jax.models.vit import VisionTransformer, encoder_kwargs
from beitv2_jax.models.vqkd import VQKD

KINDS = ("classifier", "mim", "tokenizer")  # what `load(kind=...)` can convert to
LOADABLE_KINDS = KINDS + ("linprobe", "segmenter")  # what a workdir's config.json may name
# float16: the official code runs the tokenizer under fp16 autocast; 3 more mantissa bits than bf16 keep
# near-tie code choices closer to float32 (benchmarks/label_precision.py measures how much).
@dataclasses.dataclass
class Model:
  kind: str
  module: Any
  params: Any
  config: dict
  codebook: Optional[Any] = None  # tokenizer: (K, D) unit code vectors
  source: str = ""

  # ---- classifier / mim -------------------------------------------------------------------------
  def __call__(self, images, mask=None):
    if self.kind == "tokenizer":
      raise TypeError("a tokenizer is called with m.encode(images01) / m.decode(ids)")
    if self.kind == "linprobe":
      probe = self.module
      feats = probe.encoder.features(images, probe.layer, probe.pool)
      return probe_logits(self.params, feats, probe.batchnorm)
    images = jnp.asarray(check_normalised_images(images, self.img_size), jnp.float32)
    if self.kind == "classifier":
      return _jit_apply(self.module)(self.params, images)["logits"]
    if self.kind == "segmenter":
      return _jit_segmenter(self.module)(self.params, images)
    if mask is None:
      raise ValueError("a mim model needs a mask: m(images, mask) with mask bool (B, N)")
    mask = check_mask(mask, images.shape[0], self.grid)
    counts = mask.sum(1)
    if len(set(counts.tolist())) != 1:
      raise ValueError(f"every image needs the same number of masked patches, got {sorted(set(counts))}")
    return _jit_mim(self.module, int(counts[0]))(self.params, images, jnp.asarray(mask))

  # ---- tokenizer --------------------------------------------------------------------------------
  def encode(self, images01):
    self._need("tokenizer")
    images01 = check_unit_images(images01, self.img_size)
    return _jit_encode(self.module)(self.params, self.codebook, jnp.asarray(images01, jnp.float32))

  def decode(self, ids):
    self._need("tokenizer")
    ids = check_ids(ids, self.grid, len(self.codebook))
    return _jit_decode(self.module)(self.params, self.codebook, jnp.asarray(ids, jnp.int32))

  # ---- segmenter --------------------------------------------------------------------------------
  def segment(self, image) -> np.ndarray:
    """One uint8 (H, W, 3) RGB image of any size -> (H, W) int32 class indices, as the run's evaluation
    scores an image: rescaled by the test pipeline (config "seg": scale_long, scale_short), scored by sliding
    windows (crop, stride), the scores resized back to (H, W). Class indices are the run's labels (with
    reduce_zero_label, ADE20K's class k + 1 is index k)."""
    from beitv2_jax import seg_inference
    from beitv2_jax.data import seg_transforms
    self._need("segmenter")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"image: expected one uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    s = self.config["seg"]
    rescaled, _ = seg_transforms.rescale(image, None, (s["scale_long"], s["scale_short"]))
    scores = _cached(("segwin", id(self.module)),
                     lambda: seg_inference.window_scores_fn(self.module, s["crop"]), self.module)
    return seg_inference.class_map(lambda w, v: scores(self.params, w, v), rescaled, image.shape[:2],
                                   self.module.num_classes, s["crop"], s["stride"])

  def features(self, images, layer: int = -1, pool: str = "cls"):
    """Frozen features for probing: the [CLS] token after the final norm (pool='cls', what patch
    aggregation trains), or the mean of the patch tokens (pool='mean'), at `layer` (-1: last block;
    k: the output of block k, 1-based, still through the final norm). Tokenizer: its encoder, images in
    [0, 1] (the tokenizer's own convention); other kinds take ImageNet-normalised images."""
    if self.kind == "linprobe":
      return self.module.encoder.features(images, layer, pool)
    if self.kind == "segmenter":
      raise TypeError("a segmenter's encoder has no final norm to pool features from: probe the encoder it was "
                      "trained from (its config.json's config.init_from)")
    if self.kind == "tokenizer":
      images = check_unit_images(images, self.img_size)
    else:
      images = check_normalised_images(images, self.img_size)
    return encoder_features(self, jnp.asarray(images, jnp.float32), layer, pool)

  @property
  def img_size(self) -> int:
    """The image side the encoder takes (its position tables are fixed to it)."""
    return self._encoder_config()["img_size"]

  @property
  def grid(self) -> int:
    """Patches per image side: N = grid * grid tokens / code ids / mask entries."""
    enc = self._encoder_config()
    return enc["img_size"] // enc["patch_size"]

  def _encoder_config(self) -> dict:
    if self.kind == "linprobe":
      return self.module.encoder._encoder_config()
    if self.kind == "tokenizer":
      return self.module.encoder
    if self.kind == "mim":
      return self.module.backbone
    return {"img_size": self.module.img_size, "patch_size": self.module.patch_size}

  def _need(self, kind):
    if self.kind != kind:
      raise TypeError(f"this is a {self.kind} model, not a {kind}")


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """The module of a "linprobe" Model: `encoder`'s features at `layer` / `pool` (see Model.features) ->
  a parameter-free BatchNorm with the run's running statistics (if `batchnorm`) -> one linear layer.
  The Model's params: {"head": {"kernel", "bias"}, "bn": {"mean", "var"}}."""
  encoder: Model
  layer: int = -1
  pool: str = "cls"
  batchnorm: bool = True


PROBE_BN_EPS = 1e-6  # MAE's linear probe: BatchNorm1d(affine=False, eps=1e-6)


def probe_logits(params, feats, batchnorm: bool, stats=None):
  """The linear probe's logits from frozen features; `stats` (mean, var) default to params["bn"] (the
  running statistics; training passes the batch's own)."""
  if batchnorm:
    mean, var = stats if stats is not None else (params["bn"]["mean"], params["bn"]["var"])
    feats = (feats - mean) / jnp.sqrt(var + PROBE_BN_EPS)
  return feats @ params["head"]["kernel"] + params["head"]["bias"]


# ------------------------------------------------------------------------------------------------
# Input checks (module docstring): cheap, on the host; values only where the input is concrete
# ------------------------------------------------------------------------------------------------
NORMALISED_LIMIT = 20.0  # ImageNet-normalised pixels stay within about +-2.7; [0, 255] pixels go far past 20
UNIT_MARGIN = 0.01       # [0, 1] images may overshoot by rounding or resampling; more is another convention
NORMALISE_HINT = "convert uint8 pixels x with (x/255 - mean)/std (ImageNet mean/std)"


def _as_array(x):
  """numpy / jax arrays (and tracers) as they are; lists and scalars as numpy."""
  return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _value_range(x) -> Optional[tuple[float, float]]:
  """(min, max) of a concrete array, None for a tracer (under jit) or an empty array."""
  if isinstance(x, jax.core.Tracer) or x.size == 0:
    return None
  if isinstance(x, np.ndarray):
    return float(x.min()), float(x.max())
  lo, hi = jax.device_get((jnp.min(x), jnp.max(x)))  # reduced where the array lives: two scalars come back
  return float(lo), float(hi)


def _check_image_shape(x, arg: str, size: int, what: str) -> None:
  shape = tuple(x.shape)
  if len(shape) == 4 and shape[1:] == (size, size, 3):
    return
  hint = ""
  if len(shape) == 4 and shape[1] == 3 and shape[2:] == (size, size):
    hint = " (NCHW? transpose with x.transpose(0, 2, 3, 1))"
  elif shape == (size, size, 3):
    hint = " (one image? add the batch axis with x[None])"
  raise ValueError(f"{arg} must be {what} NHWC of shape (B, {size}, {size}, 3) (this model's img_size is {size}), "
                   f"got shape {shape}{hint}")


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)  # jnp: numpy does not count bfloat16 as floating


def check_normalised_images(images, size: int):
  """m(images) / classifier and mim features: float (B, size, size, 3), ImageNet-normalised."""
  x = _as_array(images)
  if not _is_float(x):
    raise ValueError(f"images must be ImageNet-normalised floats, got dtype {x.dtype}: {NORMALISE_HINT}")
  _check_image_shape(x, "images", size, "float ImageNet-normalised")
  r = _value_range(x)
  if r is not None and max(abs(r[0]), abs(r[1])) > NORMALISED_LIMIT:
    raise ValueError(f"images must be ImageNet-normalised (values within about +-2.7), got values in "
                     f"[{r[0]:g}, {r[1]:g}], which look like [0, 255] pixels: {NORMALISE_HINT}")
  return x


def check_unit_images(images01, size: int):
  """encode / tokenizer features: float (B, size, size, 3) in [0, 1]; a rounding overshoot is clipped,
  since the tokenizer's preprocess reads a batch whose max exceeds 1 as [0, 255] pixels."""
  x = _as_array(images01)
  if not _is_float(x):
    raise ValueError(f"images01 must be floats in [0, 1], got dtype {x.dtype}: divide uint8 pixels by 255")
  _check_image_shape(x, "images01", size, "float [0, 1]")
  r = _value_range(x)
  if r is None:
    return x
  if r[0] < -UNIT_MARGIN or r[1] > 1.0 + UNIT_MARGIN:
    raise ValueError(f"images01 must be floats in [0, 1], got values in [{r[0]:g}, {r[1]:g}]"
                     + (": divide [0, 255] pixels by 255" if r[1] > 1.0 + UNIT_MARGIN else ""))
  if r[0] < 0.0 or r[1] > 1.0:
    x = np.clip(x, 0.0, 1.0) if isinstance(x, np.ndarray) else jnp.clip(x, 0.0, 1.0)
  return x


def check_ids(ids, grid: int, codebook_size: int):
  """decode: integer code ids (B, grid * grid) in [0, codebook_size); a gather would clamp the others."""
  x = _as_array(ids)
  n = grid * grid
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"ids must be integer code ids in [0, {codebook_size}), got dtype {x.dtype}")
  if x.ndim != 2 or x.shape[1] != n:
    raise ValueError(f"ids must have shape (B, {n}) (a {grid}x{grid} grid, row-major), got shape {tuple(x.shape)}")
  r = _value_range(x)
  if r is not None and (r[0] < 0 or r[1] >= codebook_size):
    raise ValueError(f"ids must lie in [0, {codebook_size}) (the codebook size), got values in "
                     f"[{r[0]:.0f}, {r[1]:.0f}]")
  return x


def check_mask(mask, batch: int, grid: int) -> np.ndarray:
  """mim: bool or 0/1, (batch, N) or (batch, grid, grid) -> bool (batch, N) on the host (the masked count
  sets the output shape, so the mask must be concrete)."""
  if isinstance(mask, jax.core.Tracer):
    raise ValueError("mask must be a concrete (numpy or jax) array, not traced: the number of masked patches "
                     "sets the output shape")
  m = np.asarray(mask)
  n = grid * grid
  if m.shape not in ((batch, n), (batch, grid, grid)):
    raise ValueError(f"mask must have shape ({batch}, {n}) or ({batch}, {grid}, {grid}) (one row per image, "
                     f"{grid}x{grid} patches), got shape {m.shape}")
  if m.dtype != bool:
    numeric = np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)
    if not numeric or not np.isin(m, (0, 1)).all():
      shown = np.unique(m)[:5].tolist() if numeric else []
      raise ValueError(f"mask must be bool or 0/1, got dtype {m.dtype}" + (f" with values {shown}" if shown else ""))
  return m.astype(bool).reshape(batch, n)


# ------------------------------------------------------------------------------------------------
# Cached jitted applies (one compile per module and shape)
# ------------------------------------------------------------------------------------------------
_CACHE: dict = {}


def _cached(key, make, module):
  """Keyed by id(module); the entry keeps the module, so a recycled id is never mistaken for it."""
  entry = _CACHE.get(key)
  if entry is None or entry[0] is not module:
    entry = _CACHE[key] = (module, make())
  return entry[1]


def _jit_apply(module):
  return _cached(("apply", id(module)), lambda: jax.jit(lambda p, x: module.apply({"params": p}, x)), module)


def _jit_mim(module, m):
  return _cached(("mim", id(module), m),
                 lambda: jax.jit(lambda p, x, mask: module.apply({"params": p}, x, mask, m)), module)


def _jit_segmenter(module):
  """The main head's logits resized to the input."""
  from beitv2_jax.seg_inference import segment_logits

  def logits(variables, x):
    return segment_logits(module, variables, x, x.shape[1:3])
  return _cached(("seg", id(module)), lambda: jax.jit(logits), module)


def _jit_encode(module):
  def enc(p, cb, x):
    return quantizer.nearest_code(cb, module.apply({"params": p}, x, method=VQKD.encode))
  return _cached(("enc", id(module)), lambda: jax.jit(enc), module)


def _jit_decode(module):
  def dec(p, cb, ids):
    return module.apply({"params": p}, cb[ids], method=VQKD.decode)
  return _cached(("dec", id(module)), lambda: jax.jit(dec), module)


def feature_fn(model: Model, layer: int = -1, pool: str = "cls"):
  """(f, params): a pure f(params, images) -> (B, D) features of `model`'s encoder (see Model.features).
  Tokenizers take [0, 1] images; the other kinds ImageNet-normalised ones."""
  import flax.linen as nn
  from beitv2_jax.models.vit import LN_EPS
  if pool not in ("cls", "mean"):
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
  if model.kind == "tokenizer":
    from beitv2_jax.models.vqkd import preprocess
    vit = model.module.encoder_module()
    params, norm_name, prep = model.params["encoder"], "fc_norm", preprocess
  elif model.kind == "mim":
    vit, params, norm_name, prep = model.module.vit_module(), model.params, "norm", None
  else:
    vit, params, prep = model.module, model.params, None
    norm_name = "norm" if vit.final_norm == "norm" else "fc_norm"
  if layer != -1 and not 1 <= layer <= vit.depth:
    raise ValueError(f"layer={layer} is outside [1, {vit.depth}] (or -1 for the last block)")

  def f(p, images):
    x = prep(images) if prep is not None else images
    backbone = p["backbone"] if model.kind == "mim" else p
    out = vit.apply({"params": backbone}, x)
    h = out["x"] if layer == -1 else out["hidden"][layer - 1]
    norm_p = p[norm_name] if model.kind == "mim" else backbone[norm_name]
    normed = nn.LayerNorm(epsilon=LN_EPS).apply({"params": norm_p}, h if pool == "cls" else h[:, 1:].mean(1))
    return (normed[:, 0] if pool == "cls" else normed).astype(jnp.float32)

  return f, params


def encoder_features(model: Model, images, layer: int = -1, pool: str = "cls"):
  f, params = feature_fn(model, layer, pool)
  key = ("feat", model.kind, id(model.module), layer, pool)
  return _cached(key, lambda: jax.jit(f), model.module)(params, images)


# ------------------------------------------------------------------------------------------------
# Building modules from a stored description
# ------------------------------------------------------------------------------------------------
def build_module(kind: str, model_cfg: dict, dtype: str | Any = "float32"):
  dtype = dtype_of(dtype)
  cfg = dict(model_cfg)
  if kind == "classifier":
    return VisionTransformer(**{k: v for k, v in cfg.items() if k != "dtype"}, dtype=dtype)
  if kind == "mim":
    return BEiTForMIM(**{k: v for k, v in cfg.items() if k != "dtype"}, dtype=dtype)
  if kind == "tokenizer":
    return VQKD(**{k: v for k, v in cfg.items() if k != "dtype"}, dtype=dtype)
  raise ValueError(f"unknown model kind {kind!r}: expected one of {KINDS}")


def _template(module, kind: str):
  if kind == "tokenizer":
    s = module.encoder["img_size"]
    x = jnp.zeros((1, s, s, 3))
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
  if kind == "mim":
    s, n = module.backbone["img_size"], (module.backbone["img_size"] // module.backbone["patch_size"]) ** 2
    mask = jnp.zeros((1, n), bool).at[:, :1].set(True)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), mask, 1))["params"]
  s = module.img_size
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))["params"]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load(path: str, kind: Optional[str] = None, dtype: str = "float32", **overrides) -> Model:
  """See the module docstring."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if os.path.isdir(path):
    return _load_ours(path, kind, dtype, overrides)
  return _load_state_dict(path, convert.read_state_dict(path), kind, dtype, overrides)


def _find_run_dir(path: str) -> tuple[str, str, Optional[int]]:
  """-> (folder with config.json, checkpoints folder, step or None for the latest)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return path, os.path.join(path, "checkpoints"), None
  parent = os.path.dirname(path)  # WORKDIR/checkpoints/<step>
  if os.path.basename(path).isdigit() and os.path.exists(os.path.join(os.path.dirname(parent), "config.json")):
    return os.path.dirname(parent), parent, int(os.path.basename(path))
  raise FileNotFoundError(f"{path} is neither a workdir (with config.json) nor WORKDIR/checkpoints/<step>")


def _load_ours(path: str, kind, dtype, overrides) -> Model:
  from beitv2_jax import checkpoint
  run_dir, ckpt_dir, step = _find_run_dir(path)
  with open(os.path.join(run_dir, "config.json")) as f:
    info = json.load(f)
  if "kind" not in info:
    raise ValueError(f"{run_dir}/config.json names no model kind: not a model checkpoint")
  stored_kind = info["kind"]
  if stored_kind not in LOADABLE_KINDS:
    raise ValueError(f"{run_dir}/config.json names model kind {stored_kind!r}: expected one of {LOADABLE_KINDS}")
  _, state = checkpoint.restore_state_tree(ckpt_dir, step)
  if stored_kind == "linprobe":
    return _load_probe(run_dir, info, state, kind, dtype, overrides)
  if stored_kind == "segmenter":
    return _load_segmenter(run_dir, info, state, kind, dtype, overrides)
  model_cfg, params = dict(info["model"]), state["params"]
  codebook = None
  if stored_kind == "tokenizer":
    codebook = np.asarray(state["extra"]["embedding"])
  converting = bool(kind) and kind != stored_kind  # overrides then apply to the converted model only
  model = _finish(stored_kind, model_cfg, params, codebook, dtype, {} if converting else overrides, source=path)
  if converting:
    return convert_kind(model, kind, **overrides)
  return model


def _load_probe(run_dir, info, state, kind, dtype, overrides) -> Model:
  """A linear-probe workdir: its head and BatchNorm statistics on the encoder it was trained on."""
  if kind not in (None, "linprobe"):
    raise ValueError(f"{run_dir} is a linear probe: it loads as kind='linprobe', not {kind!r}")
  encoder_path = overrides.pop("encoder", None) or info["encoder"]
  if overrides:
    raise ValueError(f"a linear probe takes only encoder= as an override, got {sorted(overrides)}")
  if encoder_path == RANDOM_ENCODER:
    run = info["config"]
    encoder = random_encoder(run["model"], run["seed"], dtype)
  elif not os.path.exists(encoder_path):
    raise FileNotFoundError(f"the linear probe in {run_dir} was trained on the encoder at {encoder_path}, which "
                            f"is not there: load({run_dir!r}, encoder=<where it is now>)")
  else:
    encoder = load(encoder_path, dtype=dtype)
  p = info["probe"]
  params = {"head": jax.tree.map(jnp.asarray, state["params"]), "bn": jax.tree.map(jnp.asarray, state["extra"])}
  probe = LinearProbe(encoder, int(p["layer"]), p["pool"], bool(p["batchnorm"]))
  return Model("linprobe", probe, params, {"encoder": encoder_path, "probe": dict(p)}, None, run_dir)


def _load_segmenter(run_dir, info, state, kind, dtype, overrides) -> Model:
  """A segmentation workdir: UperNet on its BEiT encoder with the run's weights and BatchNorm statistics
  (params {"params", "batch_stats"}), and the run's test-time settings (config "seg")."""
  from beitv2_jax.models.upernet import UperNetBEiT
  if kind not in (None, "segmenter"):
    raise ValueError(f"{run_dir} is a segmenter: it loads as kind='segmenter', not {kind!r}")
  if overrides:
    raise ValueError(f"a segmenter loads as it was trained; got overrides {sorted(overrides)}")
  cfg = {k: v for k, v in info["model"].items() if k != "dtype"}
  cfg["out_indices"] = tuple(cfg["out_indices"])
  module = UperNetBEiT(**cfg, dtype=dtype_of(dtype))
  params = {"params": jax.tree.map(jnp.asarray, state["params"]),
            "batch_stats": jax.tree.map(jnp.asarray, state["extra"])}
  seg = {k: info["config"]["seg"][k] for k in ("crop", "stride", "scale_long", "scale_short", "reduce_zero_label")}
  return Model("segmenter", module, params, {"model": cfg, "seg": seg}, None, run_dir)


RANDOM_ENCODER = "random init"  # a linear probe's "encoder" when init_from is empty: the baseline


def random_encoder(model_cfg, seed: int, dtype: str | Any = "float32") -> Model:
  """The random-init baseline a probe or k-NN run measures against when init_from is empty: a BEiT v2
  pretraining-style encoder of `model_cfg`'s size (`vit.encoder_kwargs`: shared rel-pos bias, layer scale,
  final norm, the official init with its per-block rescale), from `seed`."""
  from beitv2_jax.models.vit import rescale_init
  arch, run = split_execution(model_cfg)
  run.pop("dtype", None)
  cfg = fields_call(encoder_kwargs, arch)
  module = build_module("classifier", {**cfg, **run}, dtype)
  s = cfg["img_size"]
  params = module.init(jax.random.key(seed), jnp.zeros((1, s, s, 3)))["params"]
  return Model("classifier", module, rescale_init(params, [("blocks", 1)]), cfg, None, "")


def load_encoder(init_from: str, model_cfg, seed: int) -> Model:
  """What a probe or k-NN run measures: `init_from` loaded (anything `load` reads), or when it is empty the
  random-init encoder of `model_cfg` from `seed` (the baseline); either way run with `model_cfg`'s
  execution fields (dtype, attention, ...)."""
  run = {k: model_cfg[k] for k in EXECUTION_FIELDS if k in model_cfg}  # as the config names them
  dtype = run.pop("dtype", "float32")
  if init_from:
    return load(init_from, dtype=dtype, **run)
  return random_encoder(model_cfg, seed, dtype)


def encoder_input(model: Model, images_uint8: jax.Array) -> jax.Array:
  """uint8 images -> what `model`'s encoder takes, on the device: [0, 1] for a tokenizer (VQ-KD
  normalises inside), ImageNet mean/std for the ViTs."""
  if model.kind == "tokenizer":
    return transforms.to_unit(images_uint8)
  return transforms.imagenet_normalize(images_uint8)


def _finish(kind, model_cfg, params, codebook, dtype, overrides, source) -> Model:
  if kind in ("classifier",):
    model_cfg.update(overrides)
  elif kind == "tokenizer":  # VQKD's execution fields, handed to its encoder and decoder
    takes = [k for k in EXECUTION_FIELDS if k not in ("dtype", "scan", "remat")]
    # its blocks run unrolled and without remat: scan=False / remat="none" (a probe config's) say just that
    unrolled = {k: v for k, v in overrides.items() if (k, v) in (("scan", False), ("remat", "none"))}
    other = sorted(set(overrides) - set(takes) - set(unrolled))
    if other:
      raise ValueError(f"a tokenizer takes the execution overrides {takes} (and dtype=), not {other}")
    model_cfg.update({k: v for k, v in overrides.items() if k in takes})
  elif kind == "mim":
    backbone = dict(model_cfg["backbone"])
    top = [k for k in EXECUTION_FIELDS if k != "dtype"]  # BEiTForMIM's own fields, which it hands to its backbone
    backbone.update({k: v for k, v in overrides.items() if k not in top})
    model_cfg["backbone"] = backbone
    model_cfg.update({k: v for k, v in overrides.items() if k in top})
  module = build_module(kind, model_cfg, dtype)
  template = _template(module, kind)
  params = relayout(params, template)
  return Model(kind, module, params, model_cfg, codebook, source)


def relayout(params, template):
  """Scanned <-> unrolled as the target module wants; checks every shape."""
  sd = convert.to_state_dict(params)
  return jax.tree.map(jnp.asarray, convert.from_state_dict(sd, template, what="checkpoint"))


def _load_state_dict(path: str, sd: dict, kind, dtype, overrides) -> Model:
  sd = {k: v for k, v in sd.items() if not k.startswith(("teacher_model.", "scaling_layer.", "loss"))}
  detected = _detect_kind(sd)
  heads = overrides.pop("num_heads", None)
  own = {} if kind and kind != _detect_kind(sd) else overrides  # overrides go to the converted model
  if detected == "tokenizer":
    enc = convert.infer_vit_config(sd, "encoder.")
    dec = convert.infer_vit_config(sd, "decoder.")
    for c in (enc, dec):
      c.update(rel_pos="none", init_values=0.0, final_norm="fc_norm", init_style="finetune")
      c.pop("num_classes"); c.pop("use_mask_token")
      if heads:
        c["num_heads"] = heads
    cb = sd["quantize.embedding.weight"]
    model_cfg = dict(encoder=enc, decoder=dec, codebook_size=cb.shape[0], codebook_dim=cb.shape[1],
                     teacher_dim=sd["decode_task_layer.2.weight"].shape[0])
    template = _template(build_module("tokenizer", model_cfg, dtype), "tokenizer")
    params = convert.from_state_dict(sd, template, ignore=(r"^quantize\.",), what=path)
    model = _finish("tokenizer", model_cfg, params, np.asarray(cb, np.float32), dtype, dict(own), path)
  elif detected == "mim":
    b = convert.infer_vit_config(sd)
    b.update(final_norm="none", init_style="pretrain", num_classes=0)
    if heads:
      b["num_heads"] = heads
    early = _infer_early_layers(sd, b["depth"])
    model_cfg = dict(backbone=b, vocab_size=sd["lm_head.weight"].shape[0], early_layers=early,
                     head_layers=1 + max([int(k.split(".")[1]) for k in sd if k.startswith("cls_pt_layers.")] or [1]))
    if not any(k.startswith("cls_pt_layers.") for k in sd):
      raise ValueError(f"{path}: an MIM checkpoint without cls_pt_layers (BEiT v1?) is not supported")
    model = _finish("mim", model_cfg, _params_from_sd(sd, "mim", model_cfg, dtype, path), None, dtype,
                    dict(own), path)
  else:
    cfg = convert.infer_vit_config(sd)
    if heads:
      cfg["num_heads"] = heads
    model_cfg = dict(cfg)
    model = _finish("classifier", model_cfg, _params_from_sd(sd, "classifier", model_cfg, dtype, path), None,
                    dtype, dict(own), path)
  if kind and kind != model.kind:
    return convert_kind(model, kind, **overrides)
  return model


def _detect_kind(sd) -> str:
  if "quantize.embedding.weight" in sd:
    return "tokenizer"
  return "mim" if "lm_head.weight" in sd else "classifier"


def _params_from_sd(sd, kind, model_cfg, dtype, path):
  module = build_module(kind, model_cfg, dtype)
  strip = "backbone" if kind == "mim" else ""
  return convert.from_state_dict(sd, _template(module, kind), strip=strip, what=path)


def _infer_early_layers(sd, depth) -> int:
  # Not stored in the official checkpoint: the registered models use 9 (base, depth 12), 21 (large, 24).
  return {12: 9, 24: 21}.get(depth, max(1, depth - 3))


def convert_kind(model: Model, kind: str, num_classes: int = 0, **overrides) -> Model:
  """A MIM (or tokenizer) model -> a classifier with the same encoder: the shared rel-pos table copied into
  every block (run_class_finetuning.py), pos-emb / rel-pos resized when img_size changes, a fresh
  fc_norm and head (mean pooling) unless final_norm='norm' (CLS pooling with the pretrained norm)."""
  if kind != "classifier" or model.kind == "linprobe":
    raise ValueError(f"cannot turn a {model.kind} checkpoint into a {kind}")
  if model.kind == "classifier":
    return model
  if model.kind == "mim":
    sd = convert.to_state_dict(model.params, strip="backbone")
    base_cfg = dict(model.config["backbone"])
  else:  # tokenizer encoder
    sd = {k[len("encoder."):]: v for k, v in convert.to_state_dict(model.params).items() if k.startswith("encoder.")}
    base_cfg = dict(model.module.encoder)
  cfg = dict(base_cfg, rel_pos="layer" if base_cfg.get("rel_pos") != "none" else "none", use_mask_token=False,
             final_norm=overrides.pop("final_norm", "fc_norm"), init_style="finetune", num_classes=num_classes)
  cfg.update(overrides)
  module = build_module("classifier", cfg, model.module.dtype)
  template = _template(module, "classifier")
  init = module.init(jax.random.key(0), jnp.zeros((1, cfg["img_size"], cfg["img_size"], 3)))["params"]
  fresh = convert.to_state_dict(init)
  sd = classifier_state_dict(sd, cfg, fresh)
  params = convert.from_state_dict(sd, template, ignore=(r"^mask_token$", r"^lm_head\.", r"^cls_pt_layers\."),
                                   what=f"{model.source} as a classifier")
  return Model("classifier", module, jax.tree.map(jnp.asarray, params), cfg, None, model.source)


def reclassify(model: Model, **overrides) -> Model:
  """A classifier checkpoint with a possibly different head / resolution / pooling (`overrides`: classifier
  constructor arguments); the head is kept when its class count is unchanged (fine-tuning a fine-tuned model)."""
  sd = convert.to_state_dict(model.params)
  cfg = dict(model.config)
  cfg.update(overrides)
  module = build_module("classifier", cfg)
  init = module.init(jax.random.key(0), jnp.zeros((1, cfg["img_size"], cfg["img_size"], 3)))["params"]
  fresh = convert.to_state_dict(init)
  if sd.get("head.weight") is not None and sd["head.weight"].shape == fresh["head.weight"].shape:
    fresh = {k: v for k, v in fresh.items() if not k.startswith("head.")}
    fresh.update({k: sd[k] for k in ("head.weight", "head.bias")})
  sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  sd = classifier_state_dict(sd, cfg, fresh)
  params = convert.from_state_dict(sd, _template(module, "classifier"), what=model.source)
  return Model("classifier", module, jax.tree.map(jnp.asarray, params), cfg, None, model.source)


def classifier_state_dict(sd: dict, cfg: dict, fresh: dict) -> dict:
  """Official/our pretrained encoder keys -> the keys a classifier of `cfg` needs (fresh init from
  `fresh` for what the checkpoint lacks: fc_norm, head, and norm when pooling by mean)."""
  sd = convert.broadcast_shared_rel_pos(sd, cfg["depth"])
  grid = (cfg["img_size"] // cfg["patch_size"],) * 2
  out = {}
  for k, v in sd.items():
    if k.endswith("relative_position_bias_table"):
      v = convert.resize_rel_pos_table(v, grid)
    elif k == "pos_embed":
      v = resample.resize_pos_embed(v, grid)
    out[k] = v
  for k, v in fresh.items():
    if k.startswith(("head.", "fc_norm.")) or k not in out:
      out[k] = v
  if cfg.get("final_norm") == "fc_norm":
    out.pop("norm.weight", None); out.pop("norm.bias", None)
  return out


# ------------------------------------------------------------------------------------------------
# Saving / exporting
# ------------------------------------------------------------------------------------------------
def save_model(model: Model, directory: str) -> None:
  """Writes a folder that `load` reads: config.json + an orbax checkpoint of the params (+ codebook)."""
  if model.kind == "linprobe":
    raise ValueError("a linear probe is saved by its run (its workdir loads with beitv2_jax.load)")
  from beitv2_jax import checkpoint
  os.makedirs(directory, exist_ok=True)
  checkpoint.write_json(os.path.join(directory, "config.json"),
                        {"task": "convert", "kind": model.kind, "model": model.config, "source": model.source})
  extra = None if model.codebook is None else {"embedding": jnp.asarray(model.codebook)}
  state = {"params": model.params, "extra": extra} if extra is not None else {"params": model.params}
  ck = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  ck.save(0, state)
  ck.close()


def export_state_dict(model: Model, path: str) -> dict:
  """Our params -> the official / timm key layout, written to .safetensors or .pth (torch). Classifiers
  load into timm.create_model('beitv2_base_patch16_224'); MIM models give the official pretraining
  layout (shared rel_pos_bias, cls_pt_layers, lm_head); tokenizers the vqkd_*.pth layout."""
  if model.kind == "linprobe":
    raise ValueError("a linear probe has no official layout to export to: export its encoder "
                     "(m.module.encoder), and its head is m.params['head'] on BatchNorm statistics m.params['bn']")
  if model.kind == "mim":
    sd = convert.to_state_dict(model.params, strip="backbone")
  else:
    sd = convert.to_state_dict(model.params)
  if model.kind == "tokenizer":
    sd["quantize.embedding.weight"] = np.asarray(model.codebook, np.float32)
    sd["quantize.embedding.initted"] = np.ones((1,), np.float32)  # never re-run k-means on load
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
  elif path.endswith((".pth", ".pt", ".bin")):
    import torch
    torch.save({"model": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}}, path)
  elif path:
    raise ValueError(f"export path must end in .safetensors or .pth, got {path}")
  return sd
