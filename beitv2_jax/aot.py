"""Will this run fit and compile on that slice? Answered before renting it: the real training step compiled
for a Cloud TPU slice or an NVIDIA GPU on a machine without one (deviceless ahead-of-time compilation).

  python -m beitv2_jax.aot --config=configs/pretrain_base.py:epochs=1600 --target=tpu:v4-32
  python -m beitv2_jax.aot --config=configs/pretrain_large.py --target=tpu:v4-64 --config.mesh.fsdp=8
  python -m beitv2_jax.aot --config=configs/finetune_base.py --target=tpu:v5e-64 --max_batch
  python -m beitv2_jax.aot --config=configs/pretrain_base.py --target=gpu:h100 --config.batch_size=256 --top=20

It builds the task as `beitv2_jax.main` does and compiles the step the loop runs: the same `jit_step`,
state, frozen-input and batch shardings, donation and (data, fsdp) mesh, over the slice's devices (all its
hosts: the multi-host SPMD program). It prints whether it compiled, the bytes per chip (arguments, outputs,
temporaries, code, prefetched batches) against the chip's memory, XLA's FLOPs per step against the model
count, the compile time, and a roofline lower bound on the step time with the MFU it allows
(beitv2_jax/roofline.py: peak bf16 FLOP/s and HBM bandwidth per device, with their sources). A run that
does not fit is a result: the tool tries FSDP factors, then full remat, and names the first that fits.
With --max_batch it also finds the largest per-chip batch that fits, without and with remat.

Compiling needs shapes only, so what a training run would read from disk is stood in for, and said so:
the dataset by `synthetic:<its size>` (ImageNet-1k's 1,281,167 when it cannot be opened here), a tokenizer
or teacher not on this machine by an untrained one of the same architecture (configs/tokenizer_base.py's
for the MIM recipes), an `init_from` not on this machine by the recipe's random init.

TPU targets need libtpu, the TPU compiler (`pip install "jax[tpu]==<jax version>"`; the test install
brings it); GPU targets the CUDA plugin (`pip install "jax[cuda12]==<jax version>"`). Exit status: 0 it
compiles and fits, 3 it compiles but does not fit, 1 it does not compile, 2 bad flags or target.
Measured tables for every recipe: benchmarks/RESULTS.md ("Cloud TPU slices").
"""
from __future__ import annotations

import os

# The compiler for the target registers beside the CPU backend, which traces and builds the task.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
# Without a GPU to time candidates, Triton GEMM tilings cannot be autotuned and can fail: cuBLAS instead.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
# libtpu looks for a TPU VM's metadata at start; there is none here.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compiling touches no chip: several such processes (a test beside a table run) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from beitv2_jax import parallel, roofline  # noqa: E402
from beitv2_jax.config_defaults import load_config_file  # noqa: E402
from beitv2_jax.errors import one_line, parse_flags  # noqa: E402

GiB = 2**30
IMAGENET_TRAIN_SIZE = 1281167

# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------
# Slice name -> topology. v4 and v5p slices are named by TensorCores (two per chip, run as one device:
# megacore), v5e and v6e by chips. Shapes as Google Cloud lists them for each generation.
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
       512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_GENERATIONS = {"v4": (2, _3D), "v5p": (2, _3D), "v5e": (1, _2D), "v6e": (1, _2D)}
GPU_TARGETS = {"h100": ("NVIDIA H100 80GB HBM3", 80 * GiB), "h200": ("NVIDIA H200", 141 * 10**9)}


@dataclasses.dataclass
class Target:
  name: str            # as given: tpu:v4-32, tpu:v4:2x2x4, gpu:h100
  description: str     # what it is, for the report
  devices: list        # compile-only devices, all hosts
  device_kind: str
  hosts: int
  memory_bytes: int    # per device: what the compiler lets a program use (TPU), else the device's memory


