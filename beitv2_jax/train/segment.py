"""Task `segment`: semantic segmentation with UperNet on a BEiT encoder, the official ADE20K transfer
(semantic_segmentation/ on mmseg 0.x; docs/method.md §4.3): models/upernet.py, the mmseg pipelines
(data/seg_transforms.py), the loss and mIoU (train/seg_ops.py), sliding-window inference (seg_inference.py).

The encoder comes from `config.init_from` (a pretraining or tokenizer workdir, an official checkpoint): its
relative position table is copied into every block and resized to the crop's grid (14x14 -> 32x32 at 512 px),
as the official backbone's init does. BatchNorm statistics live in the state's `extra` and are checkpointed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from beitv2_jax import api, flops, seg_inference
from beitv2_jax.data import seg_sources, seg_transforms
from beitv2_jax.data.pipeline import ExampleFn
from beitv2_jax.models.build import fields_call, split_execution
from beitv2_jax.models.upernet import UperNetBEiT, resize_bilinear
from beitv2_jax.train.loop import Task
from beitv2_jax.train.seg_ops import intersect_and_union, seg_loss, segmentation_metrics


def poly_schedule(base_lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float = 1e-6,
                  power: float = 1.0, min_lr: float = 0.0) -> Callable:
  """mmcv PolyLrUpdaterHook(by_epoch=False) with linear warm-up: (base - min)(1 - t/T)^power + min, multiplied
  during the first W steps by 1 - (1 - t/W)(1 - warmup_ratio)."""
  total = max(int(total_steps), 1)

  def schedule(step):
    # (T - t) / T and ratio + (1 - ratio) t / W: the same numbers as mmcv's forms without float32 cancellation
    t = jnp.asarray(step, jnp.float32)
    lr = (base_lr - min_lr) * jnp.clip((total - t) / total, 0.0, 1.0) ** power + min_lr
    if warmup_steps > 0:
      lr = jnp.where(t < warmup_steps, lr * (warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps), lr)
    return lr

  return schedule


def segmenter_kwargs(*, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, init_values, drop_path_rate,
                     out_indices, channels, aux_channels, dropout, num_classes) -> dict:
  """A segmentation `config.model` -> UperNetBEiT's architecture: the BEiT encoder, the four blocks its
  pyramid is taken from, UPerHead's and the auxiliary FCNHead's widths, the heads' dropout."""
  out_indices = tuple(int(i) for i in out_indices)
  if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
    raise ValueError(f"config.model.out_indices={out_indices}: expected four block indices in [0, {depth}) "
                     "(the official base takes (3, 5, 7, 11))")
  return dict(num_classes=num_classes, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
              num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values, drop_path_rate=drop_path_rate,
              out_indices=out_indices, channels=channels, aux_channels=aux_channels, dropout=dropout)


