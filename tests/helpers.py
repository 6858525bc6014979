"""Small, fast configs for the tests (real code paths, tiny sizes)."""
import os

import jax
import numpy as np

from beitv2_jax.config_defaults import load_config_file, set_dotted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def tokenizer_config(steps=8, batch=16, **kw):
  c = load_config("tokenizer_tiny")
  c.data.name = "digits"
  c.data.train_split = "train"
  c.model.codebook_size = 64
  return _short_run(c, steps, batch, kw)


def pretrain_config(tokenizer_path, steps=8, batch=16, **kw):
  c = load_config("pretrain_tiny")
  c.tokenizer_path = str(tokenizer_path)
  c.data.name = "digits"
  c.data.eval_split = ""
  return _short_run(c, steps, batch, kw)


def finetune_config(steps=8, batch=16, init_from="", **kw):
  """Fine-tuning on digits with the recipe's whole augmentation (RandAugment, mixup / cutmix, erasing)."""
  c = load_config("finetune_tiny")
  c.data.name, c.data.eval_split, c.init_from = "digits", "", init_from
  return _short_run(c, steps, batch, kw)


def linprobe_config(steps=8, batch=16, init_from="", **kw):
  c = load_config("linprobe_tiny")
  c.data.name, c.data.eval_split, c.init_from = "digits", "", init_from
  return _short_run(c, steps, batch, kw)


def _short_run(c, steps, batch, overrides):
  """A few steps, logged and checkpointed often, read in the main thread; then `overrides` (dotted keys)."""
  c.batch_size = batch
  c.total_steps = steps
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.data.read_threads = 0
  for k, v in overrides.items():
    set_dotted(c, k, v)
  return c


def params_of(workdir, step=None):
  from beitv2_jax import checkpoint
  _, state = checkpoint.restore_state_tree(os.path.join(workdir, "checkpoints"), step)
  return state


def assert_trees_equal(a, b, atol=0.0):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if atol == 0:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def assert_resume_is_bit_identical(config, tmp_path, stop_after=6):
  """`config` run in one go == the same run stopped at `stop_after` (past a log step and a checkpoint: with
  _short_run's 2 and 4, steps 2 and 4) and resumed to the end on the same devices: the whole train state
  (params, optimizer, rng, extra) and every logged metric but the timings bit-identical."""
  import copy
  from beitv2_jax import main as entry
  from beitv2_jax.train.writer import read_metrics
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  entry.run(copy.deepcopy(config), full)
  stopped = copy.deepcopy(config)
  stopped.stop_after_steps = stop_after
  assert entry.run(stopped, split).get("preempted_at") == stop_after
  assert int(params_of(split)["step"]) == stop_after
  entry.run(copy.deepcopy(config), split)
  a, b = params_of(full), params_of(split)
  assert int(a["step"]) == int(b["step"]) == config.total_steps
  assert_trees_equal(a, b)
  timing = ("img_per_sec", "step_time", "mfu", "data_wait")
  logged = lambda wd: [{k: v for k, v in m.items() if not k.startswith(timing)} for m in read_metrics(wd) if "loss" in m]
  assert logged(full) == logged(split) and len(logged(full)) >= config.total_steps // config.log_every_steps


def assert_meshes_agree(task, batches, init, fsdp_min_size, atol=2e-5, check_extra=False, data_mesh=True):
  """`task`'s jitted step over `batches` from `init` on 1 device, on an 8-device data mesh (unless not
  `data_mesh`) and on a 2 x 4 data x fsdp mesh: the same losses and parameters (and with check_extra the
  state's `extra`, e.g. BatchNorm statistics) to `atol`; the parameters really moved (the learning rate is
  > 0 from step 0); under fsdp every parameter and optimizer leaf of >= `fsdp_min_size` elements is split
  over `fsdp`. The 2 x 4 mesh also splits the batch 8 ways (over data and fsdp)."""
  from beitv2_jax import parallel

  def run(mesh, min_fsdp_size=1 << 30):
    shard = parallel.state_shardings(init, mesh, min_fsdp_size=min_fsdp_size)
    step = jax.jit(task.train_step, in_shardings=(shard, parallel.batch_sharding(mesh), None),
                   out_shardings=(shard, parallel.replicated(mesh)))
    state, losses = jax.device_put(init, shard), []
    for b in batches:
      state, m = step(state, parallel.to_global(b, mesh), task.frozen)
      losses.append(float(m["loss"]))
    return state, losses

  s1, l1 = run(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(init.params)))
  assert moved > 1e-3, "the parameters did not move: the comparison would not test the update"
  sf, lf = run(parallel.make_mesh(2, 4), min_fsdp_size=fsdp_min_size)
  big = [x for x in jax.tree.leaves((sf.params, sf.opt_state)) if getattr(x, "size", 0) >= fsdp_min_size]
  assert big and all("fsdp" in tuple(x.sharding.spec) for x in big)
  runs = [(lf, sf)]
  if data_mesh:
    s8, l8 = run(parallel.make_mesh(8, 1))
    runs.append((l8, s8))
  for losses, state in runs:
    np.testing.assert_allclose(losses, l1, atol=atol)
    compared = (state.params, state.extra) if check_extra else state.params
    for a, b in zip(jax.tree.leaves(compared), jax.tree.leaves((s1.params, s1.extra) if check_extra else s1.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)
