"""Tasks `finetune` (docs/method.md §4.1) and `linprobe` (§4.2): classifiers on a pretrained encoder.

The encoder comes from `config.init_from`: anything `beitv2_jax.load` reads (our pretrain / tokenizer /
finetune workdir, an official or timm file); empty means random init of `config.model`.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beitv2_jax import api, flops
from beitv2_jax.data import canvas, pixel_ops, transforms
from beitv2_jax.models.build import fields_call, split_execution
from beitv2_jax.models.vit import VisionTransformer, classifier_kwargs
from beitv2_jax.train.loop import Task, topk_correct


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix (timm Mixup, mode='batch'), on the device
# ------------------------------------------------------------------------------------------------
def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def sample_gamma(key, alpha: float, proposals: int = 16) -> jax.Array:
  """One Gamma(alpha, 1) draw without a loop (jax.random.gamma loops until it accepts, and every loop
  iteration in a GPU step waits for the host to read its condition).

  Marsaglia & Tsang (2000): `proposals` candidates at once, the first accepted one kept. For alpha >= 1 a
  candidate is accepted with probability > 0.95, so all 16 fail with probability < 1e-20 (then the last
  candidate is used). alpha < 1 draws Gamma(alpha + 1) and multiplies by U^(1 / alpha)."""
  k_normal, k_uniform, k_boost = jax.random.split(key, 3)
  a = alpha + 1.0 if alpha < 1.0 else alpha
  d = a - 1.0 / 3.0
  c = 1.0 / np.sqrt(9.0 * d)
  x = jax.random.normal(k_normal, (proposals,))
  u = jax.random.uniform(k_uniform, (proposals,), minval=jnp.finfo(jnp.float32).tiny)
  v = (1.0 + c * x) ** 3
  safe_v = jnp.where(v > 0, v, 1.0)
  accepted = (v > 0) & (jnp.log(u) < 0.5 * x * x + d - d * safe_v + d * jnp.log(safe_v))
  first = jnp.where(jnp.any(accepted), jnp.argmax(accepted), proposals - 1)
  g = d * safe_v[first]
  if alpha < 1.0:
    g = g * jax.random.uniform(k_boost, minval=jnp.finfo(jnp.float32).tiny) ** (1.0 / alpha)
  return g


def sample_beta(key, a: float, b: float) -> jax.Array:
  """Beta(a, b) = X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b), loop-free (sample_gamma)."""
  kx, ky = jax.random.split(key)
  x, y = sample_gamma(kx, a), sample_gamma(ky, b)
  return x / jnp.maximum(x + y, jnp.finfo(jnp.float32).tiny)  # both underflowing (p ~ 1e-24): 0, not NaN


def mixup_cutmix(rng, images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                 switch_prob=0.5, smoothing=0.1):
  """One lambda per batch; the batch is mixed with itself reversed; CutMix with probability switch_prob
  (lambda corrected to the pasted area); soft targets with label smoothing. Returns (images, targets)."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  b, h, w, _ = images.shape
  use_cutmix = jax.random.uniform(k_switch) < switch_prob if mixup_alpha > 0 and cutmix_alpha > 0 else (
      jnp.asarray(cutmix_alpha > 0))
  lam_mix = sample_beta(k_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
  lam_cut = sample_beta(k_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, lam, 1.0)
  # CutMix box (timm rand_bbox): size from sqrt(1 - lam), centre uniform, clipped.
  ratio = jnp.sqrt(1.0 - lam)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_box, (), 0, h)
  cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
  flipped = images[::-1]
  cut_images = jnp.where(box, flipped, images)
  lam_cut_corrected = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
  mixed = lam * images + (1.0 - lam) * flipped
  use_cut = use_cutmix & apply
  images = jnp.where(use_cut, cut_images, mixed)
  lam = jnp.where(use_cut, lam_cut_corrected, lam)
  y = smooth_one_hot(labels, num_classes, smoothing)
  return images, lam * y + (1.0 - lam) * y[::-1]


def mixup_groups(batch: int, group_size: int) -> int:
  """Number of mixup groups for a global batch: each group of `group_size` images gets its own draw, as
  each GPU's batch does in the official run (timm Mixup runs per process). A batch no larger than one
  group is one group."""
  if group_size <= 0:
    raise ValueError(f"aug.mixup_group_size={group_size}: must be positive (the official per-GPU batch, 128)")
  if batch <= group_size:
    return 1
  if batch % group_size:
    raise ValueError(f"aug.mixup_group_size={group_size} does not divide batch_size={batch}: each group of "
                     "images gets its own mixup / cutmix draw")
  return batch // group_size


