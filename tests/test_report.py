"""The tokenizer report: its numbers against independent references (sklearn's NMI, a direct k-NN and
code count), its files, and its command line's errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import beitv2_jax
from beitv2_jax import api, report
from beitv2_jax.data import sources, transforms
from helpers import pretrain_config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from beitv2_jax.train.pretrain import random_tokenizer
  c = pretrain_config("random")
  c.tokenizer.model.codebook_size = 64
  path = str(tmp_path_factory.mktemp("report") / "tok")
  beitv2_jax.save_model(random_tokenizer(c), path)
  return path


def _codes(tok, split):
  source = sources.make_source("digits", split)
  view = transforms.EvalTransform(tok.img_size)
  imgs = np.stack([view(Image.fromarray(np.asarray(source[i]["image"])), None)["image"] for i in range(len(source))])
  imgs = np.repeat(imgs, 3, -1) if imgs.shape[-1] == 1 else imgs
  labels = np.array([source[i]["label"] for i in range(len(source))])
  return np.asarray(tok.encode(imgs.astype(np.float32) / 255.0)), labels


def test_report_numbers_equal_independent_references(tokenizer_dir, tmp_path):
  from sklearn.metrics import normalized_mutual_info_score
  out = str(tmp_path / "r")
  r = report.report(tokenizer_dir, "digits", out, batch=100)
  tok = api.load(tokenizer_dir)
  ids, labels = _codes(tok, "val")
  counts = np.bincount(ids.ravel(), minlength=64)
  p = counts[counts > 0] / counts.sum()
  assert r["images"] == len(ids) and r["patches"] == ids.size
  assert r["codes_used"] == (counts > 0).sum() and r["dead_codes"] == 64 - (counts > 0).sum()
  assert r["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
  assert r["top_code_share"] == pytest.approx(counts.max() / counts.sum())
  per_patch_class = np.repeat(labels, ids.shape[1])
  assert r["code_label_nmi"] == pytest.approx(normalized_mutual_info_score(per_patch_class, ids.ravel()), abs=1e-9)
  # weighted k-NN on L2-normalised code histograms (k 20, T 0.07), written out directly
  tr_ids, tr_labels = _codes(tok, "train")
  hist = lambda i: np.stack([np.bincount(row, minlength=64) for row in i]).astype(np.float64)
  norm = lambda h: h / np.linalg.norm(h, axis=1, keepdims=True)
  sims = norm(hist(ids)) @ norm(hist(tr_ids)).T
  top = np.argsort(-sims, axis=1, kind="stable")[:, :20]
  votes = np.zeros((len(ids), 10))
  for q in range(len(ids)):
    np.add.at(votes[q], tr_labels[top[q]], np.exp(sims[q, top[q]] / 0.07))
  assert r["bag_of_codes_knn_top1"] == pytest.approx(np.mean(votes.argmax(1) == labels), abs=1.5 / len(ids))
  assert r["chance_top1"] == pytest.approx(np.bincount(labels).max() / len(labels))
  for f in ("report.json", "report.md", "codebook_usage.png", "token_maps.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  assert json.load(open(os.path.join(out, "report.json")))["codes_used"] == r["codes_used"]
  assert "NMI(code; class)" in open(os.path.join(out, "report.md")).read()


def test_report_command_line_and_its_errors(tokenizer_dir, tmp_path, capsys):
  r = report.main([f"--tokenizer={tokenizer_dir}", "--data=digits", "--max_images=50", f"--out={tmp_path / 'cli'}"])
  assert r["images"] == 50 and "codebook usage" in capsys.readouterr().out
  with pytest.raises(SystemExit, match=r"error: no checkpoint at .*nothing"):
    report.main([f"--tokenizer={tmp_path / 'nothing'}"])
  model = api.load(tokenizer_dir)
  with pytest.raises(SystemExit, match="holds a classifier checkpoint, not a tokenizer"):
    classifier = api.random_encoder(dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2,
                                         mlp_ratio=4.0, init_values=0.1), 0)
    beitv2_jax.save_model(classifier, str(tmp_path / "clf"))
    report.main([f"--tokenizer={tmp_path / 'clf'}", "--data=digits"])
  assert model.kind == "tokenizer"


def test_teacher_reference_probes_a_teachers_own_features():
  """report.teacher_reference: the k-NN and linear probe on a teacher's mean-pooled features. The linear
  probe is checked on features where the answer is known (classes linearly separable in 2 of 16 dims,
  the rest noise: ~1.0; labels shuffled: ~chance), the features against the teacher applied directly."""
  import jax
  from beitv2_jax.models import teacher as teacher_lib
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 800)
  x = rng.normal(size=(800, 16)).astype(np.float32)
  x[:, 3] += 6 * (y % 2) - 3
  x[:, 7] += 6 * (y // 2) - 3
  assert report.linear_probe_top1(x[:600], y[:600], x[600:], y[600:], 4) > 0.97
  assert report.linear_probe_top1(x[:600], rng.permutation(y[:600]), x[600:], y[600:], 4) < 0.45
  t = teacher_lib.random_teacher(32, 4, width=32, depth=1, heads=2, dim=32, kind="dinov2")
  feats, labels, n = report.teacher_features(t, "digits", "val", 32, 8)
  images = np.stack([transforms.EvalTransform(32)(Image.fromarray(np.asarray(r["image"])), None)["image"]
                     for r in (sources.make_source("digits", "val")[i] for i in range(5))])
  direct = np.asarray(jax.jit(lambda x: t.apply(t.params, x / 255.0, 8).mean(1))(images))
  direct = direct / np.linalg.norm(direct, axis=-1, keepdims=True)
  np.testing.assert_allclose(feats[:5], direct, atol=1e-5)
  assert n == 10 and len(feats) == len(labels) == len(sources.make_source("digits", "val"))
  r = report.teacher_reference(t, "digits", 32, 8)
  print(r)
  assert r["teacher"] == t.source and r["teacher_px"] == 32 and r["train"] + r["eval"] == 1797
  assert 0.5 < r["knn_top1"] <= 1.0 and 0.5 < r["linear_top1"] <= 1.0  # digits are easy even for random features
