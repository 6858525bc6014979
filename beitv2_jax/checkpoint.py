"""Orbax checkpoints: train state + grain iterator, saved together, atomically, asynchronously.

Layout of a workdir:
  WORKDIR/config.json          the run's config (and the model's architecture, for `beitv2_jax.load`)
  WORKDIR/checkpoints/<step>/  state/ (params, optimizer state, rng, step, codebook ...) + data/ (iterator)
Orbax writes each step to a temporary folder and renames it when complete, so a run killed at any
moment (SIGKILL included) resumes from the last complete step.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import grain
import numpy as np
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
    """abstract_state: ShapeDtypeStructs with shardings (keeps optax namedtuples and the layout)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_state_tree(directory: str, step: Optional[int] = None) -> tuple[int, dict]:
  """Reads the `state` item of a checkpoint as nested dicts of numpy arrays, on whatever topology wrote it
  (a TPU pod's checkpoint loads on one CPU): the target is built from the stored shapes, on one device."""
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = checkpointer.restore(path, target)
  checkpointer.close()
  return step, jax.tree.map(np.asarray, restored)


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (temp file + rename), so a crash never leaves half a config."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
