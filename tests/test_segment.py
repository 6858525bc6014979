"""Task `segment`: UperNet on a BEiT encoder (train/segment.py) end to end on the offline digits_on_photos set:
it learns far past the majority-class baseline, starts from a pretrained encoder with the relative position
tables resized, agrees across device meshes (BatchNorm over the global batch), and refuses a checkpoint of
the wrong kind. (Resume is the loop's, tested for every task whose state has `extra`: the BatchNorm
statistics are checkpointed as the VQ-KD codebook is.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("cv2")

import beitv2_jax  # noqa: E402
from beitv2_jax import api, main as entry, parallel  # noqa: E402
from beitv2_jax.config_defaults import set_dotted  # noqa: E402
from beitv2_jax.data import seg_sources  # noqa: E402
from beitv2_jax.train import seg_ops, segment  # noqa: E402
from helpers import ROOT, assert_meshes_agree, load_config  # noqa: E402

PRETRAINED = os.path.join(ROOT, "tests", "data", "mim_tiny_mnist.safetensors")


def _config(steps=8, **overrides):
  c = load_config("segment_tiny")
  c.total_steps, c.warmup_steps, c.log_every_steps, c.checkpoint_every_steps = steps, 2, 2, 4
  c.data.read_threads, c.data.eval_split = 0, ""
  for k, v in overrides.items():
    c[k] = v
  return c


def test_poly_schedule_is_mmcvs_with_linear_warmup():
  """mmcv PolyLrUpdaterHook(power, min_lr, by_epoch=False) with warmup='linear': the regular lr
  (base - min) (1 - t / T)^p + min, times 1 - (1 - t / W)(1 - ratio) while t < W (a transcription)."""
  def mmcv(t, base=5e-5, total=160_000, warmup=1500, ratio=1e-6, power=1.0, min_lr=0.0):
    regular = (base - min_lr) * (1 - t / total) ** power + min_lr
    if t < warmup:
      k = (1 - t / warmup) * (1 - ratio)
      return regular * (1 - k)
    return regular
  sched = segment.poly_schedule(5e-5, 160_000, 1500, 1e-6, 1.0, 0.0)
  steps = [0, 1, 749, 1499, 1500, 80_000, 159_999, 160_000]
  np.testing.assert_allclose([float(sched(t)) for t in steps], [mmcv(t) for t in steps], rtol=1e-5, atol=1e-15)
  sq = segment.poly_schedule(1.0, 100, 0, power=2.0, min_lr=0.1)
  np.testing.assert_allclose([float(sq(t)) for t in (0, 50, 100)], [1.0, 0.9 * 0.25 + 0.1, 0.1], rtol=1e-6)


def test_segment_learns_far_past_the_majority_baseline(tmp_path):
  """configs/segment_tiny.py for 150 steps from random init (the recipe's whole pipeline: random rescale,
  cat_max_ratio crops, flip, photometric distortion, aux head, layer decay, poly schedule) scored on the
  held-out images by sliding windows: mIoU > 0.8 and aAcc > 0.93 where predicting the commonest class (the
  photo) everywhere scores 0.18 and 0.73. Measured 0.856 / 0.955; labels left unflipped when the image is
  flipped give 0.729 / 0.902 (200 steps: 0.862 / 0.956 and 0.745 / 0.909). The workdir then loads through
  beitv2_jax.load, and its `segment(image)` gives the evaluation's mIoU back."""
  c = load_config("segment_tiny")
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps, c.data.read_threads = 150, 150, 150, 0
  wd = str(tmp_path / "seg")
  metrics = entry.run(c, wd)
  val = seg_sources.digits_on_photos("val")
  held_out = np.concatenate([a.ravel() for a in val.annotations])
  share = np.bincount(held_out, minlength=4) / held_out.size
  baseline_miou, baseline_aacc = share.max() / 4, share.max()
  assert baseline_miou < 0.2 and baseline_aacc < 0.75
  assert metrics["mIoU"] > 0.8 and metrics["aAcc"] > 0.93, (metrics, share)

  # The workdir loads for inference: m.segment(image) is what the evaluation scored, image by image
  m = beitv2_jax.load(wd)
  assert m.kind == "segmenter" and m.img_size == 32
  preds = [m.segment(im) for im in val.images]
  assert all(p.shape == a.shape for p, a in zip(preds, val.annotations))
  totals = sum(np.stack(seg_ops.intersect_and_union(p, a, 4)) for p, a in zip(preds, val.annotations))
  assert seg_ops.segmentation_metrics(totals)["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
  # a 4x larger image is brought back to the trained scale by the test rescale (short side 64), and the class
  # map to its size: it agrees with the 64 px map, upsampled, at the tile borders' few pixels off at most
  big = [np.repeat(np.repeat(im, 4, 0), 4, 1) for im in val.images[:8]]
  agree = np.mean([np.mean(m.segment(b) == np.repeat(np.repeat(p, 4, 0), 4, 1)) for b, p in zip(big, preds)])
  assert agree > 0.95, agree
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  assert m(x).shape == (2, 32, 32, 4)
  with pytest.raises(ValueError, match="expected one uint8 RGB image"):
    m.segment(val.images[0].astype(np.float32))
  with pytest.raises(TypeError, match="no final norm"):
    m.features(x)


def test_pretrained_encoder_loads_with_its_rel_pos_table_resized_per_block(tmp_path):
  """init_from a MIM checkpoint (8x8 grid, shared 15x15 rel-pos table) into a 64 px segmenter (16x16 grid):
  every block's table is the shared one resized to 31x31 (api.convert_kind, as fine-tuning), the other
  encoder weights are the checkpoint's, the necks and heads are fresh; a classifier is refused."""
  c = _config(init_from=PRETRAINED)
  c.model.img_size = c.seg.crop = 64
  task = segment.SegmentTask(c, str(tmp_path / "seg"), parallel.make_mesh(1, 1))
  backbone = jax.jit(task.init_state)(jax.random.PRNGKey(0)).params["backbone"]
  mim = beitv2_jax.load(PRETRAINED)
  expected = api.convert_kind(mim, "classifier", num_classes=0, img_size=64).params
  for i in range(2):
    table = np.asarray(backbone[f"blocks_{i}"]["attn"]["relative_position_bias_table"])
    assert table.shape == (31 * 31 + 3, 2)
    np.testing.assert_array_equal(table, expected[f"blocks_{i}"]["attn"]["relative_position_bias_table"])
  np.testing.assert_array_equal(backbone["patch_embed_proj"]["kernel"],
                                mim.params["backbone"]["patch_embed_proj"]["kernel"])
  np.testing.assert_array_equal(backbone["blocks_1"]["mlp"]["fc2"]["kernel"],
                                mim.params["backbone"]["blocks_1"]["mlp"]["fc2"]["kernel"])

  clf = str(tmp_path / "clf")
  beitv2_jax.save_model(api.convert_kind(mim, "classifier", num_classes=10), clf)
  with pytest.raises(ValueError, match="holds a classifier checkpoint: segmentation starts from a pretrained"):
    segment.SegmentTask(_config(init_from=clf), str(tmp_path / "seg2"), parallel.make_mesh(1, 1))
  with pytest.raises(ValueError, match="is an encoder with .*'depth': 2.*; config.model says .*'depth': 3"):
    deeper = _config(init_from=PRETRAINED)
    deeper.model.depth = 3
    segment.SegmentTask(deeper, str(tmp_path / "seg3"), parallel.make_mesh(1, 1))


def test_segment_steps_on_8_devices_equal_1_device(tmp_path):
  """Three steps on 2 x 4 data x fsdp devices (the batch split 8 ways, the large weights 4 ways) equal the
  1-device steps, BatchNorm statistics included: SyncBN's batch statistics are those of the global batch
  (the 8-way data-only mesh, which other tasks check, is left out for time). Adam's eps is 1e-3 here: at 1e-8 it
  turns the reduction order's rounding in near-zero gradients (the fresh rel-pos tables; conv directions the
  BatchNorm after them normalises away) into up to a tenth of a step (2e-4 at lr 2e-3), and at 1e-6 still into
  5e-4 on other batches. atol 1e-4: the BatchNorm statistics of 128x128 maps summed in another order differ by
  up to 7e-5 relative (seen: 3.7e-5 on a value of 0.53)."""
  c = _config(steps=4, warmup_steps=0)
  c.optim.eps = 1e-3
  task = segment.SegmentTask(c, str(tmp_path / "task"), parallel.make_mesh(1, 1))
  it = iter(task.train_data())
  batches = [{k: v for k, v in next(it).items() if k != "bad"} for _ in range(3)]
  init = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  assert_meshes_agree(task, batches, init, fsdp_min_size=4096, atol=1e-4, check_extra=True, data_mesh=False)


def test_segment_flop_count_is_xlas(tmp_path):
  """The segmenter's model FLOPs (backbone, necks, UPerHead, auxiliary head; forward + 2x backward), what MFU
  and beitv2_jax.aot report, are XLA's count of the compiled step less its elementwise work (norms, resizes,
  GELU, the optimizer): 0-8% below it (4% measured; leaving out the auxiliary head adds 7%)."""
  from beitv2_jax.train import loop
  c = _config(steps=4)
  c.model.aux_channels = 128  # every term >= 5% of the count, so that leaving one out shows
  mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
  task = segment.SegmentTask(c, str(tmp_path), mesh)
  abstract = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
  shardings, _ = loop.placement(task, abstract)
  b = c.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((b, 32, 32), jnp.uint8),
           "valid_pixels": jax.ShapeDtypeStruct((b, 32, 32), jnp.uint8)}
  cost = loop.jit_step(task.train_step, shardings, mesh).lower(abstract, batch, task.frozen).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 1.0 <= cost["flops"] / (b * task.flops_per_example) < 1.08, cost["flops"] / (b * task.flops_per_example)