def target(name: str) -> Target:
  """tpu:<generation>-<size> (v4-32, v5p-64, v5e-256, v6e-64), tpu:<libtpu topology> (v4:2x2x4), or
  gpu:h100 / gpu:h200. An unknown name raises ValueError listing the ones that work."""
  kind, _, rest = name.partition(":")
  if kind == "gpu" and rest in GPU_TARGETS:
    return _gpu_target(name, rest)
  if kind == "tpu":
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", rest)
    if m and int(m.group(2)) % TPU_GENERATIONS[m.group(1)][0] == 0:
      per_chip, shapes = TPU_GENERATIONS[m.group(1)]
      chips = int(m.group(2)) // per_chip
      if chips in shapes:
        return _tpu_target(name, m.group(1), shapes[chips])
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", rest)
    if m:
      return _tpu_target(name, m.group(1), m.group(2))
  slices = "; ".join(f"{g}-" + "/".join(str(n * per_chip) for n in shapes)
                     for g, (per_chip, shapes) in TPU_GENERATIONS.items())
  raise ValueError(f"unknown target {name!r}: use gpu:h100, gpu:h200, tpu:<slice> ({slices}; e.g. tpu:v4-32) or "
                   "tpu:<libtpu topology> (e.g. tpu:v4:2x2x4)")


def _tpu_target(name: str, generation: str, shape: str) -> Target:
  if importlib.util.find_spec("libtpu") is None:
    raise ModuleNotFoundError(f'compiling for a TPU needs libtpu, the TPU compiler: pip install "jax[tpu]=='
                              f'{jax.__version__}"')
  from jax.experimental import topologies
  libtpu_name = {"v5e": "v5e", "v6e": "v6e", "v5p": "v5p", "v4": "v4"}[generation]
  kwargs = {"chip_config_name": "megacore"} if generation == "v4" else {}
  dims = [int(d) for d in shape.split("x")]
  if len(dims) == 2 and np.prod(dims) <= 8:  # v5e / v6e slices of up to 8 chips are one host; larger, 4 per host
    kwargs["chips_per_host_bounds"] = (*dims, 1)
  try:
    with _quiet_stderr():
      topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{libtpu_name}:{shape}", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message says which part of the name it refused
    raise ValueError(f"libtpu cannot make topology {libtpu_name}:{shape} for {name}: {one_line(e)}") from None
  devices = list(topology.devices)
  per_chip = TPU_GENERATIONS[generation][0]
  hosts = parallel.process_count(devices)
  plural = lambda n, word: f"{n} {word}{'s' if n > 1 else ''}"
  return Target(name, f"{generation} {shape} ({plural(len(devices), 'chip')}, "
                f"{plural(len(devices) * per_chip, 'TensorCore')}{', megacore' if per_chip == 2 else ''}; "
                f"{plural(hosts, 'host')})",
                devices, devices[0].device_kind, hosts, available_hbm(devices[0]))


_OUT_OF_MEMORY = (re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
                  re.compile(r"required for [\w ]+ \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"))


def out_of_memory(message: str) -> Optional[tuple[int, int]]:
  """(bytes needed, bytes available) from the TPU compiler's out-of-memory error, else None."""
  for pattern in _OUT_OF_MEMORY:
    m = pattern.search(message)
    if m:
      return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  return None


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * 1024 ** ("KMGT".index(unit) + 1))


def available_hbm(device) -> int:
  """The HBM a program may use on this TPU device, as its compiler counts it (less than the chip's memory:
  the runtime keeps some), read from the compiler's refusal of a program that cannot fit."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  huge = jax.ShapeDtypeStruct((2**36,), np.float32, sharding=NamedSharding(Mesh(np.asarray([device]), ("x",)),
                                                                          PartitionSpec()))
  try:
    with _quiet_stderr():
      jax.jit(lambda a: a * 2 + 1).lower(huge).compile()
  except Exception as e:  # noqa: BLE001 - the refusal is the reading
    found = out_of_memory(str(e))
    if found:
      return found[1]
  return roofline.hbm_bytes(device.device_kind) or 0


# XLA's GPU target description (stream_executor GpuTargetConfigProto), what the GPU would report itself.
_GPU_DEVICE_INFO = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


def _gpu_target(name: str, gpu: str) -> Target:
  from jax.experimental import topologies
  kind, memory = GPU_TARGETS[gpu]
  machine = roofline.machine_for(kind)
  config = _GPU_DEVICE_INFO.format(bandwidth=int(machine.hbm_tbps * 1e12), memory=int(memory), name=kind)
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
  except Exception as e:  # noqa: BLE001 - the plugin's own error says little
    raise ModuleNotFoundError(f"cannot compile for a GPU here ({one_line(e)[:200]}): install the compiler with "
                              f'pip install "jax[cuda12]=={jax.__version__}"') from None
  return Target(name, f"one {kind}", list(topology.devices), kind, 1, memory)


@contextlib.contextmanager
def _quiet_stderr():
  """libtpu prints start-up warnings about the missing TPU VM to fd 2; they say nothing about the compile."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


