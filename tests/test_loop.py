"""Checkpointing and resume: exact resume, SIGKILL, SIGTERM, restore across device counts (the NaN guard,
corrupt checkpoints and the workdir lock: test_reliability.py)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from beitv2_jax import main as entry
from beitv2_jax.train.writer import read_metrics
from helpers import ROOT, assert_resume_is_bit_identical, assert_trees_equal, params_of, tokenizer_config


def test_exact_resume_is_bit_identical(tmp_path):
  """8 steps in one go == 6 steps, stop, resume to 8 (same 8 devices): params, optimizer, codebook, rng,
  data position and logged metrics bit-identical (pretrain, fine-tune, linear probe: their test files)."""
  assert_resume_is_bit_identical(tokenizer_config(steps=8), tmp_path)


def test_restore_across_device_counts(tmp_path):
  """A checkpoint written on 8 devices resumes on 1 and the other way round; the result matches the
  uninterrupted run on the other device count to 5e-5 (only reduction order differs: Adam can turn its rounding
  in a near-zero gradient into up to 1.5e-5, seen once in 16384 weights; a step off in the schedule is 1e-4)."""
  one = str(tmp_path / "one")
  entry.run(tokenizer_config(steps=8, **{"mesh.data": 1}), one)
  w8to1 = str(tmp_path / "8to1")
  entry.run(tokenizer_config(steps=8, stop_after_steps=4), w8to1)
  entry.run(tokenizer_config(steps=8, **{"mesh.data": 1}), w8to1)
  assert_trees_equal(params_of(one)["params"], params_of(w8to1)["params"], atol=5e-5)
  w1to8 = str(tmp_path / "1to8")
  entry.run(tokenizer_config(steps=8, stop_after_steps=4, **{"mesh.data": 1}), w1to8)
  entry.run(tokenizer_config(steps=8, **{"mesh.fsdp": 8}), w1to8)  # and onto an FSDP layout
  assert_trees_equal(params_of(one)["params"], params_of(w1to8)["params"], atol=5e-5)


def _cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "beitv2_jax.main", "--config=configs/tokenizer_tiny.py", f"--workdir={workdir}",
         "--config.data.name=digits", "--config.data.train_split=train", "--config.batch_size=16",
         "--config.model.codebook_size=64", "--config.log_every_steps=1", "--config.data.read_threads=0",
         *overrides]
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    ms = read_metrics(workdir)
    if ms and ms[-1].get("step", 0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError("run ended early:\n" + proc.stdout.read())
    time.sleep(0.2)
  raise AssertionError("timed out")


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  wd = str(tmp_path / "term")
  p = _cli(wd, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000")
  _wait_for_step(wd, 3, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  assert "preempted: saved step" in out
  saved = int(out.split("preempted: saved step ")[1].split(";")[0])
  assert params_of(wd)["step"] == saved >= 3
  q = _cli(wd, f"--config.total_steps={saved + 2}", "--config.checkpoint_every_steps=100000")
  out2, _ = q.communicate(timeout=240)
  assert q.returncode == 0, out2
  assert f"resumed from step {saved}" in out2 and int(params_of(wd)["step"]) == saved + 2


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path):
  """Killed with SIGKILL mid-run: the rerun starts from the last complete checkpoint and ends bit-identical
  to an uninterrupted run (same devices, same schedule)."""
  import orbax.checkpoint as ocp
  wd, ref = str(tmp_path / "kill"), str(tmp_path / "ref")
  p = _cli(wd, "--config.total_steps=400", "--config.checkpoint_every_steps=2")
  _wait_for_step(wd, 5, p)
  p.kill()
  p.wait()
  last = ocp.CheckpointManager(os.path.join(wd, "checkpoints")).latest_step()
  assert last is not None and last >= 2
  stop = f"--config.stop_after_steps={last + 3}"
  q = _cli(wd, "--config.total_steps=400", "--config.checkpoint_every_steps=2", stop)
  out, _ = q.communicate(timeout=240)
  assert q.returncode == 0 and f"resumed from step {last}" in out, out
  r = _cli(ref, "--config.total_steps=400", "--config.checkpoint_every_steps=2", stop)
  r.communicate(timeout=240)
  a, b = params_of(wd), params_of(ref)
  assert int(a["step"]) == int(b["step"]) == last + 3
  assert_trees_equal(a, b)


def test_data_wait_is_logged_and_shows_a_slow_input(tmp_path, monkeypatch, capsys):
  """metrics.jsonl and the progress line carry the time the step waited for its batch: ~0 while the input
  keeps up; with an input that takes 0.3 s a batch, at least that per step."""
  from beitv2_jax.data import pipeline
  fast = str(tmp_path / "fast")
  entry.run(tokenizer_config(steps=4, log_every_steps=2), fast)
  rows = [m for m in read_metrics(fast) if "loss" in m]
  assert all(0.0 <= m["data_wait_frac"] <= 1.0 for m in rows) and rows[-1]["data_wait_s"] < 0.3, rows
  assert "data wait " in capsys.readouterr().out

  pull = pipeline.DevicePrefetch.__next__

  def slow_next(self):
    time.sleep(0.3)
    return pull(self)

  monkeypatch.setattr(pipeline.DevicePrefetch, "__next__", slow_next)
  slow = str(tmp_path / "slow")
  entry.run(tokenizer_config(steps=4, log_every_steps=2), slow)
  rows = [m for m in read_metrics(slow) if "loss" in m]
  # the fraction after the first interval only: the first one also holds the step's compile (seconds under load)
  assert all(m["data_wait_s"] >= 0.3 for m in rows) and rows[-1]["data_wait_frac"] > 0.3, rows


def _tensorboard_scalars(logdir):
  """(tag, step, value) of every scalar in the TensorBoard event files under `logdir`, read as TensorBoard
  does: TFRecords (length, its crc, an Event proto, its crc) parsed with the Event proto."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_tensorboard_events_hold_the_logged_scalars_and_torch_is_not_imported_for_them(tmp_path):
  """The metrics also go to TensorBoard event files; tensorboardX's optional torch import (4 s at every start
  where torch is installed, as here) is skipped."""
  wd = str(tmp_path / "run")
  code = ("import sys; from beitv2_jax.train.writer import MetricWriter\n"
          f"w = MetricWriter({wd!r})\n"
          "w.write(1, {'loss': 0.5, 'lr': 1e-3}); w.write(2, {'loss': 0.25, 'name': 'x'}); w.close()\n"
          "print('torch imported:', 'torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, check=True).stdout
  assert "torch imported: False" in out, out
  assert sorted(_tensorboard_scalars(os.path.join(wd, "tensorboard"))) == [
      ("loss", 1, 0.5), ("loss", 2, 0.25), ("lr", 1, np.float32(1e-3))]
  assert [m["loss"] for m in read_metrics(wd)] == [0.5, 0.25]
