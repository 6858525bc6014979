"""MIM pretraining: aggregation-head wiring, loss against a direct computation, 8 vs 1 devices, load/export,
the tokenizer stage main runs first."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import beitv2_jax
from beitv2_jax import main as entry, parallel
from beitv2_jax.models.mim import BEiTForMIM, backbone_defaults, agg_drop_path_rates
from beitv2_jax.models.vit import Block
from beitv2_jax.train.pretrain import PretrainTask
from beitv2_jax.train.writer import read_metrics
from helpers import (assert_meshes_agree, assert_resume_is_bit_identical, params_of, pretrain_config,
                     tokenizer_config)


def _staged_config(pretrain_steps):
  c = pretrain_config("", steps=pretrain_steps)
  c.tokenizer = tokenizer_config(steps=20)  # the tiny digits tokenizer: 64 codes
  return c


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
  """A pretraining run with an empty tokenizer_path, as `python -m beitv2_jax.main` runs it: stage 1 trains
  config.tokenizer into WORKDIR/tokenizer (the tokenizer every test here uses), stage 2 pretrains 2 steps."""
  wd = tmp_path_factory.mktemp("staged")
  entry.run(_staged_config(2), str(wd))
  return wd


@pytest.fixture(scope="module")
def tokenizer_dir(staged_run):
  return str(staged_run / "tokenizer")


def _tiny_mim(depth=3, early=1):
  return BEiTForMIM(backbone=backbone_defaults(img_size=32, patch_size=4, embed_dim=64, depth=depth, num_heads=2,
                                               init_values=0.1), vocab_size=64, early_layers=early)


def _inputs(b=2, n=64, m=26, seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(b, 32, 32, 3), jnp.float32)
  mask = np.zeros((b, n), bool)
  for i in range(b):
    mask[i, rng.choice(n, m, replace=False)] = True
  return x, jnp.asarray(mask)


def test_aggregation_head_reads_last_cls_and_early_patches():
  model = _tiny_mim(depth=3, early=1)
  x, mask = _inputs()
  params = model.init(jax.random.key(0), x, mask, 26)["params"]

  def agg_input(perturb_block=None, where="patches"):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      name = context.module.name
      if name == "cls_pt_layers_0" and context.method_name == "__call__":
        seen["x"] = args[0]
      out = next_fun(*args, **kwargs)
      if name == perturb_block and context.method_name == "__call__" and isinstance(context.module, Block):
        sl = (slice(None), slice(1, None)) if where == "patches" else (slice(None), slice(0, 1))
        out = out.at[sl].add(1.0)
      return out

    with nn.intercept_methods(interceptor):
      model.apply({"params": params}, x, mask, 26)
    return np.asarray(seen["x"])

  base = agg_input()
  assert base.shape == (2, 65, 64)
  # patch states after block `early_layers` (blocks_1, blocks_2 outputs): the patch part is unchanged
  for blk in ("blocks_1", "blocks_2"):
    np.testing.assert_array_equal(agg_input(blk, "patches")[:, 1:], base[:, 1:])
  # the patch states output by block early_layers (blocks_0, 1-based 1) are what the head reads
  assert not np.allclose(agg_input("blocks_0", "patches")[:, 1:], base[:, 1:])
  # the last block's CLS (before the final norm) is the head's CLS
  np.testing.assert_allclose(agg_input("blocks_2", "cls")[:, :1], base[:, :1] + 1.0, atol=1e-5)
  np.testing.assert_array_equal(agg_input("blocks_2", "cls")[:, 1:], base[:, 1:])


def test_aggregation_drop_path_rates_match_the_spec():
  np.testing.assert_allclose(agg_drop_path_rates(0.1, 12, 9, 2), [0.0818, 0.0909], atol=1e-4)
  np.testing.assert_allclose(agg_drop_path_rates(0.1, 24, 21, 2), [0.0913, 0.0957], atol=1e-4)


def test_official_init_of_the_aggregation_blocks():
  model = _tiny_mim()
  x, mask = _inputs()
  p = model.fix_init(model.init(jax.random.key(0), x, mask, 26)["params"])
  assert np.abs(np.asarray(p["cls_pt_layers_0"]["mlp"]["fc1"]["bias"])).max() > 0.01  # PyTorch default init
  assert np.abs(np.asarray(p["backbone"]["blocks_0"]["mlp"]["fc1"]["bias"])).max() == 0.0
  assert np.all(np.asarray(p["backbone"]["rel_pos_bias"]["relative_position_bias_table"]) == 0)
  lm = np.asarray(p["lm_head"]["kernel"])
  assert np.abs(lm).max() <= 0.02 + 1e-7  # trunc at +-1 std


def _direct_loss(task, params, batch, frozen):
  """The loss written out with numpy from the pieces: tokenizer ids, masked gather, two CE terms."""
  from beitv2_jax.models.vqkd import VQKD
  images01 = np.asarray(batch.get("tokenizer_image", batch["image"]), np.float32) / 255.0
  z = np.asarray(task.tokenizer.module.apply({"params": frozen["params"]}, jnp.asarray(images01), method=VQKD.encode))
  ids = np.argmax(z @ np.asarray(frozen["codebook"]).T, -1)
  mask = np.asarray(batch["mask"])
  labels = np.stack([ids[i][mask[i]] for i in range(len(ids))])  # row-major masked positions
  x = (np.asarray(batch["image"], np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  main, agg = task.model.apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.asarray(mask), task.num_masked)

  def ce(logits):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.mean(lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0])
  return ce(main) + ce(agg)


def _task_and_batch(tokenizer_dir, tmp_path, mesh):
  cfg = pretrain_config(tokenizer_dir, steps=4)
  task = PretrainTask(cfg, str(tmp_path / "pt"), mesh)
  local = next(iter(task.train_data()))
  local.pop("bad")
  return task, local


def test_loss_equals_direct_computation(tokenizer_dir, tmp_path):
  mesh = parallel.make_mesh(1, 1)
  task, local = _task_and_batch(tokenizer_dir, tmp_path, mesh)
  state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  direct = _direct_loss(task, state.params, local, task.frozen)
  _, metrics = jax.jit(task.train_step)(state, {k: jnp.asarray(v) for k, v in local.items()}, task.frozen)
  np.testing.assert_allclose(float(metrics["loss"]), direct, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_1"]) + float(metrics["loss_2"]), direct, rtol=1e-5)


def test_cross_entropy_and_hits_equal_optax_and_argmax_and_the_backward_has_no_scatter():
  """pretrain.cross_entropy_and_hits, the MIM heads' loss and accuracy: optax's cross-entropy to the bit, the
  argmax's hits on bfloat16 logits with tied maxima (argmax takes the first), optax's gradient, and a backward
  with no scatter into the (..., V) logits (what the one-hot form is for)."""
  import optax
  from beitv2_jax.train.pretrain import cross_entropy_and_hits
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 5, 40) * 3, jnp.bfloat16)  # bf16: ties at the row maximum happen
  logits = logits.at[0, 0, 7].set(logits[0, 0].max()).at[0, 0, 3].set(logits[0, 0].max())  # a tie at 3 and 7
  labels = jnp.asarray(rng.randint(0, 40, (3, 5)), jnp.int32).at[0, 0].set(7).at[0, 1].set(
      jnp.argmax(logits[0, 1]))
  ce, hits = cross_entropy_and_hits(logits, labels)
  f32 = logits.astype(jnp.float32)
  np.testing.assert_array_equal(ce, optax.softmax_cross_entropy_with_integer_labels(f32, labels))
  np.testing.assert_array_equal(hits, (jnp.argmax(f32, -1) == labels).astype(jnp.float32))
  assert hits[0, 0] == 0 and hits[0, 1] == 1  # the tie goes to index 3, not the label 7

  def ours(x):
    return jnp.sum(cross_entropy_and_hits(x, labels)[0] * jnp.arange(1.0, 16.0).reshape(3, 5))

  def reference(x):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, labels) * jnp.arange(1.0, 16.0).reshape(3, 5))

  np.testing.assert_allclose(jax.grad(ours)(f32), jax.grad(reference)(f32), rtol=0, atol=1e-6)
  assert "scatter" in str(jax.make_jaxpr(jax.grad(reference))(f32))  # what the reference's backward does
  assert "scatter" not in str(jax.make_jaxpr(jax.grad(ours))(f32))


def test_train_steps_on_8_devices_equal_1_device_with_real_updates(tokenizer_dir, tmp_path):
  """Three whole steps (tokenizer targets + student fwd/bwd + AdamW, learning rate > 0 from step 0) on an
  8-device data mesh and on a 2 x 4 data x fsdp mesh equal the 1-device steps on the same global batches
  (loss and parameters to 2e-5; the parameters move by far more). Under fsdp every parameter and Adam
  moment of >= 1024 elements is split over `fsdp`, so the sharding really shards."""
  cfg = pretrain_config(tokenizer_dir, steps=4, warmup_steps=0)
  task = PretrainTask(cfg, str(tmp_path / "pt"), parallel.make_mesh(1, 1))
  it = iter(task.train_data())
  batches = [{k: v for k, v in next(it).items() if k != "bad"} for _ in range(3)]
  assert_meshes_agree(task, batches, jax.jit(task.init_state)(jax.random.PRNGKey(0)), fsdp_min_size=1024)


def test_pretrain_resume_is_bit_identical(tokenizer_dir, tmp_path):
  """MIM pretraining stopped at step 6 and resumed to 8 == 8 steps in one go (state and metrics exact)."""
  assert_resume_is_bit_identical(pretrain_config(tokenizer_dir, steps=8), tmp_path)


def test_mim_checkpoint_loads_and_exports_to_the_official_layout(tokenizer_dir, tmp_path):
  wd = str(tmp_path / "pt")
  entry.run(pretrain_config(tokenizer_dir, steps=4), wd)
  m = beitv2_jax.load(wd)
  assert m.kind == "mim"
  x, mask = _inputs(b=2, n=64, m=26)
  main, agg = m(np.asarray(x), np.asarray(mask))
  assert main.shape == (2, 26, 64) and agg.shape == (2, 26, 64)
  # execution fields as load overrides go to the MIM model, which hands them to its backbone
  fast = beitv2_jax.load(wd, attention="xla", residual_dtype="bfloat16", scan=True)
  assert fast.module.residual_dtype == "bfloat16" and fast.module.vit_module().residual_dtype == "bfloat16"
  np.testing.assert_allclose(np.asarray(fast(np.asarray(x), np.asarray(mask))[0]), np.asarray(main), atol=0.05)
  sd = beitv2_jax.export_state_dict(m, str(tmp_path / "pt.safetensors"))
  assert "rel_pos_bias.relative_position_bias_table" in sd and "cls_pt_layers.1.mlp.fc2.weight" in sd
  assert "lm_head.weight" in sd and "mask_token" in sd and not any(k.startswith("backbone") for k in sd)
  again = beitv2_jax.load(str(tmp_path / "pt.safetensors"))
  main2, agg2 = again(np.asarray(x), np.asarray(mask))
  np.testing.assert_allclose(np.asarray(main2), np.asarray(main), atol=1e-5)
  # and as a classifier: the shared table is copied into every block
  clf = beitv2_jax.load(wd, kind="classifier", num_classes=10)
  t = np.asarray(m.params["backbone"]["rel_pos_bias"]["relative_position_bias_table"])
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(clf.params[f"blocks_{i}"]["attn"]["relative_position_bias_table"]), t)
  assert clf(np.asarray(x)).shape == (2, 10)



def test_an_empty_tokenizer_path_trains_the_tokenizer_stage_first_and_a_rerun_reuses_it(staged_run, tmp_path):
  """Stage 1 then stage 2 (the `staged_run` fixture). Building a PretrainTask never trains (an empty path is
  refused, nothing written); the rerun continues stage 2 and only reloads stage 1."""
  with pytest.raises(ValueError, match="tokenizer_path is empty"):
    PretrainTask(_staged_config(2), str(tmp_path / "pt"), parallel.make_mesh(1, 1))
  assert not (tmp_path / "pt").exists()
  tok = str(staged_run / "tokenizer")
  assert int(params_of(tok)["step"]) == 20 and int(params_of(str(staged_run))["step"]) == 2
  with open(staged_run / "config.json") as f:
    assert json.load(f)["config"]["tokenizer_path"] == tok
  assert beitv2_jax.load(str(staged_run)).module.vocab_size == 64  # stage 2's vocabulary: stage 1's codebook
  tokenizer_rows = read_metrics(tok)
  written = os.stat(os.path.join(tok, "checkpoints", "20")).st_mtime_ns
  entry.run(_staged_config(4), str(staged_run))
  assert int(params_of(str(staged_run))["step"]) == 4
  assert read_metrics(tok) == tokenizer_rows and int(params_of(tok)["step"]) == 20
  assert os.stat(os.path.join(tok, "checkpoints", "20")).st_mtime_ns == written  # reloaded, not trained again
