"""Task `pretrain`: BEiT v2 masked image modeling on the codes of a frozen VQ-KD tokenizer (docs/method.md §3)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import api, flops
from beitv2_jax.data import canvas, transforms
from beitv2_jax.data.masking import MaskingGenerator
from beitv2_jax.models import quantizer
from beitv2_jax.models.build import fields_call, split_execution
from beitv2_jax.models.mim import BEiTForMIM, masked_positions, mim_kwargs
from beitv2_jax.models.vqkd import VQKD, vqkd_kwargs
from beitv2_jax.train.loop import Task

class MIMEval:
  """Resize + centre crop for both views (one `image` when they are the same size, as in MIMTrain), and a block
  mask seeded by the example index."""

  def __init__(self, size: int, second_size: int, mask_generator):
    self.view, self.view2, self.mask_generator = (transforms.EvalTransform(size), transforms.EvalTransform(second_size),
                                                  mask_generator)

  def __call__(self, im, rng):
    example = {"image": self.view(im, rng)["image"]}
    if self.view2.size != self.view.size:
      example["tokenizer_image"] = self.view2(im, rng)["image"]
    example["mask"] = self.mask_generator(rng).reshape(-1).astype(bool)
    return example


def views(batch: dict):
  """(the ViT's view, the tokenizer's view), uint8: the tokenizer's is its own field when the two differ, else
  the ViT's (transforms.MIMTrain); the ViT's is resized here when the host shipped its crop (data/canvas.py)."""
  image = canvas.images(batch)
  return image, batch.get("tokenizer_image", image)


def cross_entropy_and_hits(logits, labels):
  """(..., V) logits (computed in float32), (...) integer labels -> (cross-entropy, argmax == label as float32).

  The values of optax.softmax_cross_entropy_with_integer_labels, with the label's logit picked by a one-hot
  mask instead of take_along_axis: the gradient of a gather is a scatter into a zero (..., V) float32 tensor,
  which XLA runs as three passes over the 8192-way logits (softmax x g, the scatter, the cast for the lm_head
  matmuls); through the mask, softmax - one-hot is one elementwise pass (the roofline of the ViT-B/16 MIM step
  on an H100: see benchmarks/RESULTS.md). Summing a row of zeros and one logit is exact."""
  logits = logits.astype(jnp.float32)
  one_hot = labels[..., None] == jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
  label_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
  ce = jax.nn.logsumexp(logits, axis=-1) - label_logit
  return ce, (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def load_tokenizer(config) -> api.Model:
  """The frozen tokenizer `config.tokenizer_path` names: a tokenizer workdir or an official vqkd_*.pth
  (`python -m beitv2_jax.main` trains `config.tokenizer` into WORKDIR/tokenizer first when it is empty)."""
  path = config.tokenizer_path
  if path == "random":  # an untrained tokenizer of the student's size: for benchmarks only
    return random_tokenizer(config)
  if not path:
    raise ValueError("config.tokenizer_path is empty: point it at a tokenizer workdir or an official "
                     "vqkd_*.pth (python -m beitv2_jax.main trains config.tokenizer into WORKDIR/tokenizer first "
                     "when it is empty)")
  model = api.load(path, dtype=config.tokenizer_dtype, **tokenizer_execution(config))
  if model.kind != "tokenizer":
    raise ValueError(f"tokenizer_path {path} holds a {model.kind} checkpoint, not a tokenizer")
  return model


def tokenizer_execution(config) -> dict:
  """How the frozen tokenizer runs inside the MIM step: the student's patch embedding form (its attention
  and blocks keep their defaults). Only when not the default: a path to another kind of checkpoint is then
  refused for its kind, not for an override it does not take."""
  patch = config.model.get("patch_embed", "conv")
  return {} if patch == "conv" else {"patch_embed": patch}


def random_tokenizer(config) -> api.Model:
  """A randomly initialised VQ-KD (its codes mean nothing), for benchmarks, smoke tests and compiling
  offline: of config.tokenizer's architecture when the config has one, else of the student's size with a
  1-block decoder."""
  tok = config.tokenizer
  if tok is not None:
    arch, _ = split_execution(tok.model)
    kwargs = fields_call(vqkd_kwargs, arch, "config.tokenizer.model",
                         teacher_dim=tok.model.teacher_dim or _teacher_dim(tok))
  else:
    m = config.model
    kwargs = vqkd_kwargs(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                         num_heads=m.num_heads, mlp_ratio=4.0, decoder_embed_dim=m.embed_dim, decoder_depth=1,
                         decoder_num_heads=m.num_heads, codebook_size=8192, codebook_dim=32,  # the official codebook
                         teacher_dim=512)
  module = VQKD(**kwargs, dtype=api.dtype_of(config.tokenizer_dtype), **tokenizer_execution(config))
  s = kwargs["encoder"]["img_size"]
  params = jax.jit(lambda k: module.init(k, jnp.zeros((1, s, s, 3)))["params"])(jax.random.key(0))
  codebook = quantizer.new_codebook(jax.random.key(1), module.codebook_size, module.codebook_dim).embedding
  return api.Model("tokenizer", module, params, kwargs, np.asarray(codebook), "random")


def _teacher_dim(tok_config) -> int:
  """The feature dim of the teacher a tokenizer config names, without loading it."""
  from beitv2_jax.models.teacher import TEACHER_ARCHITECTURES
  if tok_config.teacher == "random":
    return tok_config.random_teacher.dim
  if tok_config.teacher in TEACHER_ARCHITECTURES:
    return TEACHER_ARCHITECTURES[tok_config.teacher]["dim"]
  raise ValueError(f"the feature dim of teacher {tok_config.teacher!r} is unknown here: set "
                   "config.tokenizer.model.teacher_dim")


class PretrainTask(Task):
  name = "pretrain"

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    m = config.model
    self.tokenizer = load_tokenizer(config)
    tok_enc = self.tokenizer.module.encoder
    grid = m.img_size // m.patch_size
    tok_grid = tok_enc["img_size"] // tok_enc["patch_size"]
    if grid != tok_grid:
      raise ValueError(f"the student's {grid}x{grid} patch grid does not match the tokenizer's "
                       f"{tok_grid}x{tok_grid}: every patch needs one code")
    self.second_size = tok_enc["img_size"]
    self.mask_generator = MaskingGenerator.from_ratio((grid, grid), config.mask.ratio, config.mask.min_patches)
    self.num_masked = self.mask_generator.num_masking_patches
    arch, run = split_execution(m)
    self.kwargs = fields_call(mim_kwargs, arch, vocab_size=self.tokenizer.module.codebook_size)
    self.model = BEiTForMIM(**self.kwargs, **run)
    self.frozen = {"params": self.tokenizer.params, "codebook": jnp.asarray(self.tokenizer.codebook)}
    n = grid * grid + 1
    student = (flops.vit_forward_flops(m.img_size, m.patch_size, m.embed_dim, m.depth, m.mlp_ratio)
               + m.head_layers * flops.block_forward_flops(n, m.embed_dim, m.mlp_ratio)
               + 2 * flops.linear_flops(self.num_masked, m.embed_dim, self.kwargs["vocab_size"]))
    tok = flops.vit_forward_flops(tok_enc["img_size"], tok_enc["patch_size"], tok_enc["embed_dim"],
                                  tok_enc["depth"], tok_enc["mlp_ratio"])
    self.flops_per_example = 3 * student + tok

  def train_transform(self):
    a = self.config.aug
    return transforms.MIMTrain(self.config.model.img_size, self.mask_generator, min_crop_scale=a.min_crop_scale,
                               second_size=self.second_size, second_interpolation=a.second_interpolation,
                               canvas=self.resize_canvas())

  def init_state(self, rng):
    k_init, k_state = jax.random.split(rng)
    s = self.config.model.img_size
    mask = jnp.zeros((1, (s // self.config.model.patch_size) ** 2), bool).at[:, :self.num_masked].set(True)
    params = self.model.init(k_init, jnp.zeros((1, s, s, 3)), mask, self.num_masked)["params"]
    params = self.model.fix_init(params)
    return self.new_state(params, k_state)

  def model_info(self):
    return {"kind": "mim", "model": dict(self.kwargs, scan=self.config.model.scan),
            "tokenizer": self.tokenizer.source}

  def targets(self, frozen, tokenizer_images_uint8):
    """Code ids of every patch, (B, N), from the frozen tokenizer (encoder + nearest code only)."""
    images01 = transforms.to_unit(tokenizer_images_uint8)
    z = self.tokenizer.module.apply({"params": frozen["params"]}, images01, method=VQKD.encode)
    return jax.lax.stop_gradient(quantizer.nearest_code(frozen["codebook"], z))

  def losses(self, params, batch, frozen, train, rng=None):
    image, tokenizer_image = views(batch)
    ids = self.targets(frozen, tokenizer_image)
    mask = batch["mask"]
    labels = jnp.take_along_axis(ids, masked_positions(mask, self.num_masked), axis=1)
    images = transforms.imagenet_normalize(image)
    rngs = {"dropout": rng} if rng is not None else {}
    main, agg = self.model.apply({"params": params}, images, mask, self.num_masked, train, rngs=rngs)
    ce1, acc1 = cross_entropy_and_hits(main, labels)
    ce2, acc2 = cross_entropy_and_hits(agg, labels)
    return ce1, ce2, acc1, acc2, labels

  def train_step(self, state, batch, frozen):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      ce1, ce2, acc1, acc2, labels = self.losses(params, batch, frozen, True, rng)
      loss1, loss2 = ce1.mean(), ce2.mean()
      # the baseline mlm_acc must beat: always predicting this batch's most frequent code
      counts = jnp.zeros((self.kwargs["vocab_size"],), jnp.float32).at[labels.reshape(-1)].add(1.0)
      return loss1 + loss2, {"loss_1": loss1, "loss_2": loss2, "mlm_acc_1": acc1.mean(), "mlm_acc_2": acc2.mean(),
                             "mlm_majority_acc": counts.max() / labels.size}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, opt_metrics = self.apply_gradients(state, grads)
    metrics = {"loss": loss, **aux, **opt_metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def evaluate(self, state) -> dict:
    """MIM accuracy of both heads on the held-out split, and the majority-code baseline."""
    c = self.config
    frozen = self.replicated_frozen()

    @jax.jit
    def eval_fn(params, batch, frozen):
      ce1, ce2, acc1, acc2, labels = self.losses(params, batch, frozen, False)
      w = batch["valid"].astype(jnp.float32)[:, None]
      return (jnp.sum(acc1 * w), jnp.sum(acc2 * w), jnp.sum(ce1 * w), jnp.sum(w) * labels.shape[1],
              jnp.zeros((self.kwargs["vocab_size"],)).at[labels.reshape(-1)].add(jnp.repeat(w[:, 0], labels.shape[1])))

    sums = np.zeros(4)
    hist = np.zeros(self.kwargs["vocab_size"])
    transform = MIMEval(c.model.img_size, self.second_size, self.mask_generator)
    for batch in self.eval_batches(transform):
      out = jax.device_get(eval_fn(state.params, batch, frozen))
      sums += np.array([float(x) for x in out[:4]])
      hist += out[4]
    if not sums[3]:
      return {}
    n = sums[3]
    return {"eval_mlm_acc_1": sums[0] / n, "eval_mlm_acc_2": sums[1] / n, "eval_loss_1": sums[2] / n,
            "eval_majority_code_acc": float(hist.max() / n)}
