"""Task `robust`: a classifier on ImageNet-A / -R (scored over their 200 classes, as the official
--robust_test), ImageNet-Sketch and ImageNetV2 (all 1000), through tfds; here on tfds-mocked sets whose
images and labels the test chooses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import beitv2_jax
from beitv2_jax import main
from beitv2_jax.config_defaults import base
from beitv2_jax.data import imagenet_subsets, transforms
from beitv2_jax.models.vit import VisionTransformer
from helpers import load_config


def test_imagenet_a_and_r_classes_are_the_official_ones():
  """The 200-class masks over ImageNet-1k's label order: their first indices as the datasets' authors
  publish them (`indices_in_1k`), 200 each, and names that are not ImageNet wnids refused."""
  names = imagenet_subsets.imagenet_class_names()
  assert len(names) == 1000 and names == sorted(names) and names[0] == "n01440764"
  a, r = imagenet_subsets.class_mask("imagenet_a", names), imagenet_subsets.class_mask("imagenet_r", names)
  assert a.sum() == 200 and r.sum() == 200
  assert list(np.flatnonzero(a)[:10]) == [6, 11, 13, 15, 17, 22, 23, 27, 30, 37]
  assert list(np.flatnonzero(r)[:10]) == [1, 2, 4, 6, 8, 9, 11, 13, 22, 23]
  assert list(np.flatnonzero(r)[-3:]) == [981, 983, 988] and np.flatnonzero(a)[-1] == 988
  assert [imagenet_subsets.subset_of(n) for n in ("tfds:imagenet_a", "tfds:imagenet_r:/data", "folder:/d/ImageNet-R/",
                                                  "tfds:imagenet_sketch", "tfds:imagenet_v2")] == [
      "imagenet_a", "imagenet_r", "imagenet_r", None, None]
  with pytest.raises(ValueError, match="not in the label names"):
    imagenet_subsets.class_mask("imagenet_a", [f"class{i}" for i in range(1000)])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """A tiny random 1000-class classifier, saved where `init_from` reads it."""
  cfg = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=1000, init_values=0.1)
  m = VisionTransformer(**cfg)
  params = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  model = beitv2_jax.Model("classifier", m, params, cfg)
  path = str(tmp_path_factory.mktemp("clf"))
  beitv2_jax.save_model(model, path)
  return model, path


def _images(seed, n=12):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (int(rng.integers(36, 60)), int(rng.integers(36, 60)), 3), dtype=np.uint8)
          for _ in range(n)]


def _logits(model, images):
  t = transforms.EvalTransform(32, 0.875)
  from PIL import Image
  x = np.stack([t(Image.fromarray(im), None)["image"] for im in images])
  return np.asarray(model(transforms.imagenet_normalize(jnp.asarray(x))))


def _labelled(model, images, mask, hit_every=2, seed=0):
  """Labels the classifier gets right (its arg-max over `mask`) for every `hit_every`-th image, and a
  different class of the mask for the others: top-1 over the mask is exactly 1 / hit_every."""
  logits = np.where(mask, _logits(model, images), -np.inf)
  pred = logits.argmax(-1)
  rng = np.random.default_rng(seed)
  labels = []
  for i, p in enumerate(pred):
    other = rng.choice(np.flatnonzero(mask & (np.arange(len(mask)) != p)))
    labels.append(int(p) if i % hit_every == 0 else int(other))
  return [{"image": im, "label": lab} for im, lab in zip(images, labels)], pred


def _config(path, datasets, batch=8):
  c = base("robust")
  c.init_from, c.batch_size, c.robust.datasets = path, batch, datasets
  return c


def test_robust_task_scores_imagenet_a_over_its_200_classes(classifier, tmp_path):
  """On mocked ImageNet-A and ImageNet-Sketch (12 images each, batches of 8: a padded last batch): top-1
  is exactly the rate the labels were built for, with ImageNet-A's arg-max over its 200 classes only
  (unmasked, the random classifier's arg-max lies mostly outside them) and Sketch's over all 1000."""
  model, path = classifier
  names = imagenet_subsets.imagenet_class_names()
  a_mask = imagenet_subsets.class_mask("imagenet_a", names)
  sets = {"imagenet_a": _labelled(model, _images(1), a_mask, 2),
          "imagenet_sketch": _labelled(model, _images(2), np.ones(1000, bool), 3)}
  unmasked = _logits(model, _images(1)).argmax(-1)
  assert np.mean(unmasked == sets["imagenet_a"][1]) < 0.5  # the mask changes the answer: a no-op mask fails below

  def as_data_source(builder, split, *args, **kwargs):
    assert split == "test"
    return sets[builder.name][0]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    result = main.run(_config(path, "tfds:imagenet_a,tfds:imagenet_sketch"), str(tmp_path / "w"))
  assert result["imagenet_a/top1"] == pytest.approx(6 / 12) and result["imagenet_a/images"] == 12
  assert result["imagenet_sketch/top1"] == pytest.approx(4 / 12) and result["imagenet_sketch/images"] == 12
  assert result["imagenet_a/top5"] >= result["imagenet_a/top1"]
  import json
  logged = json.loads(open(tmp_path / "w" / "metrics.jsonl").read().splitlines()[-1])
  assert logged["imagenet_a/top1"] == pytest.approx(0.5)


def test_robust_task_refuses_what_it_cannot_score(classifier, tmp_path):
  """Labels outside ImageNet-A's 200 classes, a checkpoint that is not a classifier, a classifier with
  another class count: one-line errors naming the problem."""
  model, path = classifier
  images = _images(3, 4)
  outside = [{"image": im, "label": 0} for im in images]  # class 0 (tench) is not in ImageNet-A
  with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, *a, **k: outside):
    with pytest.raises(ValueError, match="batch_size=4 does not split evenly"):
      main.run(_config(path, "tfds:imagenet_a", batch=4), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="labelled outside the 200 classes"):
      main.run(_config(path, "tfds:imagenet_a"), str(tmp_path / "a"))
  from beitv2_jax.train.pretrain import random_tokenizer
  tok_dir = str(tmp_path / "tok")
  beitv2_jax.save_model(random_tokenizer(load_config("pretrain_tiny")), tok_dir)
  with pytest.raises(ValueError, match="holds a tokenizer checkpoint, not a classifier"):
    main.run(_config(tok_dir, "tfds:imagenet_a"), str(tmp_path / "b"))
  small = dict(model.config, num_classes=10)
  m10 = VisionTransformer(**small)
  p10 = m10.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  beitv2_jax.save_model(beitv2_jax.Model("classifier", m10, p10, small), str(tmp_path / "c10"))
  with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, *a, **k: outside):
    with pytest.raises(ValueError, match="the classifier has 10"):
      main.run(_config(str(tmp_path / "c10"), "tfds:imagenet_v2"), str(tmp_path / "c"))
