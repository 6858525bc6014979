"""Real multi-host: 2 JAX processes x 2 CPU devices (gloo) train the tiny tokenizer and the tiny MIM model
with checkpointing from both processes; the parameters equal those of 1 process x 4 devices on the same
global batch (atol 1e-5: the collectives sum in another order)."""
import os
import subprocess
import sys

import numpy as np
import portpicker

from helpers import ROOT, params_of, assert_trees_equal

COMMON = ["--config.data.name=digits", "--config.data.train_split=train", "--config.batch_size=16",
          "--config.total_steps=6", "--config.warmup_steps=2", "--config.log_every_steps=2",
          "--config.checkpoint_every_steps=3", "--config.data.read_threads=0"]


def _launch(config, workdir, devices, extra=(), process_id=None, port=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "beitv2_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}",
         *COMMON, *extra]
  if process_id is not None:
    cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_pair(config, workdir, extra=()):
  port = portpicker.pick_unused_port()
  procs = [_launch(config, workdir, 2, extra, i, port) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _run_single(config, workdir, extra=()):
  p = _launch(config, workdir, 4, extra)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-4000:]
  return out


def test_two_processes_equal_one_process_with_four_devices_tokenizer(tmp_path):
  tok_extra = ["--config.model.codebook_size=64"]
  ref_tok, mh_tok = str(tmp_path / "ref_tok"), str(tmp_path / "mh_tok")
  _run_single("tokenizer_tiny", ref_tok, tok_extra)
  outs = _run_pair("tokenizer_tiny", mh_tok, tok_extra)
  assert "step 6/6" in outs[0] and "step 6/6" not in outs[1]  # only process 0 logs
  a, b = params_of(ref_tok), params_of(mh_tok)
  assert int(a["step"]) == int(b["step"]) == 6
  assert_trees_equal(a["params"], b["params"], atol=1e-5)
  assert_trees_equal(a["extra"]["embedding"], b["extra"]["embedding"], atol=1e-5)
  # both processes wrote their data-iterator state into the checkpoint
  data_dir = os.path.join(mh_tok, "checkpoints", "6", "data")
  assert len([f for f in os.listdir(data_dir) if "process" in f]) == 2, os.listdir(data_dir)


def test_two_processes_equal_one_process_with_four_devices_mim(tmp_path):
  """The MIM step (its frozen tokenizer placed over both processes' devices, masks drawn per host) on its
  own, so that the two halves of this comparison run side by side under pytest-xdist."""
  from beitv2_jax import main as entry
  from helpers import tokenizer_config
  tok = str(tmp_path / "tok")
  entry.run(tokenizer_config(steps=2), tok)
  mim_extra = [f"--config.tokenizer_path={tok}", "--config.data.eval_split="]
  ref_mim, mh_mim = str(tmp_path / "ref_mim"), str(tmp_path / "mh_mim")
  _run_single("pretrain_tiny", ref_mim, mim_extra)
  _run_pair("pretrain_tiny", mh_mim, mim_extra)
  a, b = params_of(ref_mim), params_of(mh_mim)
  assert int(a["step"]) == int(b["step"]) == 6
  assert_trees_equal(a["params"], b["params"], atol=1e-5)


# --- the input of a v4-32's 4 hosts: 4 JAX processes, each reading its rows, one global batch -------------
_INPUT_WORKER = r"""
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from beitv2_jax import parallel
from beitv2_jax.data import pipeline, sources, transforms
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parallel.initialize_distributed(f"127.0.0.1:{port}", 4, pid)
mesh = parallel.make_mesh()
src = sources.make_source("digits", "train")
it = iter(pipeline.train_dataset(src, transforms.TokenizerTrain(16), 32, seed=3, read_threads=0))
local, local_image, whole = [], [], []
for _ in range(2):
  batch = next(it)
  batch.pop("bad")
  local.append(batch["label"])
  local_image.append(batch["image"])
  g = parallel.to_global(batch, mesh)  # this host's rows -> one global array over the 4 hosts' devices
  whole.append({k: multihost_utils.process_allgather(v, tiled=True) for k, v in g.items()})
np.savez(out, local=np.stack(local), local_image=np.stack(local_image), **{f"{k}{i}": b[k] for i, b in enumerate(whole) for k in b})
"""


def test_four_hosts_read_disjoint_rows_of_the_one_process_global_batch(tmp_path):
  """4 processes (a v4-32's host count) x 1 CPU device, jax.distributed over gloo: each reads its own 8 rows of
  every 32-image global batch, and the global batch they assemble on the devices (images and labels,
  augmentation included) is the batch one process reads alone."""
  from beitv2_jax.data import pipeline, sources, transforms
  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", _INPUT_WORKER, str(port), str(i), str(tmp_path / f"p{i}.npz")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(4)]
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
  got = [np.load(tmp_path / f"p{i}.npz") for i in range(4)]
  src = sources.make_source("digits", "train")
  one = iter(pipeline.train_dataset(src, transforms.TokenizerTrain(16), 32, seed=3, read_threads=0,
                                    process_index=0, process_count=1))
  for b in range(2):
    ref = next(one)
    locals_ = [g["local"][b] for g in got]
    assert all(len(x) == 8 for x in locals_)
    np.testing.assert_array_equal(np.concatenate(locals_), ref["label"])  # host p holds rows [8p, 8p + 8)
    for g in got:  # every host assembled the same global batch, equal to the one-process batch
      np.testing.assert_array_equal(g[f"label{b}"], ref["label"])
      np.testing.assert_array_equal(g[f"image{b}"], ref["image"])
    # host p read exactly rows [8p, 8p + 8) of the global batch (images too: each row's augmentation is
    # seeded by its global position), so no row is read by two hosts
    for p, g in enumerate(got):
      np.testing.assert_array_equal(g["local_image"][b], ref["image"][8 * p:8 * p + 8])
