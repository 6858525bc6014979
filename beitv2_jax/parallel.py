"""Mesh, shardings and multi-host helpers.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallel too, but parameters and
optimizer state are sharded over it, ZeRO-3 style, so ViT-L/H fit without model edits). The batch is
split over both axes. Going from DP to FSDP is a config change: `--config.mesh.fsdp=8`.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Calls jax.distributed.initialize() when this is one of several processes.

  Explicit arguments (tests, custom clusters) win; otherwise JAX auto-detects TPU pods, SLURM and
  Open MPI, and `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` env vars. A plain
  local run initialises nothing.
  """
  if coordinator_address:
    # CPU processes need gloo for cross-process collectives (harmless where an accelerator does the work).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS") or _on_tpu_pod() or "SLURM_NTASKS" in os.environ:
    jax.distributed.initialize()
  else:
    return
  logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _on_tpu_pod() -> bool:
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: all of this run's, jax.devices()). beitv2_jax.aot passes
  the devices of a TPU topology it compiles for."""
  devices = list(jax.devices() if devices is None else devices)
  n, processes = len(devices), process_count(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({n})")
  if data == -1:
    data = n // fsdp
  if data < 1 or data * fsdp > n or (data * fsdp < n and processes > 1):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not fit the {n} devices")
  # Fewer than all devices (single process only): the first data*fsdp, e.g. mesh.data=1 to debug on one.
  return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def process_count(devices: Sequence[Any]) -> int:
  """How many hosts (processes) the devices belong to."""
  return len({d.process_index for d in devices})


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                    min_fsdp_size: int = 1 << 16) -> Any:
  """A NamedSharding for every leaf of a (train-state) pytree.

  rules: (regex on the 'a/b/c' path, PartitionSpec) pairs, first match wins. Without a matching rule,
  a leaf of at least `min_fsdp_size` elements is sharded over `fsdp` along its largest divisible dim
  (optimizer moments share their parameter's shape and so its sharding); everything else is replicated.
  """
  fsdp = mesh.shape["fsdp"]

  def spec_for(path, leaf):
    name = _path_str(path)
    for pattern, spec in rules:
      if re.search(pattern, name):
        return NamedSharding(mesh, spec)
    shape = getattr(leaf, "shape", ())
    if fsdp > 1 and int(np.prod(shape or (1,))) >= min_fsdp_size:
      for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp == 0:
          axes = [None] * len(shape)
          axes[dim] = "fsdp"
          return NamedSharding(mesh, P(*axes))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec_for, abstract_state)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of the global batch (numpy) -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process (a tiny collective; free on one process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
