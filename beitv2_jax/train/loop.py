"""The training loop every task shares: sharded init, resume, the jitted step, logging, NaN guard,
checkpoints, SIGTERM, evaluation. A task supplies the model-specific pieces (see `Task`).

Reads top to bottom: mesh -> input -> sharded init or restore -> compiled step -> loop
(step, log, guard, evaluate, checkpoint, preemption) -> final save.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import numpy as np

from beitv2_jax import checkpoint, parallel
from beitv2_jax.data import pipeline, sources
from beitv2_jax.train.writer import MetricWriter

# Dense bf16 peak FLOP/s per device (DESIGN.md), matched against jax's device_kind.
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12),
              ("v5e", 197e12), ("v4", 275e12), ("A100", 312e12))


def device_peak_flops() -> Optional[float]:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


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
  """What a task provides to the loop. Subclasses set these in __init__ and implement the methods."""
  name: str = "task"
  flops_per_example: float = 0.0  # model FLOPs of one training example (fwd + bwd), for MFU

  def __init__(self, config, workdir: str, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.train_source = sources.make_source(config.data.name, config.data.train_split)
    n = len(self.train_source)
    if n < config.batch_size:
      logging.warning("the training set (%d) is smaller than one batch (%d)", n, config.batch_size)
    self.steps_per_epoch = max(1, n // config.batch_size)
    self.total_steps = int(config.total_steps) if config.total_steps > 0 else int(
        round(config.epochs * self.steps_per_epoch))
    ws = config.get("warmup_steps", -1)
    self.warmup_steps = int(ws) if ws >= 0 else int(round(config.warmup_epochs * self.steps_per_epoch))

  # --- to implement -------------------------------------------------------------------------------
  def train_transform(self) -> Callable:
    raise NotImplementedError

  def init_state(self, rng: jax.Array) -> TrainState:
    raise NotImplementedError

  def train_step(self, state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
    raise NotImplementedError

  def first_step(self, state: TrainState) -> Optional[Callable]:
    """A step function (train_step's signature) for the first step of this run when `state` needs a
    different one (the tokenizer's k-means codebook init), else None. Compiled and used once."""
    return None

  def evaluate(self, state: TrainState) -> dict:
    return {}

  def model_info(self) -> dict:
    """What `beitv2_jax.load` needs to rebuild the model: {'kind': ..., 'model': {...}}."""
    return {}

  def state_rules(self):
    return ()

  # Frozen inputs of the step that are not checkpointed with the run (the VQ-KD teacher, the tokenizer
  # that gives MIM targets): passed to train_step as a third argument, never donated.
  frozen: Any = None

  # --- shared helpers -----------------------------------------------------------------------------
  def apply_gradients(self, state: TrainState, grads) -> tuple[Any, Any, dict]:
    """One optimizer update: (new params, new optimizer state, {grad_norm, lr})."""
    import optax
    updates, opt_state = self.tx(state.params).update(grads, state.opt_state, state.params)
    return (optax.apply_updates(state.params, updates), opt_state,
            {"grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step)})

  def eval_batches(self, transform: Callable):
    """Global batches of the held-out split (`data.eval_split`; none when it is empty), each example once
    (padding rows have valid=0)."""
    c = self.config
    split = c.data.get("eval_split", "")
    if not split:
      return
    source = sources.make_source(c.data.name, split)
    for local in pipeline.eval_batches(source, transform, c.batch_size, seed=c.seed):
      local.pop("bad", None)
      yield parallel.to_global(local, self.mesh)

  def replicated_frozen(self):
    return jax.device_put(self.frozen, parallel.replicated(self.mesh))

  def train_data(self):
    c = self.config
    return pipeline.train_dataset(self.train_source, self.train_transform(), c.batch_size, c.seed,
                                  num_workers=c.data.num_workers, read_threads=c.data.get("read_threads", 4))


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


def run(task: Task) -> tuple[TrainState, dict]:
  """Trains `task` to task.total_steps, resuming from task.workdir if it holds a checkpoint. Returns the
  final state and the last logged metrics merged with the last evaluation."""
  config, workdir, mesh = task.config, task.workdir, task.mesh
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # ---- Input: host pipeline -> batches already on the devices (what checkpoints record) -----------
  data_iter = pipeline.DevicePrefetch(iter(task.train_data()), lambda local: parallel.to_global(local, mesh),
                                      depth=config.data.get("device_prefetch", 2))

  # ---- Sharded init or restore -------------------------------------------------------------------
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings = parallel.state_shardings(abstract, mesh, task.state_rules())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.get("keep_checkpoints", 3),
                                 keep_every=config.get("keep_every_steps", 0))
  start = ckpt.latest_step()
  if start is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = ckpt.restore(start, target, data_iter)
    logging.info("resumed from %s at step %d", workdir, start)
    if is_main:
      print(f"[{task.name}] resumed from step {start}", flush=True)
  else:
    start = 0
    state = jax.jit(task.init_state, out_shardings=shardings)(rng)
  checkpoint.write_json(os.path.join(workdir, "config.json"),
                        {"task": task.name, "config": config.to_dict(), **task.model_info()})

  # ---- Compiled step -----------------------------------------------------------------------------
  frozen = jax.device_put(task.frozen, parallel.state_shardings(task.frozen, mesh, task.state_rules()))
  step_fn = jit_step(task.train_step, shardings, mesh)
  first = task.first_step(state)
  first_fn = jit_step(first, shardings, mesh) if first is not None else None

  writer = MetricWriter(workdir, wandb_config=dict(config.get("wandb", {}), run_config=config.to_dict()))
  preempted = _install_sigterm()
  peak = device_peak_flops()
  total = task.total_steps
  log_every, ckpt_every = config.log_every_steps, config.checkpoint_every_steps
  eval_every = config.get("eval_every_steps", 0)
  stop_after = config.get("stop_after_steps", 0)  # > 0: save and exit at this step (time-limited jobs)
  last_metrics: dict = {}
  pending: list = []
  last_good_step = start
  t_last, steps_since = time.perf_counter(), 0
  bad_images = 0

  def check_finite(metrics: dict, step: int):
    for key in ("loss", "grad_norm"):
      if key in metrics and not np.isfinite(metrics[key]):
        raise NonFiniteError(
            f"{key} is {metrics[key]} at step {step} (last finite check at step {last_good_step}); "
            f"stopped without saving. The last good checkpoint is step {ckpt.latest_step()} in {workdir}.")

  step = start
  try:
    for step in range(start + 1, total + 1):
      batch, bad = next(data_iter)
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
        last_good_step = step
        pending = []
      if is_log:
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        m = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1]}
        # interval-style metrics (codebook usage) are only meaningful at the interval end
        m.update({k: float(fetched[-1][k]) for k in fetched[-1] if k.startswith(("codebook_", "perplexity"))})
        img_s = steps_since * config.batch_size / dt
        m.update(img_per_sec=img_s, img_per_sec_per_device=img_s / jax.device_count(),
                 step_time_s=dt / steps_since, bad_images=bad_images, epoch=step / task.steps_per_epoch)
        if peak and task.flops_per_example:
          m["mfu"] = task.flops_per_example * img_s / (peak * jax.device_count())
        writer.write(step, m)
        last_metrics = m
        if is_main:
          eta = (total - step) * dt / steps_since
          shown = " | ".join(f"{k} {m[k]:.4g}" for k in ("loss", "lr", "grad_norm", "codebook_usage",
                                                          "mlm_acc_1", "mfu") if k in m)
          print(f"[{task.name}] step {step}/{total} | {shown} | {img_s:.1f} img/s | ETA {_fmt_eta(eta)}",
                flush=True)
        t_last, steps_since = time.perf_counter(), 0

      # ---- Evaluate -------------------------------------------------------------------------------
      if eval_every and (step % eval_every == 0) and step != total:
        ev = task.evaluate(state)
        if ev:
          writer.write(step, ev)
          last_metrics.update(ev)
        t_last = time.perf_counter()

      # ---- Checkpoint / preemption ----------------------------------------------------------------
      if is_ckpt:
        ckpt.save(step, state, data_iter)
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