# ------------------------------------------------------------------------------------------------
# The task, with stand-ins for what only a training run reads
# ------------------------------------------------------------------------------------------------
def stand_ins(config, config_dir: str) -> list[str]:
  """Replaces, in place, what compiling does not need and this machine may not have (datasets, weights) by
  something of the same shapes. Returns one line per replacement."""
  from beitv2_jax.data import seg_sources, sources
  from beitv2_jax.models.teacher import TEACHER_ARCHITECTURES
  notes = []
  name = config.data.name
  segment = config.task == "segment"
  if not name.startswith("synthetic"):
    try:
      source = (seg_sources.make_seg_source if segment else sources.make_source)(name, config.data.train_split)
      n, why = len(source), f"its {len(source)} images"
      if segment and not config.num_classes:  # the stand-in's labels stay in the real set's classes
        config.num_classes = source.num_classes
    except Exception:  # noqa: BLE001 - anything that stops reading it here: the size only sets the schedule
      n, why = ((seg_sources.ADE20K_TRAIN_SIZE, "ADE20K's train size") if segment else
                (IMAGENET_TRAIN_SIZE, "ImageNet-1k's train size"))
      why += ": the dataset cannot be opened here"
    config.data.name = f"synthetic:{n}" + (f":{config.num_classes or seg_sources.ADE20K_CLASSES}" if segment else "")
    notes.append(f"data {name} -> {config.data.name} ({why})")
  task = config.task
  if task == "pretrain" and not os.path.exists(config.tokenizer_path):
    was = config.tokenizer_path or "(none)"
    if config.tokenizer is None:
      config.tokenizer = load_config_file(os.path.join(config_dir, "tokenizer_base.py"))
      arch = "configs/tokenizer_base.py's"
    else:
      arch = "config.tokenizer's"
    config.tokenizer_path = "random"
    notes.append(f"tokenizer {was} -> an untrained VQ-KD of {arch} architecture")
  if task == "tokenizer" and config.teacher != "random" and not os.path.isdir(config.teacher):
    arch = TEACHER_ARCHITECTURES.get(config.teacher)
    if arch is None:
      raise ValueError(f"teacher {config.teacher!r} is not on this machine and its architecture is not known here "
                       f"(known: {sorted(TEACHER_ARCHITECTURES)}): pass a local folder with its config.json")
    m = config.model
    if (arch["image_size"], arch["patch_size"]) != (m.img_size, m.patch_size):
      raise ValueError(f"teacher {config.teacher} takes {arch['image_size']} px / patch {arch['patch_size']}; "
                       f"the tokenizer {m.img_size} px / patch {m.patch_size}")
    config.random_teacher.update({k: v for k, v in arch.items() if k not in ("image_size", "patch_size")})
    notes.append(f"teacher {config.teacher} -> an untrained one of its architecture")
    config.teacher = "random"
  if task in ("finetune", "linprobe", "segment") and config.init_from and not os.path.exists(config.init_from):
    notes.append(f"init_from {config.init_from} -> the recipe's random init (same shapes)")
    config.init_from = ""
  return notes


def build_task(config, devices):
  """The task over a mesh of `devices` as main.run builds it, checked as the loop checks it."""
  from beitv2_jax.tasks import task_class
  from beitv2_jax.train import loop
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  loop.validate(config, mesh)
  return task_class(config.task)(config, tempfile.mkdtemp(prefix="beitv2_aot_"), mesh)


