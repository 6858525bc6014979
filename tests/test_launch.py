"""The launchers, checked without a pod or a GPU: DRY_RUN=1 prints every command with the variables filled
in and runs none of them."""
import os
import shutil
import subprocess

from helpers import ROOT


def _dry(script, env, *args):
  env = dict(os.environ, DRY_RUN="1", **env)
  r = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=60)
  return r


def _commands(stdout):
  """The printed commands ('+ ' and shell-quoted words, as bash's printf %q writes them), as argument lists."""
  out = []
  for line in stdout.splitlines():
    if line.startswith("+ "):
      words = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + line[2:]], capture_output=True, text=True).stdout
      out.append(words.split("\0")[:-1])
  return out


def test_tpu_pod_dry_run_prints_the_commands_for_every_worker(tmp_path):
  r = _dry("tpu_pod.sh", dict(TPU="my-v4-32", ZONE="us-central2-b", BUCKET="gs://bkt", RUN="r1",
                              CONFIG="configs/pretrain_base.py:epochs=1600"),
           "--config.tokenizer_path=gs://bkt/vqkd.pth", "--config.optim.lr=1e-3")
  assert r.returncode == 0, r.stderr
  lines = _commands(r.stdout)
  assert [cmd[0] for cmd in lines] == ["tar", "gcloud", "gcloud"]
  scp, ssh = lines[1], lines[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp and "my-v4-32:~/" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32"] and "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert "pip install -q -c constraints.txt -e '.[tpu]'" in remote
  assert "export TFDS_DATA_DIR=gs://bkt/tensorflow_datasets" in remote
  assert ("python3 -m beitv2_jax.main --config=configs/pretrain_base.py:epochs=1600 --workdir=gs://bkt/beitv2_jax/r1 "
          "--config.tokenizer_path=gs://bkt/vqkd.pth --config.optim.lr=1e-3") in remote
  if shutil.which("gcloud") is None:  # nothing ran: a real run would have failed on the missing gcloud
    assert r.stderr == ""


def test_tpu_pod_needs_its_variables():
  r = _dry("tpu_pod.sh", dict(ZONE="z", BUCKET="gs://b"))
  assert r.returncode != 0 and "set TPU to the TPU VM name" in r.stderr


def test_gpu_dry_run_prints_the_install_and_the_run(tmp_path):
  r = _dry("gpu.sh", dict(WORKDIR=str(tmp_path / "w"), CONFIG="configs/finetune_base.py:pt1600"),
           "--config.batch_size=256")
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  run = cmds[-1]
  assert run == ["exec", ".venv-gpu/bin/python", "-m", "beitv2_jax.main", "--config=configs/finetune_base.py:pt1600",
                 f"--workdir={tmp_path / 'w'}", "--config.batch_size=256"]
  assert "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92" in r.stdout
  if not os.path.isdir(os.path.join(ROOT, ".venv-gpu")):
    assert cmds[1] == [".venv-gpu/bin/pip", "install", "-q", "-c", "constraints.txt", "-e", ".[gpu]"]
  assert not (tmp_path / "w").exists()
