"""The command line: bad configs end with one line naming the problem and a non-zero exit."""
import os
import subprocess
import sys

from helpers import ROOT


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "beitv2_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(r, *needles):
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert any(all(n in line for n in needles) for line in err), r.stderr[-3000:]


def test_unknown_task(tmp_path):
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", "--config.task=distill")
  _assert_one_line_error(r, "unknown task", "distill")


def test_unknown_config_field(tmp_path):
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", "--config.batchsize=8")
  _assert_one_line_error(r, "batchsize")


def test_wrong_type(tmp_path):
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", "--config.batch_size=big")
  _assert_one_line_error(r, "batch_size")


def test_missing_config_file(tmp_path):
  r = _cli("--config=configs/nope.py", f"--workdir={tmp_path}")
  _assert_one_line_error(r, "nope.py")


def test_bad_value_and_missing_teacher(tmp_path):
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", "--config.model.img_size=30")
  _assert_one_line_error(r, "img_size=30", "not divisible")
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", f"--config.teacher={tmp_path}/none/x")
  _assert_one_line_error(r, "teacher")
  r = _cli("--config=configs/tokenizer_tiny.py", f"--workdir={tmp_path}", "--config.model.teacher_dim=512")
  _assert_one_line_error(r, "teacher_dim=512", "does not match")
