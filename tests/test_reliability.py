"""Nothing lost: settings that would destroy checkpoints are refused up front, a corrupt checkpoint is
skipped for an older one, the NaN guard never keeps a poisoned state, one run per workdir, a resume that
changes the model is refused, metrics and the bad-image count continue exactly across a resume."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from beitv2_jax import checkpoint
from beitv2_jax import main as entry
from beitv2_jax.train import loop
from beitv2_jax.train.loop import NonFiniteError
from beitv2_jax.train.writer import read_metrics
from helpers import ROOT, assert_trees_equal, finetune_config, load_config, params_of, tokenizer_config


def _cli(*args, devices=1):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "beitv2_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


# --- settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
    ({"total_steps": -3}, "total_steps=-3"),
    ({"model.codebook_size": 0}, "model.codebook_size=0"),
    ({"model.num_heads": 3}, "model.embed_dim=64: not divisible by model.num_heads=3"),
    ({"batch_size": 12}, "batch_size=12 does not split evenly over the 8 devices"),
])
def test_settings_that_would_destroy_or_waste_a_run_are_refused_before_anything_is_written(tmp_path, override,
                                                                                          needle):
  wd = tmp_path / "run"
  with pytest.raises(ValueError, match=re.escape(needle)):
    entry.run(tokenizer_config(**override), str(wd))
  assert not wd.exists()  # no workdir, no checkpoint, no compile


def test_a_recipe_argument_the_recipe_does_not_take_is_refused(tmp_path):
  r = _cli("--config=configs/tokenizer_tiny.py:junk", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "unknown recipe argument 'junk'" in r.stderr.strip().splitlines()[-1]
  r = _cli("--config=configs/pretrain_base.py:epoch=1600", f"--workdir={tmp_path}")  # a typo of epochs=
  assert r.returncode == 2 and "arguments it takes: epochs=..." in r.stderr


# --- corrupt checkpoints ----------------------------------------------------------------------------------
def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
  """Checkpoint 8 truncated: the rerun logs why it skipped it, moves it to rejected_checkpoints/ (nothing
  deleted), resumes from 4 and ends bit-identical to the uninterrupted run."""
  wd = str(tmp_path / "run")
  entry.run(tokenizer_config(steps=8), wd)
  reference = params_of(wd)
  data = _largest_data_file(os.path.join(wd, "checkpoints", "8"))
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  capsys.readouterr()
  entry.run(tokenizer_config(steps=8), wd)
  out = capsys.readouterr().out
  assert "checkpoint 8 did not restore" in out and "resumed from step 4" in out
  assert os.path.isdir(os.path.join(wd, "rejected_checkpoints", "8"))
  assert_trees_equal(reference, params_of(wd))


def test_an_empty_metadata_file_is_skipped_and_none_restoring_names_the_workdir(tmp_path, capsys):
  wd = str(tmp_path / "run")
  entry.run(tokenizer_config(steps=4, checkpoint_every_steps=2), wd)
  open(os.path.join(wd, "checkpoints", "4", "state", "_METADATA"), "w").close()
  capsys.readouterr()
  entry.run(tokenizer_config(steps=4, checkpoint_every_steps=2), wd)
  assert "resumed from step 2" in capsys.readouterr().out
  # every checkpoint damaged: one line naming the folder and each step's reason; nothing is moved
  for step in ("2", "4"):
    open(os.path.join(wd, "checkpoints", step, "state", "_METADATA"), "w").close()
  with pytest.raises(checkpoint.NoRestorableCheckpointError) as e:
    entry.run(tokenizer_config(steps=4, checkpoint_every_steps=2), wd)
  msg = str(e.value)
  assert "\n" not in msg and os.path.join(wd, "checkpoints") in msg and "step 4:" in msg and "step 2:" in msg
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]


# --- NaN guard --------------------------------------------------------------------------------------------
def test_nan_guard_sets_aside_the_checkpoint_that_led_to_nan_and_a_lower_lr_resumes_past_it(tmp_path):
  """A learning rate that explodes after warm-up: the step that first sees the blown-up parameters is not
  finite; the checkpoint written just before it (finite, but poisoned) is set aside, the message names the
  real last good step, and the run resumes from that step with a sane learning rate to the end."""
  wd = str(tmp_path / "nan")
  boom = {"optim.lr": 1e9, "warmup_steps": 4, "log_every_steps": 1, "checkpoint_every_steps": 1}
  with pytest.raises(NonFiniteError) as e:
    entry.run(tokenizer_config(steps=12, **boom), wd)
  msg = str(e.value)
  bad = int(re.search(r"at step (\d+)", msg).group(1))
  poisoned = int(re.search(r"Checkpoint (\d+), the input of that step, was set aside", msg).group(1))
  good = int(re.search(r"last good checkpoint is step (\d+)", msg).group(1))
  assert poisoned == bad - 1 and good < poisoned
  assert os.path.isdir(os.path.join(wd, "rejected_checkpoints", str(poisoned)))
  state = params_of(wd)
  assert int(state["step"]) == good
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(state))
  metrics = entry.run(tokenizer_config(steps=12, **dict(boom, **{"optim.lr": 1e-4})), wd)
  assert int(params_of(wd)["step"]) == 12 and np.isfinite(metrics["loss"])


def test_nan_guard_with_no_checkpoint_says_a_rerun_starts_from_zero(tmp_path):
  wd = str(tmp_path / "nan0")
  with pytest.raises(NonFiniteError, match="No checkpoint is left .* a rerun starts from step 0"):
    entry.run(tokenizer_config(steps=8, **{"optim.lr": 1e12, "warmup_steps": 0, "log_every_steps": 1,
                                           "checkpoint_every_steps": 100}), wd)


# --- one run per workdir ----------------------------------------------------------------------------------
def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    with open(os.path.join(wd, "run.lock"), "w") as f:
      json.dump({"host": __import__("socket").gethostname(), "pid": holder.pid, "time": "now"}, f)
    with pytest.raises(checkpoint.WorkdirLockedError, match=f"pid {holder.pid}"):
      entry.run(tokenizer_config(steps=2), wd)
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
  finally:
    holder.kill()
    holder.wait()
  capsys.readouterr()
  entry.run(tokenizer_config(steps=2), wd)  # the holder is gone: its lock is stale
  assert "taking over the stale lock" in capsys.readouterr().out
  assert int(params_of(wd)["step"]) == 2 and not os.path.exists(os.path.join(wd, "run.lock"))
  # a run in this very process holds it: refused too
  lock = checkpoint.acquire_lock(wd)
  try:
    with pytest.raises(checkpoint.WorkdirLockedError, match="in use by another run"):
      entry.run(tokenizer_config(steps=4), wd)
  finally:
    checkpoint.release_lock(lock)


# --- resume with other settings ---------------------------------------------------------------------------
def test_resume_refuses_another_model_and_lists_the_settings_that_changed(tmp_path, capsys):
  wd = str(tmp_path / "run")
  entry.run(tokenizer_config(steps=8, stop_after_steps=4), wd)
  with pytest.raises(ValueError, match=r"config\.model\.depth: 2 -> 3") as e:
    entry.run(tokenizer_config(steps=8, **{"model.depth": 3}), wd)
  assert "different model" in str(e.value) and "\n" not in str(e.value)
  capsys.readouterr()
  entry.run(tokenizer_config(steps=6, **{"optim.lr": 2e-4, "model.dtype": "bfloat16"}), wd)
  out = capsys.readouterr().out
  changed = out.split("resuming with changed settings: ")[1].splitlines()[0]
  assert "optim.lr: 0.0005 -> 0.0002" in changed and "total_steps: 8 -> 6" in changed
  assert "model.dtype" in changed  # an execution field: allowed, and listed
  assert int(params_of(wd)["step"]) == 6


def _write_run_config(wd, task, config):
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump({"task": task, "config": config}, f)


def test_runs_written_before_config_model_held_constructor_fields_only_still_resume(tmp_path, capsys):
  """config.json of the earlier layout (quantizer fields in config.model, `use_cls`, a tokenizer's unused
  scan / remat, no `add_norm`, `residual_dtype` or `patch_embed`) is read in today's names: the same settings
  resume, a real change is still refused."""
  later = ("add_norm", "residual_dtype", "patch_embed")  # execution fields written only since they existed
  tok = tokenizer_config(steps=8).to_dict()
  old = json.loads(json.dumps(tok))
  old["model"].update(old.pop("quantizer"), scan=False, remat="none")
  for field in later:
    del old["model"][field]
  _write_run_config(str(tmp_path / "tok"), "tokenizer", old)
  loop.check_resume_config(str(tmp_path / "tok"), {"task": "tokenizer", "config": tok})
  assert "changed settings" not in capsys.readouterr().out

  pt = load_config("pretrain_tiny").to_dict()  # its nested tokenizer stage's model too
  old = json.loads(json.dumps(pt))
  for model in (old["model"], old["tokenizer"]["model"]):
    for field in later:
      del model[field]
  _write_run_config(str(tmp_path / "pt"), "pretrain", old)
  loop.check_resume_config(str(tmp_path / "pt"), {"task": "pretrain", "config": pt})
  assert "changed settings" not in capsys.readouterr().out

  ft = finetune_config(steps=8).to_dict()
  old = json.loads(json.dumps(ft))
  old["model"]["use_cls"] = old["model"].pop("final_norm") == "norm"
  for field in later:
    del old["model"][field]
  _write_run_config(str(tmp_path / "ft"), "finetune", old)
  loop.check_resume_config(str(tmp_path / "ft"), {"task": "finetune", "config": ft})
  old["model"]["use_cls"] = not old["model"]["use_cls"]
  _write_run_config(str(tmp_path / "ft"), "finetune", old)
  with pytest.raises(ValueError, match=r"config\.model\.final_norm: 'norm' -> 'fc_norm'"):
    loop.check_resume_config(str(tmp_path / "ft"), {"task": "finetune", "config": ft})


# --- metrics and counters across a resume -----------------------------------------------------------------
def _image_folder(root):
  for c in ("cat", "dog"):
    os.makedirs(os.path.join(root, c))
    for i in range(6):
      Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 48, 3), np.uint8)).save(
          os.path.join(root, c, f"{i}.jpg"))
  with open(os.path.join(root, "dog", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")


def test_metrics_rows_and_bad_image_count_continue_exactly_across_a_resume(tmp_path):
  """A run interrupted after step 4 (rows for steps 5 and 6 were logged, then it died before its next
  checkpoint) and resumed: metrics.jsonl has each step once, and bad_images counts on from the checkpoint,
  equal to the uninterrupted run's at every step."""
  root = str(tmp_path / "imgs")
  _image_folder(root)
  cfg = lambda **kw: tokenizer_config(steps=8, batch=8, log_every_steps=1,
                                      **{"data.name": f"folder:{root}", "data.train_split": "all", **kw})
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  entry.run(cfg(), full)
  entry.run(cfg(stop_after_steps=4), split)
  with open(os.path.join(split, "metrics.jsonl"), "a") as f:  # what the killed run had logged
    f.write(json.dumps({"step": 5, "loss": 1.0, "bad_images": 99}) + "\n")
    f.write(json.dumps({"step": 6, "loss": 1.0, "bad_images": 99}) + '\n{"step": 7, "lo')  # cut mid-row
  entry.run(cfg(), split)
  rows = [m for m in read_metrics(split) if "loss" in m]
  assert [m["step"] for m in rows] == list(range(1, 9))
  ref = [m for m in read_metrics(full) if "loss" in m]
  assert [m["bad_images"] for m in rows] == [m["bad_images"] for m in ref]
  assert ref[-1]["bad_images"] > 0  # the broken JPEG was drawn, so the count means something


