"""beitv2_jax.aot: the real train steps compiled for TPU slices on this CPU (libtpu, no TPU), one host and
several, data-parallel and FSDP; what the command line says for a config that does not fit and for bad input.
Without libtpu the TPU tests skip and say how to install it."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from beitv2_jax.config_defaults import set_dotted
from helpers import ROOT, load_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu, the TPU compiler: pip install "jax[tpu]==<jax '
                                  'version>" (make install-test brings it on Linux)')

from beitv2_jax import aot, roofline  # noqa: E402  (aot sets the environment libtpu reads)


def _tiny(name, **overrides):
  c = load_config(name)
  for k, v in overrides.items():
    set_dotted(c, k, v)
  return c


def _state_bytes_sharded(task, abstract_shardings_pair):
  """Bytes of the state leaves the fsdp axis shards (whole, not per chip)."""
  import jax
  abstract, shardings = abstract_shardings_pair
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    if "fsdp" in [ax for ax in s.spec if ax]:
      total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
  return total


@needs_libtpu
def test_tiny_pretrain_compiles_for_one_and_four_hosts_and_fsdp_shards_the_state():
  """v4-8 is 4 chips on 1 host, v4-32 16 chips on 4 hosts. On v4-32, data-parallel and data x fsdp=4 both
  compile and fit; XLA's FLOPs per chip are the model's within 20% (the tiny model's softmax / optimizer math
  is a larger share than at ViT-B, where it is ~1%), and so are the matmuls the roofline finds in the TPU
  module; the compiled program's per-chip arguments shrink by 3/4 of the state it shards (fsdp=4 vs 1)."""
  import jax
  from beitv2_jax.train import loop
  one_host = aot.target("tpu:v4-8")
  assert (len(one_host.devices), one_host.hosts, one_host.device_kind) == (4, 1, "TPU v4")
  assert 28 * 2**30 < one_host.memory_bytes <= 32 * 2**30  # the compiler's own figure (30.75 GiB)
  pods = aot.target("tpu:v4-32")
  assert (len(pods.devices), pods.hosts) == (16, 4)

  results = {}
  for fsdp in (1, 4):
    c = _tiny("pretrain_tiny", batch_size=64, **{"mesh.fsdp": fsdp, "mesh.fsdp_min_size": 1024})
    task, r = aot.try_config(c, os.path.join(ROOT, "configs"), pods, keep_text=fsdp == 1)
    assert r.compiled and r.fits, r.error
    results[fsdp] = (task, r)
  task1, r1 = results[1]
  assert dict(task1.mesh.shape) == {"data": 16, "fsdp": 1}
  assert 1.0 <= r1.xla_flops / r1.model_flops < 1.2
  # the roofline reads XLA:TPU's matmuls (convolutions, batched ones over dilated inputs): their FLOPs are
  # the model count's plus the tokenizer's code search (a matmul the model count leaves out), within 20%
  matmul = sum(k.flops for k in roofline.kernels(r1.hlo_text, roofline.machine_for(pods.device_kind)))
  assert 1.0 <= matmul / r1.model_flops < 1.2, matmul / r1.model_flops
  task4, r4 = results[4]
  assert dict(task4.mesh.shape) == {"data": 4, "fsdp": 4}
  abstract = jax.eval_shape(task4.init_state, jax.random.PRNGKey(0))
  sharded = _state_bytes_sharded(task4, (abstract, loop.placement(task4, abstract)[0]))
  assert sharded > 0.5 * sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))
  saved = results[1][1].parts["arguments"] - r4.parts["arguments"]
  # the frozen tokenizer is placed by the same rule, so its big leaves shrink too: at least the state's share
  assert saved >= 0.75 * sharded * 0.98, (saved, sharded)


def _loops_and_conditionals(hlo_text: str) -> set:
  return set(re.findall(r"\b(while|conditional)\(", hlo_text))


