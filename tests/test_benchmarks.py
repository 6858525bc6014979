"""The benchmark harnesses run and print finite numbers (a smoke test; speed is not judged here)."""
import math
import os
import re
import subprocess
import sys

from helpers import ROOT


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def test_train_step_benchmark_smoke(tmp_path):
  out = _run("benchmarks/train_step.py", "--size=tiny", "--steps=1", "--batch=8", "--host-input",
             f"--profile={tmp_path}")
  assert out.count("profile: trace ") == 3  # one trace per task (a CPU trace has no device kernels)
  rows = [line for line in out.splitlines() if line.startswith("task=")]
  assert [r.split(" | ")[0] for r in rows] == ["task=tokenizer", "task=pretrain", "task=finetune"]
  for r in rows:
    assert "attention=xla" in r  # what "auto" means on a CPU
    for key in ("step_ms", "img_per_sec", "model_tflops", "compile_s", "host_put_step_ms", "prefetch2_step_ms"):
      value = float(re.search(rf"{key}=([^ |]+)", r).group(1))
      assert math.isfinite(value) and value > 0


def test_input_pipeline_benchmark_smoke():
  out = _run("benchmarks/input_pipeline.py", "--images=8", "--seconds=0.3", "--workers=0", "--size=64")
  assert "| tokenizer |" in out and "grain pipeline" in out
