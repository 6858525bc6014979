"""Input pipeline: augmentation invariants, determinism, process sharding, exact resume, bad images."""
import os

import numpy as np
import pytest
from PIL import Image

from beitv2_jax.data import masking, pipeline, sources, transforms


def _photo():
  rng = np.random.RandomState(0)
  base = np.linspace(0, 255, 200 * 300 * 3).reshape(200, 300, 3)
  return Image.fromarray(np.clip(base + rng.randn(200, 300, 3) * 20, 0, 255).astype(np.uint8))


def test_mim_views_share_one_crop_box():
  """Both views come from the same box: with the same size and interpolation they are the same pixels, sent
  once (`image`, which the tokenizer reads too); with another interpolation or size the example carries the
  second view, which differs only by resampling."""
  mg = masking.MaskingGenerator((14, 14), 75)
  t = transforms.MIMTrain(224, mg, second_size=224, second_interpolation="bicubic")
  for seed in range(5):
    ex = t(_photo(), np.random.default_rng(seed))
    assert "tokenizer_image" not in ex and t.one_view
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (224, 224, 3)
    assert ex["mask"].shape == (196,) and ex["mask"].sum() == 75
  t2 = transforms.MIMTrain(224, mg, second_interpolation="lanczos")
  ex = t2(_photo(), np.random.default_rng(0))
  np.testing.assert_array_equal(ex["image"], t(_photo(), np.random.default_rng(0))["image"])
  diff = np.abs(ex["image"].astype(int) - ex["tokenizer_image"].astype(int))
  assert 0 < diff.mean() < 6  # same content, other resampling
  ex = transforms.MIMTrain(224, mg, second_size=112)(_photo(), np.random.default_rng(0))
  assert ex["tokenizer_image"].shape == (112, 112, 3)