@needs_libtpu
def test_the_control_flow_reader_sees_a_tpu_while_loop_and_conditional():
  import jax
  import jax.numpy as jnp
  dev = aot.target("tpu:v4-8").devices[0]
  x = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(dev))
  f = lambda v: jax.lax.cond(v[0] > 0, lambda a: jax.lax.fori_loop(0, v[1].astype(int), lambda i, b: b * 2, a),
                             lambda a: a, v)
  assert _loops_and_conditionals(jax.jit(f).lower(x).compile().as_text()) == {"while", "conditional"}


@needs_libtpu
def test_tiny_tokenizer_compiles_for_four_hosts_with_its_kmeans_first_step():
  """docs/deviations.md: k-means runs in a separate first step, so the step every later iteration runs has
  no conditional and no loop in its compiled TPU program (an XLA conditional or while waits on the device's
  scalar control flow each step). With data.resize="device", so that the step's banded resize of the shipped
  crops (data/canvas.py) compiles for the pod too, inside the same loop-free program."""
  c = _tiny("tokenizer_tiny", batch_size=32, **{"mesh.fsdp": 2, "mesh.fsdp_min_size": 1024, "data.resize": "device"})
  task, r = aot.try_config(c, os.path.join(ROOT, "configs"), aot.target("tpu:v4-32"), keep_text=True)
  assert r.compiled and r.fits, r.error
  assert task.resize_canvas() == 2 * c.model.img_size and "canvas" in aot.batch_spec(task)
  assert task.initial_step() is not None  # k-means first step: compiled too, memory is the larger of the two
  assert dict(task.mesh.shape) == {"data": 8, "fsdp": 2}
  assert r.xla_flops > r.model_flops > 0
  assert "fusion" in r.hlo_text and _loops_and_conditionals(r.hlo_text) == set()


@needs_libtpu
def test_compiled_tpu_finetune_step_has_no_loop():
  """docs/deviations.md: the mixup / cutmix Beta draws are loop-free; the compiled TPU program of the
  fine-tune step (mixup, cutmix, drop path, erasing and, with data.resize="device", the resize and
  RandAugment's colour ops, data/pixel_ops.py) has no while loop."""
  c = _tiny("finetune_tiny", batch_size=32, **{"data.resize": "device"})
  assert c.aug.mixup > 0 and c.aug.cutmix > 0
  task, r = aot.try_config(c, os.path.join(ROOT, "configs"), aot.target("tpu:v4-8"), keep_text=True)
  assert r.compiled, r.error
  assert {"canvas", "ra_kind", "ra_lut", "ra_factor"} <= set(aot.batch_spec(task))
  assert "fusion" in r.hlo_text and _loops_and_conditionals(r.hlo_text) == set()


def _aot(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "beitv2_jax.aot", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@needs_libtpu
def test_a_config_that_does_not_fit_is_a_result_with_the_flag_that_fits():
  """One v5e chip (15.75 GiB) and a batch whose activations need more: exit 3, one line saying what it needs,
  and full remat tried (no FSDP factor exists on one chip)."""
  r = _aot("--config=configs/pretrain_tiny.py", "--target=tpu:v5e-1", "--config.batch_size=65536",
           "--config.model.embed_dim=128", "--config.model.num_heads=4")
  out = r.stdout + r.stderr
  assert r.returncode == 3, out[-3000:]
  assert "DOES NOT FIT" in out and "Traceback" not in out
  assert "with --config.model.remat=full:" in out


def test_bad_targets_and_missing_compilers_are_one_line(monkeypatch):
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  with pytest.raises(ValueError, match=r"unknown target 'tpu:v9-8': use gpu:h100.*v4-8/16/32/64.*v5e-1/4/8"):
    aot.target("tpu:v9-8")
  with pytest.raises(ValueError, match="unknown target"):
    aot.target("tpu:v4-7")  # v4 slices count TensorCores: an odd count is no slice
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else object())
  with pytest.raises(ModuleNotFoundError, match=r'pip install "jax\[tpu\]=='):
    aot.target("tpu:v4-8")
  r = _aot("--config=configs/pretrain_tiny.py", "--target=tpu:v4-33", timeout=120)
  assert r.returncode == 2 and "unknown target 'tpu:v4-33'" in r.stderr and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  if has_libtpu:  # the Triton kernel is refused for a TPU target, not interpreted
    r = _aot("--config=configs/pretrain_tiny.py", "--target=tpu:v4-8", "--config.model.add_norm=pallas", timeout=120)
    assert r.returncode == 2 and "Triton kernel (GPUs); on TPUs use 'xla'" in r.stderr, r.stdout + r.stderr