def grouped_mixup_cutmix(rng, images, labels, num_classes, group_size: int, **kwargs):
  """mixup_cutmix on each group of `group_size` consecutive images (its own lambda, mixup-or-cutmix switch
  and box; each image mixed with its group reversed), as the official per-GPU draws."""
  n = mixup_groups(images.shape[0], group_size)
  if n == 1:
    return mixup_cutmix(rng, images, labels, num_classes, **kwargs)
  grouped = lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:])
  mixed, targets = jax.vmap(lambda k, x, y: mixup_cutmix(k, x, y, num_classes, **kwargs))(
      jax.random.split(rng, n), grouped(images), grouped(labels))
  return mixed.reshape(images.shape), targets.reshape(images.shape[0], num_classes)


def apply_random_erasing(rng, images, erase):
  """Fill the boxes marked by the host (timm RandomErasing, mode 'pixel') with N(0, 1) noise."""
  noise = jax.random.normal(rng, images.shape, images.dtype)
  return jnp.where(erase[..., None].astype(bool), noise, images)


# ------------------------------------------------------------------------------------------------
class _ClassifierTask(Task):
  """Shared: the class count, evaluation (top-1 / top-5)."""

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    self.num_classes = config.num_classes or self.train_source.num_classes

  def evaluate(self, state) -> dict:
    c = self.config
    eval_fn, frozen = jax.jit(self._eval_batch), self.replicated_frozen()
    sums = np.zeros(3)
    for batch in self.eval_batches(transforms.EvalTransform(c.model.img_size, c.crop_pct)):
      sums += np.asarray(jax.device_get(eval_fn(state, batch, frozen)))
    if not sums[2]:
      return {}
    return {"top1": sums[0] / sums[2], "top5": sums[1] / sums[2]}

  def _eval_batch(self, state, batch, frozen):
    logits = self.logits(state, batch, frozen, train=False)
    w = batch["valid"].astype(jnp.float32)
    top1, top5 = topk_correct(logits, batch["label"], (1, min(5, self.num_classes)))
    return jnp.stack([jnp.sum(top1 * w), jnp.sum(top5 * w), jnp.sum(w)])


