"""Entry point: python -m beitv2_jax.main --config=configs/<recipe>.py[:arg] --workdir=DIR [--config.x=y]

Dispatches on config.task: tokenizer | pretrain | finetune | linprobe | knn | robust | demo. The same --workdir
resumes a run from its last checkpoint with no other flag.
Exit status: 0 when the run finished (or was preempted and saved), 1 when it failed (one line naming the
file, field or value), 2 for bad flags or a bad config file.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from beitv2_jax.errors import one_line, parse_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl, TensorBoard events and pictures go.")

USER_ERRORS = (ValueError, OSError, KeyError, TypeError, ImportError)


def run(config, workdir: str):
  """Runs one config in-process (used by main and by the tests). Returns the task's result dict."""
  from beitv2_jax import parallel, tasks
  from beitv2_jax.config_defaults import validate
  validate(config)  # before any task is built: a bad value never costs a compile or touches the workdir
  d = config.distributed
  parallel.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  if config.task in tasks.RUNS:
    return tasks.run_function(config.task)(config, workdir)
  from beitv2_jax.train import loop
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  loop.validate(config, mesh)  # the batch against the mesh, before the task builds anything
  config = tasks.train_tokenizer_stage(config, workdir, mesh)  # pretraining without a tokenizer: train one
  task = tasks.task_class(config.task)(config, workdir, mesh)
  state, metrics = loop.run(task)
  return metrics


def main(argv):
  del argv
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:  # orbax and grain are chatty at INFO
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None:
      sys.exit("error: --config is required, e.g. --config=configs/demo.py")
    if not workdir:
      workdir = os.path.join("workdirs", config.task)
      print(f"no --workdir given: using {workdir}", flush=True)
    run(config, workdir)
  except USER_ERRORS as e:
    sys.exit(f"error: {type(e).__name__}: {one_line(e)}")
  except Exception as e:  # NonFiniteError and friends: one clear line, then non-zero exit
    from beitv2_jax.checkpoint import NoRestorableCheckpointError, WorkdirLockedError
    from beitv2_jax.train.loop import NonFiniteError
    if isinstance(e, (NonFiniteError, NoRestorableCheckpointError, WorkdirLockedError)):
      sys.exit(f"error: {one_line(e)}")
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