def test_gpu_target_compiles_for_an_h100_or_says_what_to_install():
  """With the CUDA plugin installed, the tiny fine-tune step compiles for an H100 on this CPU (cuDNN
  attention included); without it (CI), the command stops with the install line."""
  has_plugin = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
      if importlib.util.find_spec("jax_plugins") else False
  r = _aot("--config=configs/finetune_tiny.py", "--target=gpu:h100", "--top=3", "--config.batch_size=8")
  if has_plugin:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on gpu:h100" in r.stdout and "attention (cuDNN)" in r.stdout
  else:
    assert r.returncode == 2 and 'pip install "jax[cuda12]==' in r.stderr, r.stdout + r.stderr


def test_slice_names_map_to_the_topologies_google_lists():
  per_chip = {g: n for g, (n, _) in aot.TPU_GENERATIONS.items()}
  assert per_chip == {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
  shapes = {g: s for g, (_, s) in aot.TPU_GENERATIONS.items()}
  assert shapes["v4"][16] == "2x2x4" and shapes["v5p"][32] == "2x4x4" and shapes["v5e"][64] == "8x8"
  assert shapes["v6e"][256] == "16x16"
  for g, table in shapes.items():
    for chips, shape in table.items():
      assert int(np.prod([int(d) for d in shape.split("x")])) == chips, (g, shape)


def test_max_batch_search_stops_at_the_limit_on_real_compiles():
  """The search against real compiled memory: the tiny MIM step compiled for one CPU device (seconds per
  compile; a TPU's near its limit take minutes) given a 300 MiB memory. It returns a multiple of 8 that fits,
  and 8 more does not: it stopped at the limit, not short of it."""
  import jax
  cpu = aot.Target("cpu", "one CPU device", jax.devices()[:1], "cpu", 1, memory_bytes=300 * 2**20)
  config_dir = os.path.join(ROOT, "configs")
  c = _tiny("pretrain_tiny", batch_size=64)
  _, first = aot.try_config(c, config_dir, cpu)
  assert first.fits
  best, r = aot.max_batch(c, config_dir, cpu, first, "none", max_compiles=10)
  assert best % 8 == 0 and best > 64 and r.fits, best
  c.batch_size = best + 8
  assert not aot.try_config(c, config_dir, cpu)[1].fits


@needs_libtpu
def test_tiny_segmenter_compiles_for_a_tpu_and_ade20k_gets_a_synthetic_stand_in():
  """The segment step (UperNet, SyncBN over the global batch) compiles for a v4-8; segment_base's ADE20K
  folder, absent here, is replaced by synthetic ADE20K-sized pairs of its train size, and its init_from by
  the recipe's random init."""
  c = _tiny("segment_tiny")
  _, r = aot.try_config(c, os.path.join(ROOT, "configs"), aot.target("tpu:v4-8"))
  assert r.compiled and r.fits, r.error
  assert r.model_flops > 0 and r.xla_flops >= r.model_flops
  base = _tiny("segment_base", init_from="/nonexistent/pt")
  notes = aot.stand_ins(base, os.path.join(ROOT, "configs"))
  assert base.data.name == "synthetic:20210:150" and base.init_from == ""
  assert any("ADE20K's train size" in n for n in notes) and any("init_from /nonexistent/pt" in n for n in notes)
  from beitv2_jax.data import pipeline, seg_sources, seg_transforms
  src = seg_sources.make_seg_source(base.data.name, "train")
  ex = pipeline.ExampleFn(src, seg_transforms.SegTrain(num_classes=150))(src[3], np.random.default_rng(0))
  assert ex["image"].shape == (512, 512, 3) and ex["label"].shape == (512, 512) and src.num_classes == 150
