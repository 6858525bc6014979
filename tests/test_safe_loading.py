"""Loading never runs code from a file; bad files and bad inputs end in one clear line (issue: reliability
and security). Every entry point that reads a checkpoint: beitv2_jax.load, the convert CLI, init_from
(fine-tuning) and tokenizer_path (pretraining)."""
import argparse
import os
import shlex
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import beitv2_jax
from beitv2_jax import api
from beitv2_jax.convert import __main__ as convert_cli
from beitv2_jax import main as entry
from beitv2_jax.models import quantizer
from beitv2_jax.models.mim import BEiTForMIM, backbone_defaults
from beitv2_jax.models.vit import VisionTransformer
from beitv2_jax.models.vqkd import VQKD, decoder_defaults, encoder_defaults
from helpers import ROOT, load_config, pretrain_config

torch = pytest.importorskip("torch")

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
CODES = 64
GRID = 8  # 32 px / 4 px patches: N = 64


class Payload:
  """Pickles as os.system('touch MARKER'): what a malicious .pth carries."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(self.marker)}",))


# ------------------------------------------------------------------------------------------------
# Tiny models, built once per module
# ------------------------------------------------------------------------------------------------
def _init(module, *args):
  """Random parameters of `module`'s shapes, non-zero everywhere (a real init zeroes biases and rel-pos
  tables) so that comparisons mean something; drawn by numpy from the shapes alone, which takes a fraction
  of the seconds a compiled init takes on 2 cores."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args)["params"])
  rng = np.random.RandomState(1)

  def draw(path, a):
    centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # LayerNorm gains
    return jnp.asarray(centre + 0.05 * rng.standard_normal(a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def classifier():
  cfg = dict(TINY, num_classes=10, init_values=0.1)
  module = VisionTransformer(**cfg)
  params = _init(module, jnp.zeros((1, 32, 32, 3)))
  return api.Model("classifier", module, params, cfg)


@pytest.fixture(scope="module")
def tokenizer():
  cfg = dict(encoder=encoder_defaults(**TINY), decoder=decoder_defaults(GRID, embed_dim=64, depth=1, num_heads=2),
             codebook_size=CODES, codebook_dim=16, teacher_dim=32)
  module = VQKD(**cfg)
  params = _init(module, jnp.zeros((1, 32, 32, 3)))
  codebook = np.asarray(quantizer.new_codebook(jax.random.key(2), CODES, 16).embedding)
  return api.Model("tokenizer", module, params, cfg, codebook)


@pytest.fixture(scope="module")
def mim():
  cfg = dict(backbone=backbone_defaults(**TINY, init_values=0.1), vocab_size=CODES, early_layers=1)
  module = BEiTForMIM(**cfg)
  mask = jnp.zeros((1, GRID * GRID), bool).at[:, :1].set(True)
  params = _init(module, jnp.zeros((1, 32, 32, 3)), mask, 1)
  return api.Model("mim", module, params, cfg)


def _torch_sd(model):
  return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in api.export_state_dict(model, "").items()}


def _payload_file(tmp_path, variant, model):
  """(path, marker): the payload as the whole file, or hidden beside `model`'s real weights."""
  marker = tmp_path / f"pwned_{variant}"
  path = str(tmp_path / f"{variant}.pth")
  obj = Payload(marker) if variant == "whole" else {"model": _torch_sd(model), "notes": Payload(marker)}
  torch.save(obj, path)
  return path, marker


def _assert_refused(message, path, marker):
  assert not marker.exists(), "the payload ran"
  assert path in message and os.system.__module__ + ".system" in message and "safetensors" in message, message
  assert "\n" not in message.strip(), message


# ------------------------------------------------------------------------------------------------
# A payload never runs, on every entry point
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["whole", "beside"])
def test_payload_never_runs_through_load(tmp_path, classifier, variant):
  path, marker = _payload_file(tmp_path, variant, classifier)
  with pytest.raises(ValueError) as e:
    beitv2_jax.load(path)
  _assert_refused(str(e.value), path, marker)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "beitv2_jax.convert", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _error_lines(stderr):
  return [line for line in stderr.strip().splitlines() if line.strip()]


@pytest.mark.parametrize("variant", ["whole", "beside"])
def test_payload_never_runs_through_the_convert_cli(tmp_path, classifier, variant):
  path, marker = _payload_file(tmp_path, variant, classifier)
  r = _cli("--src", path, "--dst", str(tmp_path / "out"))
  assert r.returncode == 1, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  _assert_refused(lines[0], path, marker)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["whole", "beside"])
def test_payload_never_runs_through_init_from(tmp_path, mim, variant):
  path, marker = _payload_file(tmp_path, variant, mim)
  c = load_config("finetune_tiny")
  c.data.name, c.data.read_threads, c.total_steps, c.init_from = "digits", 0, 2, path
  with pytest.raises(ValueError) as e:
    entry.run(c, str(tmp_path / "ft"))
  _assert_refused(str(e.value), path, marker)
  assert not (tmp_path / "ft" / "checkpoints").exists()  # refused before any training