class FinetuneTask(_ClassifierTask):
  name = "finetune"

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    m = config.model
    arch, run = split_execution(m)
    self.init_model = None
    if config.init_from:  # the architecture is the checkpoint's; config.model sets what fine-tuning may change
      overrides = {k: arch[k] for k in ("drop_path_rate", "img_size", "final_norm", "head_init_scale")}
      overrides.update(num_classes=self.num_classes, scan=m.scan, remat=m.remat)
      loaded = api.load(config.init_from)
      if loaded.kind == "classifier":  # a fine-tuned checkpoint: re-head if the class count differs
        self.init_model = api.reclassify(loaded, **overrides)
      else:
        self.init_model = api.convert_kind(loaded, "classifier", **overrides)
      self.kwargs = dict(self.init_model.config)
      self.kwargs.pop("scan", None); self.kwargs.pop("remat", None)
    else:
      self.kwargs = fields_call(classifier_kwargs, arch, num_classes=self.num_classes)
    self.model = VisionTransformer(**self.kwargs, **run)
    self.encoder_depth = self.kwargs["depth"]
    a = config.aug
    if a.mixup > 0 or a.cutmix > 0:
      mixup_groups(config.batch_size, a.mixup_group_size)  # a bad group size fails here, not in jit
    self.flops_per_example = 3 * flops.vit_forward_flops(m.img_size, self.kwargs["patch_size"],
                                                         self.kwargs["embed_dim"], self.kwargs["depth"],
                                                         self.kwargs["mlp_ratio"])

  def train_transform(self):
    a = self.config.aug
    return transforms.FinetuneTrain(self.config.model.img_size, a.rand_augment_layers, a.rand_augment_magnitude,
                                    a.reprob, scale=(a.min_crop_scale, 1.0), canvas=self.resize_canvas())

  def init_state(self, rng):
    k_init, k_state = jax.random.split(rng)
    s = self.config.model.img_size
    if self.init_model is not None:
      params = api.relayout(self.init_model.params, jax.eval_shape(
          lambda: self.model.init(k_init, jnp.zeros((1, s, s, 3)))["params"]))
    else:
      params = self.model.init(k_init, jnp.zeros((1, s, s, 3)))["params"]
      from beitv2_jax.models.vit import rescale_init
      params = rescale_init(params, [("blocks", 1)])
    return self.new_state(params, k_state)

  def model_info(self):
    return {"kind": "classifier", "model": dict(self.kwargs, scan=self.config.model.scan)}

  def logits(self, state, batch, frozen, train=False):
    images = transforms.imagenet_normalize(batch["image"])
    return self.model.apply({"params": state.params}, images, train=train)["logits"]

  def train_step(self, state, batch, frozen):
    a = self.config.aug
    rng = jax.random.fold_in(state.rng, state.step)
    k_erase, k_mix, k_drop = jax.random.split(rng, 3)
    # the view and the RandAugment ops the host left to the step (data.resize="device"), else batch["image"]
    images = transforms.imagenet_normalize(pixel_ops.augmented(canvas.images(batch), batch))
    if "erase" in batch:
      images = apply_random_erasing(k_erase, images, batch["erase"])
    if a.mixup > 0 or a.cutmix > 0:
      images, targets = grouped_mixup_cutmix(
          k_mix, images, batch["label"], self.num_classes, a.mixup_group_size, mixup_alpha=a.mixup,
          cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, smoothing=a.label_smoothing)
    else:
      targets = smooth_one_hot(batch["label"], self.num_classes, a.label_smoothing)

    def loss_fn(params):
      logits = self.model.apply({"params": params}, images, train=True, rngs={"dropout": k_drop})["logits"]
      return jnp.mean(optax.softmax_cross_entropy(logits, targets)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, opt_metrics = self.apply_gradients(state, grads)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    metrics = {"loss": loss, "train_acc": acc, **opt_metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------------------------
class LinearProbeTask(_ClassifierTask):
  """A linear classifier on frozen features (protocol in configs/linprobe_tiny.py's docstring).

  Features: config.probe.layer (-1 = last block), config.probe.pool ('cls' after the final norm, the
  default, or 'mean'), optionally a parameter-free BatchNorm (running statistics kept in the state)."""
  name = "linprobe"

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    p = config.probe
    self.encoder = api.load_encoder(config.init_from, config.model, config.seed)
    self.feature, enc_params = api.feature_fn(self.encoder, p.layer, p.pool)
    self.frozen = enc_params
    s = config.model.img_size
    dim = jax.eval_shape(self.feature, enc_params, jnp.zeros((1, s, s, 3))).shape[-1]
    self.dim = dim
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01))
    # the frozen encoder runs forward only (up to the probed block); the head forward and backward
    patch, width, depth, mlp_ratio = _encoder_shape(self.encoder)
    self.flops_per_example = (flops.vit_forward_flops(s, patch, width, depth if p.layer == -1 else p.layer, mlp_ratio)
                              + 3 * flops.linear_flops(1, dim, self.num_classes))

  def train_transform(self):
    # RandomResizedCrop + flip
    return transforms.TokenizerTrain(self.config.model.img_size, canvas=self.resize_canvas())

  def init_state(self, rng):
    k_init, k_state = jax.random.split(rng)
    params = self.head.init(k_init, jnp.zeros((1, self.dim)))["params"]
    extra = {"mean": jnp.zeros((self.dim,)), "var": jnp.ones((self.dim,))}
    return self.new_state(params, k_state, extra=extra)

  def model_info(self):
    # The frozen encoder is not in the checkpoint: api.load reads it again from here (an absolute path, so
    # the workdir loads from any directory) or rebuilds the random baseline from the run's seed.
    encoder = os.path.abspath(self.config.init_from) if self.config.init_from else api.RANDOM_ENCODER
    return {"kind": "linprobe", "encoder": encoder, "probe": self.config.probe.to_dict(),
            "num_classes": self.num_classes}

  def features(self, frozen, images_uint8):
    x = api.encoder_input(self.encoder, images_uint8)
    return jax.lax.stop_gradient(self.feature(frozen, x))

  def logits(self, state, batch, frozen, train=False):
    probe = {"head": state.params, "bn": state.extra}
    return api.probe_logits(probe, self.features(frozen, batch["image"]), self.config.probe.batchnorm)

  def train_step(self, state, batch, frozen):
    feats = self.features(frozen, canvas.images(batch))
    extra, stats = state.extra, None
    if self.config.probe.batchnorm:  # torch BatchNorm1d(affine=False): batch stats in training, EMA 0.1
      mean, var = stats = feats.mean(0), feats.var(0)
      n = feats.shape[0]
      extra = {"mean": 0.9 * extra["mean"] + 0.1 * mean, "var": 0.9 * extra["var"] + 0.1 * var * n / max(n - 1, 1)}
    labels = batch["label"]

    def loss_fn(params):
      logits = api.probe_logits({"head": params}, feats, self.config.probe.batchnorm, stats=stats)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, opt_metrics = self.apply_gradients(state, grads)
    metrics = {"loss": loss, "train_acc": jnp.mean(jnp.argmax(logits, -1) == labels), **opt_metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics


def _encoder_shape(model: api.Model) -> tuple[int, int, int, float]:
  """(patch size, width, depth, mlp ratio) of a loaded model's encoder, whatever its kind."""
  if model.kind in ("tokenizer", "mim"):
    e = model.module.encoder if model.kind == "tokenizer" else model.module.backbone
    return e["patch_size"], e["embed_dim"], e["depth"], e.get("mlp_ratio", 4.0)
  v = model.module
  return v.patch_size, v.embed_dim, v.depth, v.mlp_ratio