def test_value_ranges_and_normalisation_constants():
  import jax.numpy as jnp
  from beitv2_jax.data.transforms import imagenet_normalize
  from beitv2_jax.models.vqkd import preprocess
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  np.testing.assert_allclose(np.asarray(imagenet_normalize(jnp.asarray(x)))[0, 0, 0],
                             (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
  assert transforms.IMAGENET_MEAN == (0.485, 0.456, 0.406) and transforms.IMAGENET_STD == (0.229, 0.224, 0.225)
  t01 = jnp.asarray(np.array([0.0, 0.5, 1.0]).reshape(1, 1, 3, 1).repeat(3, -1), jnp.float32)
  np.testing.assert_allclose(np.asarray(preprocess(t01))[0, 0, :, 0], [-1, 0, 1], atol=1e-6)


def test_finetune_transform_outputs():
  t = transforms.FinetuneTrain(32)
  exs = [t(_photo(), np.random.default_rng(s)) for s in range(40)]
  assert all(e["image"].shape == (32, 32, 3) for e in exs)
  erased = [e["erase"].sum() > 0 for e in exs]
  assert 0 < np.mean(erased) < 0.6  # p = 0.25


def test_same_seed_same_batches_and_resume_is_exact():
  src = sources.make_source("digits", "train")
  mg = masking.MaskingGenerator.from_ratio((8, 8), 0.4)
  t = transforms.MIMTrain(32, mg)
  a = iter(pipeline.train_dataset(src, t, 16, seed=3, read_threads=2))
  b = iter(pipeline.train_dataset(src, t, 16, seed=3, read_threads=2))
  for _ in range(3):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  state = a.get_state()
  expected = [next(a) for _ in range(4)]  # crosses an epoch boundary? digits train = 1437 -> no; fine
  c = iter(pipeline.train_dataset(src, t, 16, seed=3, read_threads=2))
  c.set_state(state)
  for e in expected:
    got = next(c)
    for k in e:
      np.testing.assert_array_equal(e[k], got[k])
  other = next(iter(pipeline.train_dataset(src, t, 16, seed=4, read_threads=2)))
  assert not np.array_equal(other["image"], expected[0]["image"])


def test_every_epoch_is_a_fresh_permutation_of_the_source():
  """40 records, 8 per batch: each epoch of 5 batches holds every record once, in a shuffled order that
  changes from epoch to epoch and with the seed, and is the same for the same seed (read with threads)."""
  n = 40
  src = sources.ArraySource(np.zeros((n, 8, 8), np.uint8), np.arange(n), n, "labels_are_indices")

  def epochs(seed, count=3):
    it = iter(pipeline.train_dataset(src, transforms.TokenizerTrain(8), 8, seed=seed, read_threads=2))
    order = np.concatenate([next(it)["label"] for _ in range(count * n // 8)])
    return order.reshape(count, n)

  a = epochs(seed=3)
  for epoch in a:
    assert sorted(epoch.tolist()) == list(range(n))
  assert not np.array_equal(a[0], np.arange(n)) and not np.array_equal(a[0], a[1])
  assert not np.array_equal(a[1], a[2])
  np.testing.assert_array_equal(epochs(seed=3), a)
  assert not np.array_equal(epochs(seed=4)[0], a[0])


@pytest.mark.parametrize("depth", [0, 2])
def test_device_prefetch_saves_the_consumed_position(depth):
  """With batches in flight, the saved state is still 'after the last consumed batch': a resumed iterator
  continues with exactly the batch the step would have taken next."""
  src = sources.make_source("digits", "train")
  t = transforms.EvalTransform(32)
  make = lambda: iter(pipeline.train_dataset(src, t, 8, seed=1, read_threads=0))
  puts = []
  pre = pipeline.DevicePrefetch(make(), lambda b: (puts.append(1), b)[1], depth=depth)
  for _ in range(3):
    next(pre)
  assert len(puts) == 3 + depth  # the next `depth` batches were already sent
  state = pre.get_state()
  want = [next(pre)[0] for _ in range(2)]
  resumed = pipeline.DevicePrefetch(make(), lambda b: b, depth=depth)
  resumed.set_state(state)
  for w in want:
    got, bad = next(resumed)
    assert bad == 0
    np.testing.assert_array_equal(got["image"], w["image"])
  with pytest.raises(ValueError, match="device_prefetch"):
    pipeline.DevicePrefetch(make(), lambda b: b, depth=-1)


def test_process_shards_are_disjoint_and_cover_the_epoch():
  src = sources.ArraySource(np.zeros((64, 8, 8, 3), np.uint8), np.arange(64), 64, "ids")
  t = transforms.EvalTransform(8, crop_pct=1.0)
  seen = []
  for p in range(2):
    it = iter(pipeline.train_dataset(src, t, 16, seed=0, process_index=p, process_count=2, read_threads=0))
    labels = np.concatenate([next(it)["label"] for _ in range(4)])  # 4 x 8 = half the epoch each
    seen.append(labels)
  assert len(set(seen[0]) & set(seen[1])) == 0
  assert sorted(np.concatenate(seen)) == list(range(64))
  # one process reading the whole global batch sees the two processes' rows, in order
  whole = iter(pipeline.train_dataset(src, t, 16, seed=0, process_index=0, process_count=1, read_threads=0))
  first = next(whole)["label"]
  np.testing.assert_array_equal(first, np.concatenate([seen[0][:8], seen[1][:8]]))


def test_eval_batches_cover_every_example_once():
  src = sources.ArraySource(np.zeros((37, 8, 8, 3), np.uint8), np.arange(37), 37, "ids")
  labels = []
  for local in pipeline.eval_batches(src, transforms.EvalTransform(8, 1.0), 16):
    labels += list(local["label"][local["valid"] == 1])
  assert labels == list(range(37))


def _write_folder(root, n_per_class=6, corrupt=True):
  for c in ("cat", "dog"):
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n_per_class):
      Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 48, 3), np.uint8)).save(
          os.path.join(root, c, f"{i}.jpg"))
  if corrupt:
    with open(os.path.join(root, "dog", "broken.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")


def test_corrupt_jpeg_is_replaced_and_reported(tmp_path, caplog):
  root = str(tmp_path / "imgs")
  _write_folder(root)
  src = sources.make_source(f"folder:{root}", "all")
  assert src.classes == ["cat", "dog"] and len(src) == 13
  it = iter(pipeline.train_dataset(src, transforms.TokenizerTrain(32), 13, seed=0, read_threads=0))
  batch = next(it)
  assert batch["bad"].sum() == 1 and batch["image"].shape == (13, 32, 32, 3)
  assert any("broken.jpg" in r.getMessage() for r in caplog.records)


def test_folder_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    sources.make_source(str("folder:" + str(tmp_path / "nope")), "train")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no class sub-folders"):
    sources.make_source(f"folder:{tmp_path / 'empty'}", "train")
  os.makedirs(tmp_path / "noimg" / "a")
  with pytest.raises(ValueError, match="contains no images"):
    sources.make_source(f"folder:{tmp_path / 'noimg'}", "train")
  _write_folder(str(tmp_path / "labels"), corrupt=False)
  with pytest.raises(ValueError, match="not in the label map"):
    sources.folder(str(tmp_path / "labels"), "all", class_names=["cat"])
  with pytest.raises(ValueError, match="unknown dataset"):
    sources.make_source("imagenet", "train")


def test_offline_sources():
  m = sources.make_source("mnist5k", "train")
  v = sources.make_source("mnist5k", "val")
  assert len(m) == 4000 and len(v) == 1000 and m.num_classes == 10
  assert np.bincount(v.labels).tolist() == [100] * 10
  p = sources.make_source("photos", "all")
  assert len(p) >= 15 and p[0]["image"].ndim == 3


def test_digits_are_sklearns_load_digits_scaled_to_bytes():
  """Read from the wheel's file without importing sklearn: the same images (0..16 -> 0..255) and labels as
  load_digits, split 4 : 1 by index."""
  from sklearn.datasets import load_digits
  d = load_digits()
  every = sources.make_source("digits", "all")
  grey = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, -1)  # RGB, as every source
  np.testing.assert_array_equal(every.images, grey)
  np.testing.assert_array_equal(every.labels, d.target)
  val = sources.make_source("digits", "val")
  assert len(val) == 360 and len(sources.make_source("digits", "train")) == 1797 - 360
  np.testing.assert_array_equal(val.labels, d.target[::5])


def test_photos_at_a_reduced_short_side_give_the_same_32px_views():
  """photos:128 stores each photo at a 128 px short side: a 32 px view of the same region (the same box in
  relative coordinates) matches the view cut from the full photo to a few grey levels, as both are
  antialiased bicubic reductions; the aspect ratio is kept. Bad N is refused."""
  from PIL import Image
  full, small = sources.make_source("photos", "train"), sources.make_source("photos:128", "train")
  assert len(full) == len(small) and small.name == "photos:128/train"
  diffs = []
  for i in range(len(full)):
    a, b = full[i]["image"], small[i]["image"]
    assert min(b.shape[:2]) == min(128, min(a.shape[:2])) and abs(a.shape[0] / a.shape[1] - b.shape[0] / b.shape[1]) < 0.02
    for box in ((0.1, 0.2, 0.6, 0.7), (0.0, 0.0, 1.0, 1.0), (0.5, 0.3, 0.8, 0.6)):  # (left, top, right, bottom)
      views = [np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC, box=tuple(
          f * x.shape[1 - j % 2] for j, f in enumerate(box))), np.float32) for x in (a, b)]
      diffs.append(np.abs(views[0] - views[1]).mean())
  print("mean |full - photos:128| per 32 px view, grey levels: max", max(diffs), "mean", np.mean(diffs))
  assert max(diffs) < 4.0 and np.mean(diffs) < 2.0
  with pytest.raises(ValueError, match="photos:N takes the short side"):
    sources.make_source("photos:abc", "train")


def test_tfds_imagenet_source_through_the_pipeline():
  """The tfds path (array_record via as_data_source, no TensorFlow) on tfds' mock imagenet2012 records,
  which have the real feature spec: decoded uint8 images of any size, 1000 classes, 'val' -> 'validation'."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.make_source("tfds:imagenet2012", "train")
    val = sources.make_source("tfds:imagenet2012", "val")
    assert len(src) == 12 and src.num_classes == 1000 and val.name.endswith("/validation")
    mg = masking.MaskingGenerator.from_ratio((8, 8), 0.4)
    batch = next(iter(pipeline.train_dataset(src, transforms.MIMTrain(32, mg), 8, seed=0, read_threads=0)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].max() < 1000 and batch["bad"].sum() == 0
