"""Task `tokenizer`: train a VQ-KD tokenizer by distilling a frozen teacher (docs/method.md §1-2)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import flops
from beitv2_jax.data import canvas, pipeline, transforms
from beitv2_jax.models import quantizer, teacher as teacher_lib
from beitv2_jax.models.build import fields_call, split_execution
from beitv2_jax.models.vqkd import VQKD, vqkd_kwargs
from beitv2_jax.train import teacher_cache
from beitv2_jax.train.loop import Task, TrainState

def cosine_rec_loss(rec: jax.Array, target: jax.Array) -> jax.Array:
  """mean over tokens of 1 - cos(rec, target) (rec_loss_type='cosine')."""
  r = quantizer.l2norm(rec.astype(jnp.float32))
  t = quantizer.l2norm(target.astype(jnp.float32))
  return jnp.mean(1.0 - jnp.sum(r * t, axis=-1))


class TokenizerTask(Task):
  name = "tokenizer"
  lr_batch_reference = 128  # run_vqkd_training.py: lr * total_batch / 128

  def __init__(self, config, workdir, mesh):
    super().__init__(config, workdir, mesh)
    m = config.model
    if m.img_size % m.patch_size:
      raise ValueError(f"model.img_size={m.img_size} is not divisible by model.patch_size={m.patch_size}")
    self.teacher = teacher_lib.build_teacher(config)
    td = config.model.teacher_dim
    if td and td != self.teacher.dim:
      raise ValueError(f"model.teacher_dim={td} does not match the teacher's feature dim {self.teacher.dim} "
                       f"({self.teacher.source})")
    arch, run = split_execution(m)
    self.kwargs = fields_call(vqkd_kwargs, arch, teacher_dim=self.teacher.dim)
    self.model = VQKD(**self.kwargs, **run)
    self.frozen = self.teacher.params
    grid = self.grid = m.img_size // m.patch_size
    n = grid * grid + 1
    enc = flops.vit_forward_flops(m.img_size, m.patch_size, m.embed_dim, m.depth)
    dec = m.decoder_depth * flops.block_forward_flops(n, m.decoder_embed_dim) + flops.linear_flops(
        n - 1, m.codebook_dim, m.decoder_embed_dim)
    tm = self.teacher.module
    teacher = flops.vit_forward_flops(tm.image_size, tm.patch_size, tm.hidden_size, tm.num_layers,
                                      tm.intermediate_size / tm.hidden_size)
    # with teacher_cache_views the teacher runs once per cached view before training, not in the step
    self.flops_per_example = 3 * (enc + dec) + (0 if config.teacher_cache_views else teacher)

  def train_transform(self):
    return transforms.TokenizerTrain(self.config.model.img_size, canvas=self.resize_canvas())

  def train_data(self):
    """The training batches; with teacher_cache_views, the cached views with their teacher targets."""
    c = self.config
    n = c.teacher_cache_views
    if not n:
      return super().train_data()
    tm = self.teacher.module
    fingerprint = dict(teacher=self.teacher.source, teacher_px=tm.image_size, teacher_patch=tm.patch_size,
                       teacher_dtype=c.teacher_dtype, views=n, seed=c.seed, data=c.data.name,
                       split=c.data.train_split, img_size=c.model.img_size, grid=self.grid)
    views = teacher_cache.load_or_build(self.workdir, fingerprint, self.train_source,
                                        transforms.TokenizerTrain(c.model.img_size),  # stored resized
                                        self.teacher, self.teacher.params, self.grid, n, c.seed)
    return pipeline.train_dataset(views, teacher_cache.AsStored(), c.batch_size, c.seed,
                                  num_workers=c.data.num_workers, read_threads=c.data.read_threads)

  def init_state(self, rng):
    k_init, k_code, k_state = jax.random.split(rng, 3)
    size = self.config.model.img_size
    params = self.model.init(k_init, jnp.zeros((1, size, size, 3)))["params"]
    params = self.model.fix_init(params)
    codebook = quantizer.new_codebook(k_code, self.config.model.codebook_size, self.config.model.codebook_dim,
                                      initted=not self.config.quantizer.kmeans_init)
    return self.new_state(params, k_state, extra=codebook)

  def model_info(self):
    return {"kind": "tokenizer", "model": self.kwargs, "teacher": self.teacher.source}

  def initial_step(self):
    """With `kmeans_init` (official), the first step runs k-means on the batch's encodings first."""
    return functools.partial(self._step, kmeans=True) if self.config.quantizer.kmeans_init else None

  def first_step(self, state: TrainState):
    """initial_step while the codebook still needs its k-means init; loaded and resumed codebooks are initted."""
    if bool(np.asarray(state.extra.initted.addressable_data(0))):
      return None
    return self.initial_step()

  def train_step(self, state: TrainState, batch: dict, teacher_params):
    return self._step(state, batch, teacher_params, kmeans=False)

  def _step(self, state: TrainState, batch: dict, teacher_params, kmeans: bool):
    q = self.config.quantizer
    rng = jax.random.fold_in(state.rng, state.step)
    k_kmeans, k_drop, k_restart = jax.random.split(rng, 3)
    images = transforms.to_unit(canvas.images(batch))
    if "teacher_target" in batch:  # teacher_cache_views: computed once for this view
      target = batch["teacher_target"].astype(jnp.float32)
    else:
      target = self.teacher.apply(teacher_params, images, self.grid)

    def loss_fn(params):
      z = self.model.apply({"params": params}, images, method=VQKD.encode)
      cb = quantizer.kmeans_init(state.extra, jax.lax.stop_gradient(z), k_kmeans) if kmeans else state.extra
      zq, commit, ids = quantizer.quantize(jax.lax.stop_gradient(cb.embedding), z)
      rec = self.model.apply({"params": params}, zq, True, method=VQKD.decode, rngs={"dropout": k_drop})
      rec_loss = cosine_rec_loss(rec, target)
      return rec_loss + commit, (cb, jax.lax.stop_gradient(z), ids, rec_loss, commit)

    (loss, (cb, z, ids, rec_loss, commit)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, opt_metrics = self.apply_gradients(state, grads)
    cb = quantizer.ema_update(cb, z, ids, q.ema_decay, state.step, restart_after=q.dead_code_restart_steps,
                              restart_key=k_restart)
    metrics = {"loss": loss, "rec_loss": rec_loss, "quant_loss": commit, **opt_metrics,
               **quantizer.usage_metrics(cb.interval_counts)}
    # codebook_usage covers one log interval: reset the counts at each log step
    at_log = (state.step + 1) % self.config.log_every_steps == 0
    cb = cb.replace(interval_counts=jnp.where(at_log, 0.0, cb.interval_counts))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, extra=cb), metrics

  def evaluate(self, state: TrainState) -> dict:
    """rec_loss and codebook usage over the whole held-out split."""
    c = self.config
    eval_fn, frozen = jax.jit(self._eval_batch), self.replicated_frozen()
    total, count = 0.0, 0
    counts = np.zeros(c.model.codebook_size, np.int64)
    for batch in self.eval_batches(transforms.EvalTransform(c.model.img_size)):
      loss_sum, n, hist = jax.device_get(eval_fn(state.params, state.extra, batch, frozen))
      total, count = total + float(loss_sum), count + int(n)
      counts += hist.astype(np.int64)
    if not count:
      return {}
    return {"eval_rec_loss": total / count, "eval_codebook_usage": float(np.mean(counts > 0)),
            "eval_unused_codes": int(np.sum(counts == 0))}

  def _eval_batch(self, params, codebook, batch, teacher_params):
    images = transforms.to_unit(batch["image"])
    valid = batch["valid"].astype(jnp.float32)
    z = self.model.apply({"params": params}, images, method=VQKD.encode)
    zq, _, ids = quantizer.quantize(codebook.embedding, z)
    rec = self.model.apply({"params": params}, zq, method=VQKD.decode)
    target = self.teacher.apply(teacher_params, images, self.grid)
    per_image = jnp.mean(1.0 - jnp.sum(quantizer.l2norm(rec) * quantizer.l2norm(target), -1), axis=-1)
    hist = jnp.zeros((codebook.size,), jnp.float32).at[ids.reshape(-1)].add(
        jnp.repeat(valid, ids.shape[1]))
    return jnp.sum(per_image * valid), jnp.sum(valid), hist