class SegmentTask(Task):
  name = "segment"

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    m, s = config.model, config.seg
    self.num_classes = config.num_classes or self.train_source.num_classes
    if not self.num_classes:
      raise ValueError(f"config.num_classes=0 and {config.data.name} does not say its class count: set it "
                       "(150 for ADE20K)")
    arch, run = split_execution(m)
    self.kwargs = fields_call(segmenter_kwargs, arch, num_classes=self.num_classes)
    self.encoder_depth = m.depth
    k = self.kwargs
    self.flops_per_example = 3 * flops.upernet_forward_flops(
        m.img_size, k["patch_size"], k["embed_dim"], k["depth"], k["mlp_ratio"], k["channels"], k["aux_channels"],
        self.num_classes)
    self.model = UperNetBEiT(**self.kwargs, **run)
    self.init_encoder = self.pretrained_encoder() if config.init_from else None
    o = config.optim
    self.schedule = poly_schedule(o.lr, self.total_steps, self.warmup_steps, s.warmup_ratio, s.power, o.min_lr)

  def make_source(self, name: str, split: str):
    return seg_sources.make_seg_source(name, split)

  def train_transform(self):
    s = self.config.seg
    return seg_transforms.SegTrain(s.crop, (s.scale_long, s.scale_short), (s.ratio_min, s.ratio_max),
                                   s.cat_max_ratio, s.reduce_zero_label, self.num_classes)

  def init_state(self, rng):
    k_init, k_state = jax.random.split(rng)
    s = self.config.model.img_size
    variables = self.model.init(k_init, jnp.zeros((1, s, s, 3)))
    params = dict(variables["params"])
    if self.init_encoder is not None:
      params["backbone"] = api.relayout(self.init_encoder, jax.eval_shape(lambda: params["backbone"]))
    return self.new_state(params, k_state, extra=variables["batch_stats"])

  def pretrained_encoder(self):
    """The encoder of config.init_from as this backbone's params: the shared rel-pos table copied into every
    block and resized to the crop's grid (api.convert_kind, as for fine-tuning). Read here, outside jit."""
    c, m = self.config, self.config.model
    loaded = api.load(c.init_from)
    if loaded.kind not in ("mim", "tokenizer"):
      raise ValueError(f"init_from {c.init_from} holds a {loaded.kind} checkpoint: segmentation starts from a "
                       "pretrained encoder (a pretrain or tokenizer workdir, an official checkpoint)")
    clf = api.convert_kind(loaded, "classifier", num_classes=0, img_size=m.img_size)
    theirs = {k: clf.config[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    ours = {k: self.kwargs[k] for k in theirs}
    if theirs != ours:
      raise ValueError(f"init_from {c.init_from} is an encoder with {theirs}; config.model says {ours}")
    template = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), jnp.zeros(
        (1, m.img_size, m.img_size, 3)))["params"]["backbone"])
    encoder = {k: v for k, v in clf.params.items() if k in template}
    missing = sorted(set(template) - set(encoder))
    if missing:
      raise ValueError(f"init_from {c.init_from}: the encoder lacks {missing[:5]}")
    return encoder

  def model_info(self):
    return {"kind": "segmenter", "model": dict(self.kwargs, scan=self.config.model.scan)}


  def train_step(self, state, batch, frozen):
    rng = jax.random.fold_in(state.rng, state.step)
    labels = batch["label"].astype(jnp.int32)

    images = seg_inference.normalised_images(batch["image"], batch.get("valid_pixels"))

    def loss_fn(params):
      (logits, aux), new = self.model.apply({"params": params, "batch_stats": state.extra}, images, train=True,
                                            rngs={"dropout": rng}, mutable=["batch_stats"])
      main, auxiliary = seg_loss(logits, labels), seg_loss(aux, labels)
      return main + self.config.seg.aux_weight * auxiliary, (main, auxiliary, logits, new["batch_stats"])

    (loss, (main, auxiliary, logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, opt_metrics = self.apply_gradients(state, grads)
    pred = jnp.argmax(resize_bilinear(logits, labels.shape[1:3]), -1)
    valid = labels != seg_transforms.IGNORE
    acc = jnp.sum((pred == labels) & valid) / jnp.maximum(jnp.sum(valid), 1)
    metrics = {"loss": loss, "loss_main": main, "loss_aux": auxiliary, "pixel_acc": acc, **opt_metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=stats), metrics

  def evaluate(self, state) -> dict:
    """mIoU / mAcc / aAcc on the held-out split: each image rescaled as the test pipeline says, scored by
    sliding windows, the scores resized to the image's own size; each process takes every P-th image and the
    per-class totals are summed over processes. Each process scores its images on its first local device
    with its own copy of the weights: images differ in size and count between processes, so the windows
    never go through a program over the global mesh."""
    c, s = self.config, self.config.seg
    if not c.data.eval_split:
      return {}
    source = self.make_source(c.data.name, c.data.eval_split)
    example_fn = ExampleFn(source, seg_transforms.SegEval((s.scale_long, s.scale_short), s.reduce_zero_label,
                                                                self.num_classes))
    window_scores = seg_inference.window_scores_fn(self.model, s.crop)
    weights = (state.params, state.extra)
    if jax.process_count() > 1:  # sharded over hosts (fsdp) or not: the whole values, on this host
      weights = multihost_utils.process_allgather(weights, tiled=True)
    params, stats = jax.device_put(weights, jax.local_devices()[0])
    variables = {"params": params, "batch_stats": stats}
    totals = np.zeros((4, self.num_classes), np.int64)
    for i in range(jax.process_index(), len(source), jax.process_count()):
      ex = example_fn(source[i], np.random.default_rng(i))
      pred = seg_inference.class_map(lambda w, v: window_scores(variables, w, v), ex["image"], ex["label"].shape,
                                     self.num_classes, s.crop, s.stride)
      totals += np.stack(intersect_and_union(pred, ex["label"], self.num_classes))
    if jax.process_count() > 1:
      totals = np.asarray(multihost_utils.process_allgather(totals)).sum(0)
    if not totals[3].sum():
      return {}
    out = segmentation_metrics(totals)
    return {"mIoU": out["mIoU"], "mAcc": out["mAcc"], "aAcc": out["aAcc"]}