def batch_spec(task) -> dict:
  """The global batch's shapes and dtypes: one example through the task's real transform, stacked."""
  from beitv2_jax.data import pipeline
  source = task.train_source
  example = pipeline.ExampleFn(source, task.train_transform())(source[0], np.random.default_rng(0))
  example.pop("bad")
  sharding = parallel.batch_sharding(task.mesh)
  return {k: jax.ShapeDtypeStruct((task.config.batch_size,) + np.shape(v), np.asarray(v).dtype, sharding=sharding)
          for k, v in example.items()}


# ------------------------------------------------------------------------------------------------
# Compile and report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  compiled: bool
  error: str = ""
  needed_bytes: int = 0        # per device, what the step needs while it runs
  capacity_bytes: int = 0      # per device
  parts: dict = dataclasses.field(default_factory=dict)  # bytes per device by kind
  xla_flops: float = 0.0       # per device per step
  model_flops: float = 0.0     # per device per step
  compile_s: float = 0.0
  hlo_text: str = ""

  @property
  def fits(self) -> bool:
    return self.compiled and self.needed_bytes <= self.capacity_bytes


def compile_task(task, tgt: Target, keep_text: bool = False) -> Result:
  """Compiles the task's step(s) as the loop would for `tgt`; the largest memory of its programs (the
  first-step variant, e.g. the tokenizer's k-means, included)."""
  from beitv2_jax.models import attention as attention_lib
  from beitv2_jax.train import loop
  rng = jax.random.PRNGKey(task.config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings, frozen_shardings = loop.placement(task, abstract)
  place = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, sh)
  state, frozen, batch = place(abstract, shardings), place(task.frozen, frozen_shardings), batch_spec(task)
  capacity = tgt.memory_bytes
  initial = task.initial_step()
  steps = [task.train_step] + ([initial] if initial is not None else [])
  result = Result(compiled=True, capacity_bytes=capacity)
  n = len(tgt.devices)
  result.model_flops = task.flops_per_example * task.config.batch_size / n
  # "auto" attention resolves by the backend that traces: make it resolve as on the target (cuDNN for bf16
  # on an H100 / H200; the explicit form on TPUs, as on the CPU).
  on_gpu = tgt.name.startswith("gpu:")
  saved = attention_lib._cudnn_flash_device
  attention_lib._cudnn_flash_device = lambda: on_gpu
  try:
    for i, fn in enumerate(steps):
      t0 = time.perf_counter()
      try:
        with _quiet_stderr():
          compiled = loop.jit_step(fn, shardings, task.mesh).lower(state, batch, frozen).compile()
      except Exception as e:  # noqa: BLE001 - an out-of-memory or sharding error is the answer, not a crash
        result.compile_s += time.perf_counter() - t0
        oom = out_of_memory(str(e))
        if oom:  # the TPU compiler refuses a program that exceeds the chip's memory, and says by how much
          result.needed_bytes, result.capacity_bytes = max(result.needed_bytes, oom[0]), oom[1]
          result.error = f"out of memory: needs {oom[0] / GiB:.2f} GiB of {oom[1] / GiB:.2f} GiB"
        else:
          result.compiled, result.error = False, one_line(e)[:600]
        continue
      result.compile_s += time.perf_counter() - t0
      mem = compiled.memory_analysis()
      parts = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes - mem.alias_size_in_bytes,
                   temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes)
      needed = sum(parts.values())
      if needed >= result.needed_bytes:
        result.needed_bytes, result.parts = needed, parts
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # None from a deviceless GPU compile
      if i == 0:  # the train step (the others run once)
        result.xla_flops = float(cost.get("flops", 0.0))
        if keep_text:
          result.hlo_text = compiled.as_text()
  finally:
    attention_lib._cudnn_flash_device = saved
  # the batches the loop keeps in flight to the devices ahead of the step (data.device_prefetch)
  in_flight = task.config.data.device_prefetch * sum(
      int(np.prod(b.shape)) * np.dtype(b.dtype).itemsize for b in batch.values()) // n
  if result.parts:
    result.parts["prefetched batches"] = in_flight
    result.needed_bytes += in_flight
  return result


