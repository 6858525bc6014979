"""Orbax checkpoints: train state + grain iterator, saved together, atomically, asynchronously.

Layout of a workdir:
  WORKDIR/config.json          the run's config (and the model's architecture, for `beitv2_jax.load`)
  WORKDIR/checkpoints/<step>/  state/ (params, optimizer state, rng, step, codebook ...) + data/ (iterator)
  WORKDIR/run.lock             host and pid of the run using the workdir (one run per workdir)
  WORKDIR/rejected_checkpoints/<step>/  checkpoints set aside, never deleted: ones that did not restore
                               (corrupt) and ones whose next step was not finite (NaN guard)
Orbax writes each step to a temporary folder and renames it when complete, so a run killed at any
moment (SIGKILL included) resumes from the last complete step; a complete checkpoint that does not
restore is set aside and the next older one is tried.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Optional

import grain
import numpy as np
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # no public name in orbax 0.12


# Orbax saves a replicated array by slicing it across its replicas, one eager `slice` compiled per
# (shape, device): ~0.05 s each, seconds per run on a tiny model, for arrays that take microseconds to write.
# Replica-parallel saving is kept for slices of 1 MiB and more, where spreading the transfer pays.
_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
        array_metadata_store=array_metadata_store.Store()),  # as orbax's default handler has
    override=True)


class NoRestorableCheckpointError(RuntimeError):
  """Checkpoints exist, but none of them restores."""


class Checkpointer:
  """Saves and restores `state` (the train state), `data` (the grain iterator) and `meta` (a small JSON
  dict: counters that belong with the step, such as the bad-image count)."""

  def __init__(self, directory: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
    if int(keep) < 1:  # orbax would delete every checkpoint it writes
      raise ValueError(f"keep_checkpoints={keep}: must be >= 1 (the last N checkpoints are kept)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter=None, meta: Optional[dict] = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter=None, with_meta: bool = False):
    """abstract_state: ShapeDtypeStructs with shardings (keeps optax namedtuples and the layout).
    Returns the state, or (state, meta dict) with with_meta (meta is {} for checkpoints without one)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    has_meta = os.path.isdir(os.path.join(self.directory, str(step), "meta"))
    if with_meta and has_meta:
      items["meta"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not with_meta:
      return out["state"]
    return out["state"], (dict(out["meta"]) if has_meta else {})

  def restore_latest(self, abstract_state: Any, data_iter=None) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none. A
    checkpoint that fails (a truncated file, an empty _METADATA) is logged with its reason and set aside
    under ../rejected_checkpoints/<step>; the next older one is tried. Raises NoRestorableCheckpointError,
    one line naming the folder and each reason, when none restores (nothing is set aside then: the cause
    is more likely the run's settings than the files)."""
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state, data_iter, with_meta=True)
      except Exception as e:  # orbax, tensorstore, JSON: whatever a damaged folder raises
        failures.append((step, f"{type(e).__name__}: {_first_line(e)}"))
        logging.warning("checkpoint %d in %s does not restore (%s); trying an older one", step, self.directory,
                        failures[-1][1])
        continue
      for bad, why in failures:
        moved = self.set_aside(bad)
        print(f"warning: checkpoint {bad} did not restore ({why}); set aside in {moved}", flush=True)
      return step, state, meta
    if failures:
      reasons = "; ".join(f"step {s}: {why}" for s, why in failures)
      raise NoRestorableCheckpointError(f"no checkpoint in {self.directory} restores ({reasons})")
    return None

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to WORKDIR/rejected_checkpoints/<step> (never deletes it); returns where."""
    self.manager.wait_until_finished()
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), "rejected_checkpoints")
    dst = os.path.join(dst_root, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(dst_root, exist_ok=True)
      if os.path.exists(dst):
        dst = f"{dst}.{int(time.time())}"
      shutil.move(src, dst)
    self.manager.reload()
    return dst

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


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


# ------------------------------------------------------------------------------------------------
# One run per workdir
# ------------------------------------------------------------------------------------------------
class WorkdirLockedError(RuntimeError):
  pass


_HELD: set = set()  # lock files this process holds (a second run in the same process is refused too)


def acquire_lock(workdir: str) -> Optional[str]:
  """Takes WORKDIR/run.lock ({host, pid, time}) for this run, or raises WorkdirLockedError naming the
  run that holds it. A lock left by a process that is gone (same host, pid not running) is taken over
  with a warning. Only process 0 of a multi-host run takes it. Returns the lock path (None elsewhere)."""
  if jax.process_index() != 0:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), "run.lock")
  me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
  # written whole to a temporary file, then linked into place: the link fails if the lock exists, and a
  # reader never sees a half-written lock
  tmp = f"{path}.{me['host']}.{me['pid']}"
  with open(tmp, "w") as f:
    json.dump(me, f)
  try:
    return _link_lock(tmp, path, workdir)
  finally:
    os.remove(tmp)


def _link_lock(tmp: str, path: str, workdir: str) -> str:
  for _ in range(2):
    try:
      os.link(tmp, path)
    except FileExistsError:
      holder = _read_lock(path)
      if path in _HELD or _alive(holder):
        raise WorkdirLockedError(
            f"{workdir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, since "
            f"{holder.get('time')}): use another --workdir, or delete {path} if that run is gone") from None
      print(f"warning: taking over the stale lock {path} (host {holder.get('host')}, pid {holder.get('pid')} "
            "is not running)", flush=True)
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
      continue
    _HELD.add(path)
    return path
  raise WorkdirLockedError(f"could not take {path}: another run took it at the same moment")


def release_lock(path: Optional[str]) -> None:
  if path is None:
    return
  _HELD.discard(path)
  try:
    if _read_lock(path).get("pid") == os.getpid():
      os.remove(path)
  except FileNotFoundError:
    pass


def _read_lock(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # empty or half-written: treated as stale unless it is ours


def _alive(holder: dict) -> bool:
  """False only when we can tell the holder is gone: same host and no such pid."""
  if not holder or "pid" not in holder:
    return False
  if holder.get("host") != socket.gethostname():
    return True  # another machine's process: cannot check, so assume it runs
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
