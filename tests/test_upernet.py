"""UperNet on BEiT (models/upernet.py) against a PyTorch transcription of the official segmentation model's
parts: backbone_beit.py's necks (fpn1-4) and mmseg 0.x's UPerHead / FCNHead / ConvModule, on the same weights
and the same backbone features, eval-mode and train-mode BatchNorm (rtol 1e-4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn, F = torch.nn, torch.nn.functional

from beitv2_jax.models import upernet  # noqa: E402
from beitv2_jax.models.vit import VisionTransformer  # noqa: E402


def conv_module(cin, cout, k):
  return tnn.Sequential(tnn.Conv2d(cin, cout, k, padding=k // 2, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchUPerHead(tnn.Module):
  """mmseg.models.decode_heads.UPerHead (align_corners=False), with cls_seg."""

  def __init__(self, cin, ch, ncls, scales=(1, 2, 3, 6)):
    super().__init__()
    self.psp = tnn.ModuleList([tnn.Sequential(tnn.AdaptiveAvgPool2d(s), conv_module(cin, ch, 1)) for s in scales])
    self.bottleneck = conv_module(cin + len(scales) * ch, ch, 3)
    self.lateral = tnn.ModuleList([conv_module(cin, ch, 1) for _ in range(3)])
    self.fpn = tnn.ModuleList([conv_module(ch, ch, 3) for _ in range(3)])
    self.fpn_bottleneck = conv_module(4 * ch, ch, 3)
    self.conv_seg = tnn.Conv2d(ch, ncls, 1)

  def forward(self, inputs):
    x = inputs[-1]
    up = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    psp = torch.cat([x] + [up(m(x), x.shape[2:]) for m in self.psp], 1)
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral)] + [self.bottleneck(psp)]
    for i in range(3, 0, -1):
      laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn[i](laterals[i]) for i in range(3)] + [laterals[3]]
    outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
    return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))


class TorchNecksAndHeads(tnn.Module):
  """backbone_beit.py's fpn1-4 on the out_indices feature maps, then UPerHead and FCNHead(in_index=2)."""

  def __init__(self, d, ch, aux_ch, ncls):
    super().__init__()
    self.fpn1 = tnn.Sequential(tnn.ConvTranspose2d(d, d, 2, 2), tnn.BatchNorm2d(d), tnn.GELU(),
                               tnn.ConvTranspose2d(d, d, 2, 2))
    self.fpn2 = tnn.ConvTranspose2d(d, d, 2, 2)
    self.head = TorchUPerHead(d, ch, ncls)
    self.aux = conv_module(d, aux_ch, 3)
    self.aux_seg = tnn.Conv2d(aux_ch, ncls, 1)

  def forward(self, feats):
    levels = [self.fpn1(feats[0]), self.fpn2(feats[1]), feats[2], F.max_pool2d(feats[3], 2, 2)]
    return self.head(levels), self.aux_seg(self.aux(levels[2]))


def _t(a):
  return torch.from_numpy(np.array(a, np.float32))


def _load_conv(m, p):
  m.weight.data = _t(np.transpose(p["kernel"], (3, 2, 0, 1)))
  if "bias" in p:
    m.bias.data = _t(p["bias"])


def _load_bn(m, p, stats):
  m.weight.data, m.bias.data = _t(p["scale"]), _t(p["bias"])
  m.running_mean.data, m.running_var.data = _t(stats["mean"]), _t(stats["var"])


def _load_cm(seq, p, s):
  _load_conv(seq[0], p["conv"]), _load_bn(seq[1], p["bn"], s["bn"])


def _load_convt(m, p):  # flax (kh, kw, out, in) with transpose_kernel -> torch (in, out, kh, kw)
  m.weight.data, m.bias.data = _t(np.transpose(p["conv"]["kernel"], (3, 2, 0, 1))), _t(p["conv"]["bias"])


def _to_torch(params, stats, d, ch, aux_ch, ncls):
  t = TorchNecksAndHeads(d, ch, aux_ch, ncls)
  _load_convt(t.fpn1[0], params["fpn1_0"]), _load_bn(t.fpn1[1], params["fpn1_1"], stats["fpn1_1"])
  _load_convt(t.fpn1[3], params["fpn1_3"]), _load_convt(t.fpn2, params["fpn2_0"])
  h, hs = params["decode_head"], stats["decode_head"]
  for i in range(4):
    _load_cm(t.head.psp[i][1], h[f"psp_modules_{i}"], hs[f"psp_modules_{i}"])
  for i in range(3):
    _load_cm(t.head.lateral[i], h[f"lateral_convs_{i}"], hs[f"lateral_convs_{i}"])
    _load_cm(t.head.fpn[i], h[f"fpn_convs_{i}"], hs[f"fpn_convs_{i}"])
  _load_cm(t.head.bottleneck, h["bottleneck"], hs["bottleneck"])
  _load_cm(t.head.fpn_bottleneck, h["fpn_bottleneck"], hs["fpn_bottleneck"])
  _load_conv(t.head.conv_seg, h["cls"]["conv_seg"])
  a, as_ = params["auxiliary_head"], stats["auxiliary_head"]
  _load_cm(t.aux, a["convs_0"], as_["convs_0"])
  _load_conv(t.aux_seg, a["cls"]["conv_seg"])
  return t


@pytest.mark.parametrize("train", [False, True])
def test_upernet_matches_the_official_necks_and_mmseg_heads(train):
  """A 64 px image, patch 8 (an 8x8 grid: levels 32, 16, 8, 4; the 4x4 level pooled to 6x6 bins that
  overlap): our logits and auxiliary logits == the PyTorch transcription's on our backbone's features."""
  kw = dict(num_classes=5, img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3),
            channels=16, aux_channels=8, drop_path_rate=0.0, dropout=0.0)
  model = upernet.UperNetBEiT(**kw)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  rng = np.random.default_rng(0)
  # non-trivial BN statistics and affine parameters, so that eval mode shows whether they are applied
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if a.ndim else a, jnp.float32),
                       variables["batch_stats"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: a - 1.0 if path[-1].key == "mean" else a, stats)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a + jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32) if path[-1].key in ("scale", "bias")
      else a, variables["params"])
  if train:
    (ours, ours_aux), _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
  else:
    ours, ours_aux = model.apply({"params": params, "batch_stats": stats}, x)
  vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                          rel_pos="layer", final_norm="none")
  hidden = vit.apply({"params": params["backbone"]}, x)["hidden"]
  feats = [torch.from_numpy(np.asarray(hidden[i][:, 1:]).reshape(2, 8, 8, 32).transpose(0, 3, 1, 2).copy())
           for i in range(4)]
  t = _to_torch(jax.device_get(params), jax.device_get(stats), 32, 16, 8, 5)
  t.train(train)
  with torch.no_grad():
    ref, ref_aux = t(feats)
  assert ours.shape == (2, 32, 32, 5) and ours_aux.shape == (2, 8, 8, 5)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours_aux), ref_aux.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_adaptive_avg_pool_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
  for out in (1, 2, 3, 6):
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), out).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(upernet.adaptive_avg_pool(jnp.asarray(x), out)), ref, rtol=1e-6, atol=1e-6)