def test_retention_keeps_the_last_n_and_every_kth_and_the_survivors_restore(tmp_path):
  """keep_checkpoints=2, keep_every_steps=4 over steps 1..10 (README: "the last keep_checkpoints plus every
  keep_every_steps-th are kept"): 4, 8, 9 and 10 remain, each restoring its own values."""
  import jax
  import jax.numpy as jnp
  ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    ck.save(step, {"w": jnp.full((3,), float(step))})
  ck.wait()
  assert ck.all_steps() == [4, 8, 9, 10]
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  for step in (4, 8, 9, 10):
    assert float(ck.restore(step, abstract)["w"][0]) == step
  ck.close()


def test_saving_a_replicated_small_state_compiles_nothing_and_a_large_array_restores(tmp_path):
  """Orbax would slice each replicated array across its replicas with one eager `slice` compiled per (shape,
  device), seconds per save of a tiny model on 8 devices: small arrays are written whole. One array of 8 MiB
  (1 MiB per replica) still takes the replica-parallel path; both restore exactly."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.make_mesh((8,), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  # shapes a tiny model has (64-vectors, 64 x 64 matrices): divisible by the 8 replicas, so orbax would slice
  small = {f"w{i}": jax.device_put(jnp.arange(64 ** (1 + i % 2), dtype=jnp.float32).reshape((64,) * (1 + i % 2))
                                   + i, replicated) for i in range(4)}
  large = jax.device_put(jnp.arange(2 << 20, dtype=jnp.float32).reshape(8, -1), replicated)
  jax.block_until_ready((small, large))
  compiles = []

  def listen(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ck.save(1, small)
    ck.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == [], f"{len(compiles)} compiles while saving 4 small replicated arrays"
  ck.save(2, {"large": large})
  ck.wait()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), small)
  assert_trees_equal(ck.restore(1, abstract), small)
  restored = ck.restore(2, {"large": jax.ShapeDtypeStruct(large.shape, large.dtype, sharding=replicated)})
  np.testing.assert_array_equal(np.asarray(restored["large"]), np.asarray(large))
  ck.close()