def test_bad_segmentation_settings_are_one_line_errors(tmp_path):
  """Block indices outside the encoder, a model field UperNet does not take, a crop that is not the
  backbone's size, windows that leave gaps, an empty rescale range: one-line errors naming the setting, the
  config checks before the workdir is touched."""
  mesh = parallel.make_mesh(1, 1)
  bad = _config()
  bad.model.out_indices = (0, 0, 1, 2)
  with pytest.raises(ValueError, match=r"out_indices=\(0, 0, 1, 2\): expected four block indices in \[0, 2\)"):
    segment.SegmentTask(bad, str(tmp_path / "a"), mesh)
  stray = _config()
  stray.model.final_norm = "fc_norm"
  with pytest.raises(ValueError, match=r"config.model has fields this model does not take: \['final_norm'\]"):
    segment.SegmentTask(stray, str(tmp_path / "b"), mesh)
  for field, value, says in (("seg.crop", 48, "seg.crop=48: must equal model.img_size=32"),
                             ("seg.stride", 0, r"seg.stride=0: must be in \[1, seg.crop=32\]"),
                             ("seg.ratio_min", 3.0, r"seg.ratio_min=3.0: must be in \(0, seg.ratio_max=2.0\]")):
    c = _config()
    set_dotted(c, field, value)
    with pytest.raises(ValueError, match=says):
      entry.run(c, str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "c")
