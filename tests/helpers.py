"""Small, fast configs for the tests (real code paths, tiny sizes)."""
import os

import jax
import numpy as np

from beitv2_jax.config_defaults import load_config_file, set_dotted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.environ.get("BEITV2_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


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