@pytest.mark.parametrize("variant", ["whole", "beside"])
def test_payload_never_runs_through_tokenizer_path(tmp_path, tokenizer, variant):
  path, marker = _payload_file(tmp_path, variant, tokenizer)
  with pytest.raises(ValueError) as e:
    entry.run(pretrain_config(path, steps=2), str(tmp_path / "pt"))
  _assert_refused(str(e.value), path, marker)
  assert not (tmp_path / "pt" / "checkpoints").exists()


def test_official_checkpoint_with_args_loads_but_nothing_else_is_allowed(tmp_path, classifier):
  """The official scripts save {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}: that
  loads with identical weights; the same file with one more global beside the weights does not."""
  official = {"model": _torch_sd(classifier), "epoch": 299,
              "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.05, "params": [0, 1]}]},
              "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
              "args": argparse.Namespace(model="beit_base_patch16_224", lr=5e-4, input_size=224, layer_decay=0.65)}
  path = str(tmp_path / "checkpoint-299.pth")
  torch.save(official, path)
  back = beitv2_jax.load(path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params,
               classifier.params)
  marker = tmp_path / "pwned"
  bad = str(tmp_path / "checkpoint-300.pth")
  torch.save(dict(official, extra=Payload(marker)), bad)
  with pytest.raises(ValueError) as e:
    beitv2_jax.load(bad)
  _assert_refused(str(e.value), bad, marker)


# ------------------------------------------------------------------------------------------------
# Files that are not checkpoints: one line naming the file
# ------------------------------------------------------------------------------------------------
def _write_bad(tmp_path, name):
  path = str(tmp_path / name)
  if name == "list.pth":
    torch.save([torch.zeros(3)], path)
  elif name == "no_tensors.pth":
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=1.0)}, path)
  else:
    with open(path, "w") as f:
      f.write("" if name.startswith("empty") else "this is a text file, not weights\n")
  return path


BAD_FILES = {"empty.pth": "is empty (0 bytes)", "text.pth": "not a valid PyTorch checkpoint",
             "text.safetensors": "not a valid .safetensors", "garbage.npz": "not a .npz",
             "list.pth": "not a state dict", "no_tensors.pth": "no tensors"}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_one_clear_error_through_load(tmp_path, name):
  path = _write_bad(tmp_path, name)
  with pytest.raises(ValueError) as e:
    beitv2_jax.load(path)
  msg = str(e.value)
  assert path in msg and BAD_FILES[name] in msg and "\n" not in msg, msg
  chain = "".join(traceback.format_exception(e.value))
  assert "During handling" not in chain and "direct cause" not in chain, chain  # no torch/numpy traceback


def _convert_in_process(capsys, *args):
  """(exit code, stderr) of the convert CLI's main as the interpreter would report them."""
  with pytest.raises(SystemExit) as e:
    convert_cli.main(list(args))
  code, err = e.value.code, capsys.readouterr().err
  return (1, err + code + "\n") if isinstance(code, str) else (code, err)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_one_line_from_the_convert_cli(tmp_path, capsys, name):
  path = _write_bad(tmp_path, name)
  code, err = _convert_in_process(capsys, "--src", path, "--dst", str(tmp_path / "out"))
  lines = _error_lines(err)
  assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0], err


def test_bad_file_as_a_real_subprocess(tmp_path):
  path = _write_bad(tmp_path, "text.safetensors")
  r = _cli("--src", path, "--dst", str(tmp_path / "out"))
  lines = _error_lines(r.stderr)
  assert r.returncode == 1 and len(lines) == 1 and path in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_convert_cli_refuses_bad_options_in_one_line(tmp_path, capsys, classifier):
  src = str(tmp_path / "clf.safetensors")
  api.export_state_dict(classifier, src)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text('{"kind": "detector", "model": {}}')
  cases = [  # (argv, exit code, words the line must hold)
      (["--src", str(tmp_path / "missing.pth"), "--dst", str(tmp_path / "o1")], 1, ["missing.pth"]),
      (["--src", src, "--dst", str(tmp_path / "o2"), "--format", "onnx"], 2, ["--format", "onnx"]),
      (["--src", src, "--dst", str(tmp_path / "o3.txt"), "--format", "timm"], 1, ["o3.txt", ".safetensors"]),
      (["--src", src, "--dst", str(tmp_path / "o4.safetensors")], 1, ["o4.safetensors", "--format timm"]),
      (["--src", str(run_dir), "--dst", str(tmp_path / "o5")], 1, ["detector", "config.json"]),
  ]
  for argv, want, words in cases:
    code, err = _convert_in_process(capsys, *argv)
    lines = _error_lines(err)
    assert code == want and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert all(w in lines[0] for w in words), (argv, err)
  assert not any((tmp_path / f"o{i}").exists() for i in (1, 2)) and not (tmp_path / "o4.safetensors").exists()
  convert_cli.main(["--src", src, "--dst", str(tmp_path / "ok.pth"), "--format", "timm"])  # good input still works
  assert os.path.exists(tmp_path / "ok.pth")