def try_config(config, config_dir: str, tgt: Target, keep_text: bool = False):
  """(task, result) for one config on the target; the config is copied, not changed."""
  config = config.copy_and_resolve_references()
  stand_ins(config, config_dir)
  task = build_task(config, tgt.devices)
  return task, compile_task(task, tgt, keep_text)


def fix_suggestions(config, config_dir: str, tgt: Target) -> list[tuple[str, Result]]:
  """For a config that does not fit: the first FSDP factor that fits, else full remat (with the largest
  FSDP factor tried). Each tried setting and its result."""
  tried = []
  chips = len(tgt.devices)
  factors = [f for f in (2, 4, 8, 16, 32, 64) if f > config.mesh.fsdp and chips % f == 0 and f <= chips]
  for f in factors:
    c = config.copy_and_resolve_references()
    c.mesh.fsdp, c.mesh.data = f, -1
    _, r = try_config(c, config_dir, tgt)
    tried.append((f"--config.mesh.fsdp={f}", r))
    if r.fits:
      return tried
  if _remat(config) != "full" and "remat" in config.model:
    c = config.copy_and_resolve_references()
    c.model.remat = "full"
    flag = "--config.model.remat=full"
    if factors:
      c.mesh.fsdp, c.mesh.data = factors[-1], -1
      flag += f" --config.mesh.fsdp={factors[-1]}"
    _, r = try_config(c, config_dir, tgt)
    tried.append((flag, r))
  return tried


def _remat(config) -> str:
  """The run's remat policy; a tokenizer has no `remat` field (its blocks never remat): "none"."""
  return config.model.remat if "remat" in config.model else "none"


