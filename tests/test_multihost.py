"""Real multi-host: 2 JAX processes x 2 CPU devices (gloo) train the tiny tokenizer and the tiny MIM model
with checkpointing from both processes; the parameters equal those of 1 process x 4 devices on the same
global batch (atol 1e-5: the collectives sum in another order)."""
import os
import subprocess
import sys

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


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
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

  mim_extra = [f"--config.tokenizer_path={ref_tok}", "--config.data.eval_split="]
  ref_mim, mh_mim = str(tmp_path / "ref_mim"), str(tmp_path / "mh_mim")
  _run_single("pretrain_tiny", ref_mim, mim_extra)
  _run_pair("pretrain_tiny", mh_mim, mim_extra)
  assert_trees_equal(params_of(ref_mim)["params"], params_of(mh_mim)["params"], atol=1e-5)
