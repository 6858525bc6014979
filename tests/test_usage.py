"""README usage claims, each against an independent reference: `m.features` against timm's pre-logits and
blocks on the same weights; the `python -m beitv2_jax.convert` round trip ours -> timm file -> ours."""
import os
import subprocess
import sys

import numpy as np
import pytest

import beitv2_jax
from helpers import ROOT

TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10, init_values=0.1,
                 use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_fc_norm=True)


def _timm_tiny(path):
  """A tiny timm Beit (the beitv2 layout: per-block rel-pos bias, layer scale, mean pool + fc_norm) with
  random values everywhere, saved as safetensors."""
  torch = pytest.importorskip("torch")
  from timm.models.beit import Beit
  from safetensors.torch import save_file
  tm = Beit(**TINY_TIMM).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in tm.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "head" in name else 0.1))
  save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
  return tm


def test_features_are_timms_pre_logits_and_block_outputs(tmp_path):
  """pool='mean' at the last block = timm's forward_head(pre_logits=True) (fc_norm of the mean patch token);
  layer=1, pool='cls' = LayerNorm(fc_norm) of the [CLS] after timm's first block; within 1e-5 (float32)."""
  import torch
  path = str(tmp_path / "tiny.safetensors")
  tm = _timm_tiny(path)
  m = beitv2_jax.load(path)
  x = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    pre_logits = tm.forward_head(tm.forward_features(xt), pre_logits=True).numpy()
    h = tm.patch_embed(xt)
    h = torch.cat([tm.cls_token.expand(3, -1, -1), h], 1)
    h = tm.blocks[0](h, shared_rel_pos_bias=None)
    cls_after_block1 = tm.fc_norm(h[:, 0]).numpy()
  assert np.abs(pre_logits).max() > 0.2
  np.testing.assert_allclose(np.asarray(m.features(x, pool="mean")), pre_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(m.features(x, layer=1, pool="cls")), cls_after_block1, atol=1e-5, rtol=0)


def test_convert_cli_round_trip_ours_timm_ours_keeps_the_logits(tmp_path):
  """timm file -> `convert --dst dir` (ours) -> `convert --format timm` (a timm file again): timm loads the
  result strictly and gives the original logits; our loader reads every stage with the same logits."""
  import torch
  from safetensors.torch import load_file
  from timm.models.beit import Beit
  src = str(tmp_path / "timm.safetensors")
  tm = _timm_tiny(src)
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def cli(*args):
    r = subprocess.run([sys.executable, "-m", "beitv2_jax.convert", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

  ours, back = str(tmp_path / "ours"), str(tmp_path / "back.safetensors")
  cli("--src", src, "--dst", ours)
  cli("--src", ours, "--dst", back, "--format", "timm")
  x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    tm2 = Beit(**TINY_TIMM).eval()
    tm2.load_state_dict(load_file(back), strict=True)
    again = tm2(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(again, ref, atol=1e-5, rtol=0)
  for path in (ours, back):
    np.testing.assert_allclose(np.asarray(beitv2_jax.load(path)(x)), ref, atol=1e-4, rtol=0)