# ------------------------------------------------------------------------------------------------
# The public API refuses inputs that would give silently wrong answers
# ------------------------------------------------------------------------------------------------
def _refused(fn, arg, *needles):
  with pytest.raises(ValueError) as e:
    fn(arg)
  msg = str(e.value)
  assert "\n" not in msg and all(n in msg for n in needles), msg


def test_classifier_images_must_be_normalised_nhwc_at_the_model_size(classifier):
  m = classifier
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  ref = np.asarray(m.module.apply({"params": m.params}, x)["logits"])
  np.testing.assert_allclose(np.asarray(m(x)), ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda v: m(v))(x)), ref, atol=1e-5)  # traced: still works
  pixels = (np.random.RandomState(1).rand(2, 32, 32, 3) * 255).astype(np.uint8)
  _refused(m, pixels, "images", "uint8", "(x/255 - mean)/std")
  _refused(m, pixels.astype(np.float32), "images", "ImageNet-normalised", "[0, 255]", "(x/255 - mean)/std")
  _refused(m, np.zeros((2, 64, 64, 3), np.float32), "images", "(B, 32, 32, 3)", "(2, 64, 64, 3)")
  _refused(m, x.transpose(0, 3, 1, 2), "images", "(B, 32, 32, 3)", "(2, 3, 32, 32)", "NCHW")
  _refused(m.features, pixels.astype(np.float32), "images", "[0, 255]")


def test_tokenizer_encode_takes_unit_floats(tokenizer):
  m = tokenizer
  x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  ref = np.asarray(api._jit_encode(m.module)(m.params, m.codebook, jnp.asarray(x)))  # what encode did before
  np.testing.assert_array_equal(np.asarray(m.encode(x)), ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: m.encode(v))(x)), ref)
  # A rounding overshoot is still [0, 1] data: the tokenizer's preprocess would read max > 1 as [0, 255].
  over = x.copy()
  over[0, 0, 0, 0] = 1.005
  np.testing.assert_array_equal(np.asarray(m.encode(over)), np.asarray(m.encode(np.clip(over, 0, 1))))
  pixels = (x * 255).astype(np.uint8)
  _refused(m.encode, pixels, "images01", "uint8", "[0, 1]")
  _refused(m.encode, pixels.astype(np.float32), "images01", "[0, 1]", "255")
  _refused(m.encode, x - 0.5, "images01", "[0, 1]")
  _refused(m.encode, np.zeros((2, 3, 32, 32), np.float32), "images01", "(B, 32, 32, 3)", "NCHW")
  _refused(m.features, pixels.astype(np.float32), "images01", "[0, 1]")


def test_tokenizer_decode_takes_ids_inside_the_codebook(tokenizer):
  m = tokenizer
  ids = np.random.RandomState(0).randint(0, CODES, (2, GRID * GRID)).astype(np.int32)
  ref = np.asarray(api._jit_decode(m.module)(m.params, m.codebook, jnp.asarray(ids)))  # what decode did before
  np.testing.assert_array_equal(np.asarray(m.decode(ids)), ref)
  np.testing.assert_array_equal(np.asarray(m.decode(jnp.asarray(ids))), ref)
  for bad in (CODES, 10 ** 6, -1):
    out = ids.astype(np.int64)
    out[1, 5] = bad
    _refused(m.decode, out, "ids", f"[0, {CODES})", str(bad))
  _refused(m.decode, ids.astype(np.float32), "ids", "integer", "float32")
  _refused(m.decode, ids[:, :-1], "ids", f"(B, {GRID * GRID})", "(2, 63)")
  _refused(m.decode, ids.reshape(2, GRID, GRID), "ids", f"(B, {GRID * GRID})", "(2, 8, 8)")


def test_mim_mask_must_match_the_images_and_the_grid(mim):
  m = mim
  rng = np.random.RandomState(0)
  x = rng.randn(2, 32, 32, 3).astype(np.float32)
  mask = np.zeros((2, GRID * GRID), bool)
  for i in range(2):
    mask[i, rng.choice(GRID * GRID, 10, replace=False)] = True
  ref = api._jit_mim(m.module, 10)(m.params, jnp.asarray(x), jnp.asarray(mask))  # what m(x, mask) did before
  for same in (mask, mask.reshape(2, GRID, GRID), mask.astype(np.int32), jnp.asarray(mask)):
    for a, b in zip(m(x, same), ref):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _refused(lambda k: m(x, k), mask[:, :-1], "mask", "(2, 64)", "(2, 8, 8)", "(2, 63)")
  _refused(lambda k: m(x, k), np.concatenate([mask, mask[:1]]), "mask", "(2, 64)", "(3, 64)")
  _refused(lambda k: m(x, k), mask.T, "mask", "(2, 64)", "(64, 2)")
  _refused(lambda k: m(x, k), np.where(mask, 0.5, 0.0), "mask", "bool or 0/1", "0.5")
  _refused(lambda v: m(v, mask), (x * 60).astype(np.float32), "images", "[0, 255]")
  _refused(lambda v: m(v, mask), np.zeros((2, 64, 64, 3), np.float32), "images", "(B, 32, 32, 3)")