def max_batch(config, config_dir: str, tgt: Target, first: Result, remat: str,
              max_compiles: int = 6) -> tuple[int, Optional[Result]]:
  """The largest per-chip batch (a multiple of 8) that fits with this remat policy, and its result: from
  the recipe's batch, doubled or halved until one fits and one does not, then narrowed by compiling where
  the line through the two predicts the limit (within the bracket). Returns what was compiled and fits,
  best found within `max_compiles` compiles ((0, None) if nothing fits)."""
  chips = len(tgt.devices)
  results: dict[int, Result] = {}

  def at(per_chip: int) -> Result:
    if per_chip not in results:
      c = config.copy_and_resolve_references()
      c.batch_size = per_chip * chips
      if "remat" in c.model:
        c.model.remat = remat
      try:
        results[per_chip] = try_config(c, config_dir, tgt)[1]
      except ValueError as e:  # a batch the recipe cannot split (mixup groups): not one it can run
        results[per_chip] = Result(compiled=False, error=one_line(e))
    return results[per_chip]

  b0 = max(8, config.batch_size // chips // 8 * 8)
  if remat == _remat(config) and config.batch_size == b0 * chips:
    results[b0] = first
  lo, hi = (b0, None) if at(b0).fits else (0, b0)
  while len(results) < max_compiles and (hi is None or (lo == 0 and hi > 8)):
    probe = 2 * lo if hi is None else max(8, hi // 2 // 8 * 8)
    if at(probe).fits:
      lo = probe
    else:
      hi = probe
  while hi is not None and lo and hi - lo > 8 and len(results) < max_compiles:
    need_lo, need_hi = results[lo].needed_bytes, results[hi].needed_bytes
    capacity = results[lo].capacity_bytes
    if need_hi > need_lo and capacity:
      guess = lo + (capacity - need_lo) * (hi - lo) / (need_hi - need_lo)
    else:
      guess = (lo + hi) / 2
    probe = min(max(int(guess) // 8 * 8, lo + 8), hi - 8)
    if at(probe).fits:
      lo = probe
    else:
      hi = probe
  return (lo, results[lo]) if lo else (0, None)


def report(config, config_name: str, tgt: Target, notes: list[str], task, result: Result, top: int) -> dict:
  """Prints the answer for one config on one target; returns it as a JSON-able row."""
  chips = len(tgt.devices)
  mesh = dict(task.mesh.shape)
  print(f"{config_name} (task {config.task}) on {tgt.name}: {tgt.description}")
  for line in notes:
    print(f"  stand-in: {line}")
  print(f"  mesh data={mesh['data']} x fsdp={mesh['fsdp']}; global batch {config.batch_size} = "
        f"{config.batch_size // chips} per chip; remat {_remat(config)}")
  row = dict(config=config_name, target=tgt.name, device_kind=tgt.device_kind, chips=chips, hosts=tgt.hosts,
             fsdp=mesh["fsdp"],
             batch=config.batch_size, remat=_remat(config), compiled=result.compiled,
             fits=result.fits, gib_per_chip=round(result.needed_bytes / GiB, 2),
             hbm_gib=round(result.capacity_bytes / GiB, 2), compile_s=round(result.compile_s, 1))
  if not result.compiled:
    print(f"  compiled: NO ({result.compile_s:.0f} s): {result.error}")
    return row
  if result.parts:
    detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in result.parts.items())
    print(f"  compiled: yes in {result.compile_s:.0f} s; per chip GiB: {detail}")
  else:
    print(f"  compiled: the compiler refused it in {result.compile_s:.0f} s: {result.error}")
  verdict = "fits" if result.fits else "DOES NOT FIT"
  print(f"  memory: needs {result.needed_bytes / GiB:.2f} GiB of {result.capacity_bytes / GiB:.2f} GiB per chip: "
        f"{verdict}")
  if result.xla_flops:
    diff = result.xla_flops / result.model_flops - 1 if result.model_flops else float("nan")
    print(f"  FLOPs per chip per step: XLA {result.xla_flops / 1e12:.2f} T, model {result.model_flops / 1e12:.2f} T "
          f"({diff:+.1%}; remat recompute and optimizer math are not in the model count)")
    row.update(xla_tflop=round(result.xla_flops / 1e12, 3), model_tflop=round(result.model_flops / 1e12, 3))
  machine = roofline.machine_for(tgt.device_kind)
  if result.hlo_text and machine:
    ks = roofline.kernels(result.hlo_text, machine)
    ms = sum(k.ms for k in ks)
    img_s = config.batch_size / (ms * 1e-3)
    mfu = result.model_flops / (ms * 1e-3) / (machine.peak_tflops * 1e12)
    print(f"  roofline ({machine.name}: {machine.peak_tflops:.0f} TFLOP/s bf16, {machine.hbm_tbps} TB/s HBM; "
          f"matmuls at {machine.matmul_efficiency:.0%}, memory at {machine.memory_efficiency:.0%}): step >= "
          f"{ms:.1f} ms, <= {img_s:,.0f} img/s, MFU <= {mfu:.1%} (asynchronous copies and collectives overlap: "
          "not charged; synchronous collectives at HBM speed)")
    row.update(roofline_ms=round(ms, 2), roofline_img_s=round(img_s), roofline_mfu=round(mfu, 4))
    if top:
      print(f"    {'category':24s} {'kernels':>7s} {'TFLOP':>7s} {'GB':>7s} {'ms':>7s} {'share':>6s}")
      for r in roofline.by_category(ks):
        print(f"    {r['category']:24s} {r['kernels']:7d} {r['tflop']:7.2f} {r['gb']:7.1f} {r['ms']:7.2f} "
              f"{r['ms'] / ms:6.1%}")
      print(f"    top {top} source ops (all layers together):")
      for r in roofline.by_source(ks)[:top]:
        print(f"    {r['ms']:7.2f} ms {r['kernels']:4d}x {r['category'][:18]:18s} {r['gb']:6.1f} GB "
              f"{r['tflop']:6.2f} TF  {r['source'][-90:]}")
  return row


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def define_flags():
  """The command line's flags; defined only when it runs (`--config` is main's flag name too, and a process
  may import both modules)."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=False)
  flags.DEFINE_string("target", None, "tpu:<slice> (v4-32, v5p-64, v5e-256, v6e-64 ...), tpu:<topology> "
                      "(v4:2x2x4), gpu:h100 or gpu:h200")
  flags.DEFINE_bool("max_batch", False, "Also find the largest per-chip batch that fits, without and with remat.")
  flags.DEFINE_integer("top", 0, "List the roofline's categories and this many source ops by roofline time.")
  flags.DEFINE_string("json", "", "Append the result row(s) as JSON lines to this file.")
  flags.DEFINE_string("dump", "", "Write the compiled train step's HLO text into this folder.")


def main(argv):
  del argv
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)
  FLAGS = flags.FLAGS
  if FLAGS.config is None or not FLAGS.target:
    _exit(2, "error: --config and --target are required, e.g. --config=configs/pretrain_base.py --target=tpu:v4-32")
  config = FLAGS.config
  config_name = _config_name()
  config_dir = os.path.dirname(os.path.abspath(config_flags.get_config_filename(FLAGS["config"])))
  try:
    from beitv2_jax.config_defaults import validate
    validate(config)
    tgt = target(FLAGS.target)
    if "add_norm" in config.model:  # refused for the target, not for this host (whose CPU would interpret it)
      from beitv2_jax.models.vit import check_add_norm
      gpu = tgt.name.startswith("gpu:")
      check_add_norm(config.model.add_norm, backend="gpu" if gpu else "tpu", platform="cuda" if gpu else "tpu",
                     device_count=len(tgt.devices))
  except (ValueError, ModuleNotFoundError, KeyError) as e:
    _exit(2, f"error: {one_line(e)}")
  try:
    work = config.copy_and_resolve_references()
    notes = stand_ins(work, config_dir)
    task = build_task(work, tgt.devices)
    result = compile_task(task, tgt, keep_text=True)
  except (ValueError, OSError, KeyError) as e:
    _exit(2, f"error: {type(e).__name__}: {one_line(e)}")
  rows = [report(work, config_name, tgt, notes, task, result, FLAGS.top)]
  if FLAGS.dump and result.hlo_text:
    os.makedirs(FLAGS.dump, exist_ok=True)
    path = os.path.join(FLAGS.dump, dump_name(config_name, tgt.name))
    with open(path, "w") as f:
      f.write(result.hlo_text)
  if result.compiled and not result.fits:
    fixes = fix_suggestions(config, config_dir, tgt)
    fitting = [(flag, r) for flag, r in fixes if r.fits]
    for flag, r in fixes:
      print(f"  with {flag}: {'fits' if r.fits else 'does not fit'} at {r.needed_bytes / GiB:.2f} GiB per chip")
    if fitting:
      print(f"  does not fit: needs {result.needed_bytes / GiB:.1f} GiB of {result.capacity_bytes / GiB:.1f} GiB per "
            f"chip; {fitting[0][0]} fits at {fitting[0][1].needed_bytes / GiB:.1f} GiB")
    else:
      print(f"  does not fit: needs {result.needed_bytes / GiB:.1f} GiB of {result.capacity_bytes / GiB:.1f} GiB per "
            "chip, and nothing tried fits: a smaller batch does (--max_batch finds the largest)")
    rows[0]["fits_with"] = fitting[0][0] if fitting else ""
  if FLAGS.max_batch and result.compiled:
    for remat in dict.fromkeys([_remat(config), "full"] if "remat" in config.model else ["none"]):
      b, r = max_batch(config, config_dir, tgt, result, remat)
      text = f"{b} ({r.needed_bytes / GiB:.2f} GiB)" if r else "none found"
      print(f"  largest per-chip batch that fits with remat {remat}: {text}")
      rows[0][f"max_batch_per_chip_remat_{remat}"] = b
  if FLAGS.json:
    with open(FLAGS.json, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  sys.exit(0 if result.fits else (3 if result.compiled else 1))


def dump_name(config_name: str, target_name: str) -> str:
  """The file --dump writes a compiled step's HLO text to."""
  return re.sub(r"[^\w.=-]+", "_", f"{config_name}_{target_name}") + ".hlo"


def _config_name() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


def _exit(code: int, line: str):
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
