"""The training loop every task shares: sharded init, resume, the jitted step, logging, NaN guard,
checkpoints, SIGTERM, evaluation. A task supplies the model-specific pieces (see `Task`).

Reads top to bottom: mesh -> input -> sharded init or restore -> compiled step -> loop
(step, log, guard, evaluate, checkpoint, preemption) -> final save.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beitv2_jax import checkpoint, parallel, roofline
from beitv2_jax.config_defaults import validate as validate_config
from beitv2_jax.data import pipeline, sources
from beitv2_jax.models.build import EXECUTION_FIELDS
from beitv2_jax.train import optim
from beitv2_jax.train.writer import MetricWriter


def device_peak_flops() -> Optional[float]:
  """Dense bf16 peak FLOP/s of this run's devices (beitv2_jax/roofline.py's table), for MFU; None if unknown."""
  return roofline.peak_flops(jax.devices()[0].device_kind)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array       # raw uint32[2] key; each step uses fold_in(rng, step)
  extra: Any = None    # task state that is not trained by gradients (the VQ-KD codebook)


class NonFiniteError(RuntimeError):
  pass


class Task:
  """Everything the loop uses of a task. `Task.__init__` sets the run's length and learning-rate schedule
  from the config; a subclass builds its model (and its frozen inputs) in its own __init__, which must be
  cheap and free of side effects (nothing trained, nothing written), and implements the methods marked
  "to implement"."""
  name: str = "task"
  # The batch size `optim.lr` is quoted for: with optim.scale_lr_by_batch the schedule's peak is
  # lr * batch_size / lr_batch_reference (the official VQ-KD script scales by batch / 128).
  lr_batch_reference: int = 256

  # Set by a subclass's __init__.
  flops_per_example: float = 0.0  # model FLOPs of one training example (fwd + bwd), for MFU
  encoder_depth: int = 0  # the encoder's block count, for layer-wise lr decay (config.optim.layer_decay)
  # Frozen inputs of the step that are not checkpointed with the run (the VQ-KD teacher, the tokenizer
  # that gives MIM targets, a probed encoder): passed to train_step as a third argument, never donated.
  frozen: Any = None

  def __init__(self, config, workdir: str, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.train_source = self.make_source(config.data.name, config.data.train_split)
    n = len(self.train_source)
    if n < config.batch_size:
      logging.warning("the training set (%d) is smaller than one batch (%d)", n, config.batch_size)
    self.steps_per_epoch = max(1, n // config.batch_size)
    self.total_steps = int(config.total_steps) if config.total_steps > 0 else int(
        round(config.epochs * self.steps_per_epoch))
    ws = config.warmup_steps
    self.warmup_steps = int(ws) if ws >= 0 else int(round(config.warmup_epochs * self.steps_per_epoch))
    o = config.optim
    peak = o.lr * config.batch_size / self.lr_batch_reference if o.scale_lr_by_batch else o.lr
    self.schedule: Callable = optim.warmup_cosine(peak, self.total_steps, self.warmup_steps, o.min_lr)

  def make_source(self, name: str, split: str):
    """The dataset `config.data.name` names (a segmentation task reads image / annotation pairs)."""
    return sources.make_source(name, split)

  # --- to implement -------------------------------------------------------------------------------
  def train_transform(self) -> Callable:
    raise NotImplementedError

  def init_state(self, rng: jax.Array) -> TrainState:
    raise NotImplementedError

  def train_step(self, state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
    raise NotImplementedError

  def initial_step(self) -> Optional[Callable]:
    """The step function (train_step's signature) a run from scratch starts with when it differs from
    train_step (the tokenizer's k-means codebook init), else None."""
    return None

  def first_step(self, state: TrainState) -> Optional[Callable]:
    """initial_step() when `state` still needs it (a fresh state, not a resumed or loaded one), else None.
    Compiled and used once."""
    return None

  def evaluate(self, state: TrainState) -> dict:
    """Metrics on the held-out split (`eval_batches`), logged at eval_every_steps and at the end."""
    return {}

  def model_info(self) -> dict:
    """What `beitv2_jax.load` needs to rebuild the model: {'kind': ..., 'model': {...}}."""
    return {}

  def state_rules(self):
    """Sharding rules for state leaves, (regex over the leaf path, PartitionSpec) pairs; none: FSDP by size."""
    return ()

  def tx(self, params) -> optax.GradientTransformation:
    """The optimizer: AdamW of `config.optim` with the official no-decay groups, gradient clipping and, for
    the transfer tasks, layer-wise lr decay over `encoder_depth` blocks (optim.adamw) on `self.schedule`."""
    o = self.config.optim
    return optim.adamw(params, self.schedule, o.b1, o.b2, o.eps, o.weight_decay, clip_grad=o.clip_grad or None,
                       layer_decay=o.get("layer_decay"), depth=self.encoder_depth)

  # --- shared helpers -----------------------------------------------------------------------------
  def new_state(self, params, rng: jax.Array, extra: Any = None) -> TrainState:
    """The state at step 0: `params` with a fresh optimizer state of `tx`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx(params).init(params),
                      rng=rng, extra=extra)

  def apply_gradients(self, state: TrainState, grads) -> tuple[Any, Any, dict]:
    """One optimizer update: (new params, new optimizer state, {grad_norm, lr})."""
    updates, opt_state = self.tx(state.params).update(grads, state.opt_state, state.params)
    return (optax.apply_updates(state.params, updates), opt_state,
            {"grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step)})

  def eval_batches(self, transform: Callable):
    """Global batches of the held-out split (`data.eval_split`; none when it is empty), each example once
    (padding rows have valid=0)."""
    c = self.config
    split = c.data.eval_split
    if not split:
      return
    source = sources.make_source(c.data.name, split)
    for local in pipeline.eval_batches(source, transform, c.batch_size, seed=c.seed):
      local.pop("bad", None)
      yield parallel.to_global(local, self.mesh)

  def resize_canvas(self) -> int:
    """The canvas side of training views resized on the device (data.resize; data/canvas.py), 0: on the host."""
    d = self.config.data
    if d.get("resize", "host") != "device":
      return 0
    return d.get("resize_canvas", 0) or 2 * self.config.model.img_size

  def replicated_frozen(self):
    return jax.device_put(self.frozen, parallel.replicated(self.mesh))

  def train_data(self):
    c = self.config
    return pipeline.train_dataset(self.train_source, self.train_transform(), c.batch_size, c.seed,
                                  num_workers=c.data.num_workers, read_threads=c.data.read_threads)


def _install_sigterm() -> Callable[[], bool]:
  flag = {"set": False}

  def handler(signum, frame):
    logging.warning("SIGTERM received: saving at the next step boundary")
    flag["set"] = True

  try:
    signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    pass
  return lambda: flag["set"]


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def jit_step(step: Callable, state_shardings: Any, mesh) -> Callable:
  """A step function (train_step's signature) jitted as the loop runs it: the state sharded as given and
  donated, the batch split over the mesh's batch axes, the frozen inputs as they were put, metrics
  replicated. The benchmarks compile it the same way."""
  return jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh), None),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def placement(task: Task, abstract_state: Any) -> tuple[Any, Any]:
  """Where the loop puts the train state and the frozen inputs: their shardings over task.mesh (the task's
  rules, else FSDP by size). beitv2_jax.aot compiles with the same."""
  rules, min_size = task.state_rules(), task.config.mesh.fsdp_min_size
  return (parallel.state_shardings(abstract_state, task.mesh, rules, min_size),
          parallel.state_shardings(task.frozen, task.mesh, rules, min_size))


def run(task: Task) -> tuple[TrainState, dict]:
  """Trains `task` to task.total_steps, resuming from task.workdir if it holds a checkpoint. Returns the
  final state and the last logged metrics merged with the last evaluation. One run per workdir: a second
  one is refused while the first holds WORKDIR/run.lock."""
  validate(task.config, task.mesh)  # every setting checked before anything is built or compiled
  lock = checkpoint.acquire_lock(task.workdir)
  try:
    return _run(task)
  finally:
    checkpoint.release_lock(lock)


def _run(task: Task) -> tuple[TrainState, dict]:
  config, workdir, mesh = task.config, task.workdir, task.mesh
  is_main = jax.process_index() == 0

  # ---- Input: host pipeline -> batches already on the devices (what checkpoints record) -----------
  data_iter = pipeline.DevicePrefetch(iter(task.train_data()), lambda local: parallel.to_global(local, mesh),
                                      depth=config.data.device_prefetch)

  # ---- Sharded init or restore -------------------------------------------------------------------
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings, frozen_shardings = placement(task, abstract)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                 keep_every=config.keep_every_steps)
  run_info = {"task": task.name, "config": config.to_dict(), **task.model_info()}
  restored = None
  if ckpt.latest_step() is not None:
    check_resume_config(workdir, run_info)  # a different model is refused before orbax tries it
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = ckpt.restore_latest(target, data_iter)
  if restored is not None:
    start, state, meta = restored
    logging.info("resumed from %s at step %d", workdir, start)
    if is_main:
      print(f"[{task.name}] resumed from step {start}", flush=True)
  else:
    start, meta = 0, {}
    state = jax.jit(task.init_state, out_shardings=shardings)(rng)
  checkpoint.write_json(os.path.join(workdir, "config.json"), run_info)

  # ---- Compiled step -----------------------------------------------------------------------------
  frozen = jax.device_put(task.frozen, frozen_shardings)
  step_fn = jit_step(task.train_step, shardings, mesh)
  first = task.first_step(state)
  first_fn = jit_step(first, shardings, mesh) if first is not None else None

  # rows logged after the checkpoint we resume from are dropped: the resumed run logs those steps again
  writer = MetricWriter(workdir, wandb_config=dict(config.wandb, run_config=config.to_dict()),
                        drop_after_step=start)
  preempted = _install_sigterm()
  peak = device_peak_flops()
  total = task.total_steps
  log_every, ckpt_every = config.log_every_steps, config.checkpoint_every_steps
  eval_every = config.eval_every_steps
  stop_after = config.stop_after_steps  # > 0: save and exit at this step (time-limited jobs)
  last_metrics: dict = {}
  pending: list = []
  t_last, steps_since = time.perf_counter(), 0
  # Time blocked in next(data_iter) this interval. Steps are dispatched asynchronously, so while the input
  # keeps up this is ~0 (the batch is ready while the device still runs the previous step); when it is a
  # large fraction of the interval, the input pipeline is the bottleneck.
  data_wait = 0.0
  bad_images = int(meta.get("bad_images", 0))
  # NaN guard. A step's loss and gradient norm are those of its input state, so a checkpoint of step s is
  # trusted only once step s + 1 came out finite; until then it is `unconfirmed`, and if step s + 1 is not
  # finite it is set aside (moved, never deleted): resuming from it would only fail again.
  unconfirmed: Optional[int] = None

  def check_finite(metrics: dict, step: int):
    nonlocal unconfirmed
    bad = next((k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])), None)
    if bad is None:
      if unconfirmed is not None and step == unconfirmed + 1:
        unconfirmed = None
      return
    msg = f"{bad} is {metrics[bad]} at step {step}; stopped without saving."
    if unconfirmed is not None and step == unconfirmed + 1:
      moved = ckpt.set_aside(unconfirmed)
      msg += f" Checkpoint {unconfirmed}, the input of that step, was set aside in {moved}."
    raise NonFiniteError(msg + " " + _last_good(ckpt, workdir))

  step = start
  try:
    for step in range(start + 1, total + 1):
      t_wait = time.perf_counter()
      batch, bad = next(data_iter)
      data_wait += time.perf_counter() - t_wait
      bad_images += bad
      state, metrics = (first_fn if first_fn is not None and step == start + 1 else step_fn)(state, batch, frozen)
      pending.append(metrics)
      steps_since += 1
      stop = parallel.any_process(preempted()) or step == stop_after
      is_log = step % log_every == 0 or step == total
      is_ckpt = step % ckpt_every == 0 or step == total or stop

      # ---- Log + NaN guard ------------------------------------------------------------------------
      if is_log or is_ckpt:
        fetched = jax.device_get(pending)
        for i, m in enumerate(fetched):
          check_finite(m, step - len(fetched) + 1 + i)
        pending = []
      if is_log:
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        m = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1]}
        # interval-style metrics (codebook usage) are only meaningful at the interval end
        m.update({k: float(fetched[-1][k]) for k in fetched[-1] if k.startswith(("codebook_", "perplexity"))})
        img_s = steps_since * config.batch_size / dt
        m.update(img_per_sec=img_s, img_per_sec_per_device=img_s / jax.device_count(),
                 step_time_s=dt / steps_since, data_wait_s=data_wait / steps_since,
                 data_wait_frac=min(data_wait / dt, 1.0), bad_images=bad_images, epoch=step / task.steps_per_epoch)
        if peak and task.flops_per_example:
          m["mfu"] = task.flops_per_example * img_s / (peak * jax.device_count())
        writer.write(step, m)
        last_metrics = m
        if is_main:
          eta = (total - step) * dt / steps_since
          shown = " | ".join(f"{k} {m[k]:.4g}" for k in ("loss", "lr", "grad_norm", "codebook_usage",
                                                          "mlm_acc_1", "mfu") if k in m)
          print(f"[{task.name}] step {step}/{total} | {shown} | {img_s:.1f} img/s | "
                f"data wait {m['data_wait_frac']:.0%} | ETA {_fmt_eta(eta)}", flush=True)
        t_last, steps_since, data_wait = time.perf_counter(), 0, 0.0

      # ---- Evaluate -------------------------------------------------------------------------------
      if eval_every and (step % eval_every == 0) and step != total:
        ev = task.evaluate(state)
        if ev:
          writer.write(step, ev)
          last_metrics.update(ev)
        t_last, data_wait = time.perf_counter(), 0.0

      # ---- Checkpoint / preemption ----------------------------------------------------------------
      if is_ckpt:
        if not bool(_all_finite(state.params, state.opt_state)):
          raise NonFiniteError(f"the parameters or optimizer state after step {step} are not finite (its loss and "
                               f"gradient norm were); stopped without saving. {_last_good(ckpt, workdir)}")
        ckpt.save(step, state, data_iter, meta={"bad_images": bad_images})
        unconfirmed = step
      if stop:
        ckpt.wait()
        if is_main:
          why = "preempted" if step != stop_after else f"stop_after_steps={stop_after}"
          print(f"[{task.name}] {why}: saved step {step}; rerun the same command to resume", flush=True)
        last_metrics["preempted_at"] = step
        return state, last_metrics
    ckpt.wait()
    ev = task.evaluate(state)
    if ev:
      writer.write(total, ev)
      last_metrics.update(ev)
      if is_main:
        print(f"[{task.name}] eval at step {total}: " +
              " | ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, (int, float))), flush=True)
  finally:
    ckpt.close()
    writer.close()
  return state, last_metrics


def topk_correct(logits, labels, ks=(1, 5)):
  """Per row, 1.0 where the label is among the k highest logits, for each k (classifier evaluation)."""
  order = jnp.argsort(-logits, axis=-1)
  return [jnp.any(order[:, :k] == labels[:, None], axis=-1).astype(jnp.float32) for k in ks]


@jax.jit
def _all_finite(*trees) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(trees) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])) if leaves else True


def _last_good(ckpt: checkpoint.Checkpointer, workdir: str) -> str:
  ckpt.wait()
  good = ckpt.latest_step()
  if good is None:
    return f"No checkpoint is left in {workdir}: a rerun starts from step 0 (with a lower learning rate, say)."
  return (f"The last good checkpoint is step {good} in {workdir}: rerun to resume from it (with a lower learning "
          "rate, say).")


# ------------------------------------------------------------------------------------------------
# Settings: checked up front, and compared with the workdir's on resume
# ------------------------------------------------------------------------------------------------
def validate(config, mesh=None) -> None:
  """Every setting the loop reads, checked before anything is built, compiled or written; with the mesh
  also the batch's divisibility over its devices. Raises ValueError naming the field and value."""
  validate_config(config)
  if mesh is not None:
    n = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    hosts = parallel.process_count(mesh.devices.flat)
    if config.batch_size % n or config.batch_size % hosts:
      raise ValueError(f"batch_size={config.batch_size} does not split evenly over the {n} devices of the batch "
                       f"axes ({dict(mesh.shape)}) and {hosts} process(es): use a multiple of {n}")


# Model fields that may change between a checkpoint and the run resuming from it: how the same math runs
# (not `scan`, which stacks the blocks' parameters).
RESUMABLE_MODEL_FIELDS = tuple(f for f in EXECUTION_FIELDS if f != "scan")

# config.json keys of runs written before config.model held constructor fields only, and their names now.
_RENAMED_KEYS = {"config.model.ema_decay": "config.quantizer.ema_decay",
                 "config.model.kmeans_init": "config.quantizer.kmeans_init",
                 "config.model.dead_code_restart_steps": "config.quantizer.dead_code_restart_steps"}


def check_resume_config(workdir: str, run_info: dict) -> None:
  """Compares this run with WORKDIR/config.json before resuming. A different task or model (any
  `config.model` field but the execution ones, or the stored architecture) is refused with the fields
  that differ; other changes (schedule, logging, data) are allowed and listed."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): cannot check this run against the one that wrote the "
                     "checkpoints") from None
  new = json.loads(json.dumps(run_info, sort_keys=True, default=str))
  diffs = _diff(_upgrade(_flat(old)), _flat(new))
  model = [d for d in diffs if _is_model_field(d[0])]
  if model:
    raise ValueError(f"{workdir} holds checkpoints of a different model; fields that differ from its config.json: "
                     + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in model[:10])
                     + " (use a new --workdir, or the settings of that run)")
  others = [d for d in diffs if d[0].startswith("config.")]
  if others and jax.process_index() == 0:
    print("resuming with changed settings: " + "; ".join(f"{k[len('config.'):]}: {a!r} -> {b!r}"
                                                          for k, a, b in others), flush=True)


def _upgrade(old: dict) -> dict:
  """A flat config.json of an earlier layout in today's names (_RENAMED_KEYS; `use_cls` became `final_norm`,
  and a tokenizer's config.model lost `scan` and `remat`, which it never used; `add_norm`, `residual_dtype`
  and `patch_embed` came with their defaults "xla", "float32" and "conv"), so that its runs resume."""
  out = {_RENAMED_KEYS.get(k, k): v for k, v in old.items()}
  for key in [k for k in out if k.endswith("model.attention")]:  # written before the later execution fields
    prefix = key[:-len("attention")]  # config.model. or a nested config.tokenizer.model.
    out.setdefault(prefix + "add_norm", "xla")
    out.setdefault(prefix + "residual_dtype", "float32")
    out.setdefault(prefix + "patch_embed", "conv")
  if "config.model.use_cls" in out:
    out["config.model.final_norm"] = "norm" if out.pop("config.model.use_cls") else "fc_norm"
  if out.get("task") == "tokenizer" and out.get("config.model.scan") is False:
    out.pop("config.model.scan"); out.pop("config.model.remat", None)
  return out


def _is_model_field(key: str) -> bool:
  """`task`, the stored architecture (`kind`, `model.*`) and `config.model.*` but the execution fields."""
  parts = key.split(".")
  if key in ("task", "kind", "config.task") or parts[0] == "model":
    return True
  return parts[:2] == ["config", "model"] and len(parts) > 2 and parts[2] not in RESUMABLE_MODEL_FIELDS


def _flat(d, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


_MISSING = "<unset>"


def _diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
  return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
          if a.get(k, _MISSING) != b.get(k, _MISSING)]
