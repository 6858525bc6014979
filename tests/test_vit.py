"""The BEiT backbone: relative positions, init conventions, scan, timm parity through beitv2_jax.load."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import beitv2_jax
from beitv2_jax import convert
from beitv2_jax.models.vit import VisionTransformer, relative_position_index, rescale_init

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def test_relative_position_index_spot_values():
  idx = relative_position_index((14, 14))
  assert idx.shape == (197, 197)
  assert (idx[0, 1], idx[1, 0], idx[0, 0], idx[1, 1]) == (729, 730, 731, 364)
  assert idx.max() == 731 and idx[1:, 1:].max() == 728


def _randomize(model):
  """Random values everywhere (timm zero-inits biases, gammas and rel-pos tables) so parity is real."""
  import torch
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "head" in name else 0.05))


def test_timm_parity_both_ways(tmp_path):
  """timm beitv2_base_patch16_224 (random init) logits == ours through beitv2_jax.load, max-abs < 1e-4 fp32;
  and timm loads our export with the same logits."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  tm = timm.create_model("beitv2_base_patch16_224", pretrained=False).eval()
  _randomize(tm)
  path = str(tmp_path / "beitv2_base.pth")
  torch.save({"module": tm.state_dict()}, path)  # official fine-tuned files nest under 'module'
  model = beitv2_jax.load(path)
  assert model.kind == "classifier"
  assert model.config["depth"] == 12 and model.config["num_heads"] == 12 and model.config["rel_pos"] == "layer"
  x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  ours = np.asarray(model(x))
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert np.abs(ref).max() > 1.0  # logits of a meaningful size
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

  out = str(tmp_path / "export.safetensors")
  beitv2_jax.export_state_dict(model, out)
  tm2 = timm.create_model("beitv2_base_patch16_224", pretrained=False).eval()
  from safetensors.torch import load_file
  tm2.load_state_dict(load_file(out), strict=True)
  with torch.no_grad():
    ref2 = tm2(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(ref2, ref, atol=1e-5, rtol=0)
  # the safetensors route into our loader gives the same model
  np.testing.assert_allclose(np.asarray(beitv2_jax.load(out)(x)), ours, atol=1e-5, rtol=0)


def test_scan_equals_unrolled():
  x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3), jnp.float32)
  m = VisionTransformer(**TINY, init_values=0.1)
  params = m.init(jax.random.key(0), x)["params"]
  sd = convert.to_state_dict(params)
  ms = VisionTransformer(**TINY, init_values=0.1, scan=True, remat="full")
  tmpl = jax.eval_shape(lambda: ms.init(jax.random.key(0), x))["params"]
  ps = convert.from_state_dict(sd, tmpl)
  assert "blocks" in ps and ps["blocks"]["block"]["attn"]["qkv"]["kernel"].shape[0] == 2
  np.testing.assert_allclose(m.apply({"params": params}, x)["logits"], ms.apply({"params": ps}, x)["logits"],
                             atol=1e-5)
  assert convert.to_state_dict(ps).keys() == sd.keys()


def test_init_conventions():
  """'pretrain' truncates at +-1 std (std ~0.0108), 'finetune' is N(0, .02); proj/fc2 rescaled by sqrt(2i)."""
  big = dict(img_size=32, patch_size=4, embed_dim=256, depth=2, num_heads=4)
  x = jnp.zeros((1, 32, 32, 3))
  pt = VisionTransformer(**big, init_style="pretrain").init(jax.random.key(0), x)["params"]
  ft = VisionTransformer(**big, init_style="finetune").init(jax.random.key(0), x)["params"]
  fc1_pt = np.asarray(pt["blocks_0"]["mlp"]["fc1"]["kernel"])
  fc1_ft = np.asarray(ft["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert abs(fc1_pt.std() - 0.0108) < 0.0005 and np.abs(fc1_pt).max() <= 0.02 + 1e-6
  assert abs(fc1_ft.std() - 0.02) < 0.0005
  torch_style = VisionTransformer(**big, init_style="torch").init(jax.random.key(0), x)["params"]
  assert np.abs(np.asarray(torch_style["blocks_0"]["mlp"]["fc1"]["bias"])).max() > 0.01  # non-zero biases
  scaled = rescale_init(pt, [("blocks", 1)])
  for i in (0, 1):
    ratio = np.asarray(pt[f"blocks_{i}"]["mlp"]["fc2"]["kernel"]) / np.asarray(scaled[f"blocks_{i}"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_allclose(ratio, np.sqrt(2 * (i + 1)), rtol=1e-5)


def test_bad_image_size_is_a_clear_error():
  m = VisionTransformer(**TINY)
  with pytest.raises(ValueError, match="not divisible by patch size"):
    m.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_mismatched_checkpoint_lists_keys():
  m = VisionTransformer(**TINY)
  x = jnp.zeros((1, 32, 32, 3))
  params = m.init(jax.random.key(0), x)["params"]
  sd = convert.to_state_dict(params)
  sd.pop("blocks.1.mlp.fc1.weight")
  sd["extra.weight"] = np.zeros(3)
  sd["head.weight"] = np.zeros((5, 64))
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.from_state_dict(sd, jax.eval_shape(lambda: m.init(jax.random.key(0), x))["params"])
  msg = str(e.value)
  assert "blocks.1.mlp.fc1.weight" in msg and "extra.weight" in msg and "head.weight" in msg


def test_data_parallel_8_devices_equals_1():
  """Loss and gradients of a tiny model under jit on an 8-device data mesh equal the 1-device ones
  (atol 1e-6 on the loss, 1e-5 on gradients: only the reduction order differs)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert jax.device_count() == 8
  m = VisionTransformer(**TINY, init_values=0.1, drop_path_rate=0.0)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(16, 32, 32, 3), jnp.float32)
  y = jnp.asarray(rng.randint(0, 10, 16))
  params = m.init(jax.random.key(0), x[:1])["params"]

  def loss(p, x, y):
    logits = m.apply({"params": p}, x)["logits"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  f = jax.jit(jax.value_and_grad(loss))
  l1, g1 = f(params, x, y)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  l8, g8 = f(ps, xs, ys)
  assert len(xs.sharding.device_set) == 8
  np.testing.assert_allclose(l8, l1, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g8, g1)


def test_gelu_is_torch_exact_gelu_with_the_same_gradient():
  """vit.gelu (custom backward that recomputes the CDF) against jax.nn.gelu(approximate=False) and torch."""
  import torch
  from beitv2_jax.models.vit import gelu
  x = jnp.linspace(-9.0, 9.0, 2001, dtype=jnp.float32)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(torch.tensor(np.asarray(x))).numpy(),
                             atol=1e-6, rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(gelu(x) * jnp.cos(x)))(x)
  g_ref = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False) * jnp.cos(x)))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-6, rtol=1e-5)
  # bf16: computed in float32 and rounded once, as torch does for bf16 inputs (torch's erf form rounds the
  # left tail with less precision than erfc: within one bf16 ulp, 2^-7 relative)
  xb = x.astype(jnp.bfloat16)
  tb = torch.nn.functional.gelu(torch.tensor(np.asarray(xb.astype(jnp.float32))).to(torch.bfloat16))
  np.testing.assert_allclose(np.asarray(gelu(xb).astype(jnp.float32)), tb.float().numpy(), atol=1e-6, rtol=2**-7)
  assert gelu(xb).dtype == jnp.bfloat16 and jax.grad(lambda x: gelu(x).sum())(xb).dtype == jnp.bfloat16


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("src, dst", [(14, 24), (14, 7), (16, 14), (2, 5), (37, 16)])
def test_resize_pos_embed_is_torch_bicubic(src, dst, antialias):
  """Absolute position embeddings resized as the official code does (torch bicubic, a = -0.75,
  align_corners=False) and as transformers' DINOv2-with-registers does (antialias=True: a = -0.5, the
  kernel stretched when shrinking), within float32 rounding (1e-5); the CLS embedding is kept as it is."""
  import torch
  from beitv2_jax import resample
  pos = np.random.RandomState(src * dst).randn(1, 1 + src * src, 6).astype(np.float32)
  ours = resample.resize_pos_embed(pos, (dst, dst), antialias=antialias)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, src, src, 6).permute(0, 3, 1, 2).double()
  ref = torch.nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False,
                                        antialias=antialias)
  np.testing.assert_allclose(ours[0, 1:], ref.permute(0, 2, 3, 1).reshape(dst * dst, 6).numpy(), atol=1e-5)
  np.testing.assert_array_equal(ours[:, :1], pos[:, :1])


def _official_geometric_coordinates(src: int, dst: int) -> np.ndarray:
  """The official resize's source coordinates, found independently: offsets 1, 1+q, 1+q+q^2, ... from the
  centre, q solving sum_{i < src//2} q^i = dst//2 (the last source row lands on the last target row)."""
  from scipy.optimize import brentq
  half = src // 2
  q = brentq(lambda r: (1 - r ** half) / (1 - r) - dst // 2, 1.0001, 2.0)
  dis = np.cumsum(q ** np.arange(half))
  return np.concatenate([-dis[::-1], [0.0], dis])


@pytest.mark.parametrize("src_window, dst_window", [(14, 32), (14, 24), (7, 14)])
def test_resize_rel_pos_table_follows_the_official_geometric_grid(src_window, dst_window):
  """A relative-position table resized to another window (fine-tuning at another resolution, segmentation at
  512 px) as run_class_finetuning.py does: the same table at the same size is returned untouched; the 3
  [CLS] rows are kept; a cubic polynomial sampled on the official geometric grid comes back exactly on the
  target's integer offsets (a cubic spline reproduces cubics: 1e-4, float32), for every head; a smooth
  non-polynomial function (a Gaussian bump of peak 1) within 3e-3."""
  from beitv2_jax import convert
  src, dst = 2 * src_window - 1, 2 * dst_window - 1
  rng = np.random.RandomState(0)
  same = rng.randn(src * src + 3, 2).astype(np.float32)
  assert convert.resize_rel_pos_table(same, (src_window, src_window)) is same
  x = _official_geometric_coordinates(src, dst)
  assert x[-1] == pytest.approx(dst // 2, abs=1e-4) and x[src // 2 + 1] == 1.0
  t = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
  funcs = [lambda a, b: 0.5 + 0.02 * a - 0.03 * b + 1e-3 * a * a * b - 2e-4 * b ** 3 + 1e-5 * a ** 3 * b ** 2,
           lambda a, b: np.exp(-(a * a + 0.5 * b * b) / (2 * (dst / 3) ** 2))]
  table = np.concatenate([np.stack([f(*np.meshgrid(x, x, indexing="ij")).reshape(-1) for f in funcs], -1),
                          rng.randn(3, 2)]).astype(np.float32)
  out = convert.resize_rel_pos_table(table, (dst_window, dst_window))
  assert out.shape == (dst * dst + 3, 2)
  np.testing.assert_array_equal(out[-3:], table[-3:])
  want = [f(*np.meshgrid(t, t, indexing="ij")).reshape(-1) for f in funcs]
  poly_scale = np.abs(want[0]).max()
  np.testing.assert_allclose(out[:-3, 0], want[0], atol=1e-4 * poly_scale, rtol=0)
  np.testing.assert_allclose(out[:-3, 1], want[1], atol=3e-3, rtol=0)


def test_a_bfloat16_residual_stream_changes_the_rounding_only():
  """model.residual_dtype="bfloat16" (opt-in): the tiny MIM model keeps its parameter tree, carries its blocks'
  outputs in bfloat16 (the bytes it saves; scanned blocks too), ends the stream in float32, and its loss and
  gradients stay within bfloat16's rounding of the float32 stream's (2% here; the effect on training:
  benchmarks/residual_precision.py, in benchmarks/RESULTS.md)."""
  from beitv2_jax.models.mim import BEiTForMIM
  backbone = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=0.1,
                  drop_path_rate=0.1, use_mask_token=True, rel_pos="shared", final_norm="none",
                  init_style="pretrain")
  models = {r: BEiTForMIM(backbone=backbone, vocab_size=32, early_layers=1, head_layers=1, residual_dtype=r)
            for r in (jnp.float32, jnp.bfloat16)}
  k = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(k[0], (4, 32, 32, 3))
  mask = jnp.zeros((4, 64), bool).at[:, ::3].set(True)
  init = {r: jax.jit(m.init, static_argnums=3)({"params": k[1], "dropout": k[2]}, images, mask, 22)["params"]
          for r, m in models.items()}
  assert jax.tree.structure(init[jnp.float32]) == jax.tree.structure(init[jnp.bfloat16])
  params = init[jnp.float32]
  out = {r: jax.jit(m.vit_module().apply)({"params": params["backbone"]}, images, mask) for r, m in models.items()}
  assert out[jnp.float32]["hidden"].dtype == jnp.float32 and out[jnp.bfloat16]["hidden"].dtype == jnp.bfloat16
  assert out[jnp.bfloat16]["x"].dtype == jnp.float32
  assert not np.array_equal(out[jnp.float32]["x"], out[jnp.bfloat16]["x"])  # the knob does round
  scanned = BEiTForMIM(backbone=backbone, vocab_size=32, early_layers=1, head_layers=1, scan=True,
                       residual_dtype=jnp.bfloat16).vit_module()  # nn.scan's carry in bfloat16
  shapes = jax.eval_shape(lambda: scanned.apply(scanned.init(k[1], images, mask), images, mask))
  assert shapes["hidden"].dtype == jnp.bfloat16 and shapes["x"].dtype == jnp.float32

  def loss(r, p):
    main, agg = models[r].apply({"params": p}, images, mask, 22, train=True, rngs={"dropout": k[3]})
    return jnp.mean(jax.nn.log_softmax(main)[..., 0]) + jnp.mean(jax.nn.log_softmax(agg)[..., 1])
  (want, g_want), (got, g_got) = [jax.jit(jax.value_and_grad(lambda p, r=r: loss(r, p)))(params)
                                  for r in (jnp.float32, jnp.bfloat16)]
  assert abs(float(got - want)) < 0.02 * abs(float(want)), (got, want)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g_got, g_want))
  assert np.linalg.norm(a - b) < 0.02 * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)
  # the layer scales' gradients sum over every token: in float32 (the stream is only stored in bfloat16)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
    if "gamma" in jax.tree_util.keystr(path):
      assert np.linalg.norm(x - y) < 0.01 * np.linalg.norm(y), (jax.tree_util.keystr(path), x.dtype)


def test_residual_dtype_values_are_checked_with_the_config():
  from beitv2_jax import config_defaults
  from helpers import load_config
  c = load_config("pretrain_tiny")
  assert c.model.residual_dtype == "float32"  # the official numerics by default
  c.model.residual_dtype = "float16"
  with pytest.raises(ValueError, match=r"model.residual_dtype='float16': must be one of \('float32', 'bfloat16'\)"):
    config_defaults.validate(c)
  c.model.residual_dtype, c.model.add_norm = "bfloat16", "pallas"
  with pytest.raises(ValueError, match="must be 'float32' with model.add_norm='pallas'"):
    config_defaults.validate(c)
  c.model.add_norm = "xla"
  config_defaults.validate(c)
  c.model.patch_embed = "dense"
  with pytest.raises(ValueError, match=r"model.patch_embed='dense': must be one of \('conv', 'matmul'\)"):
    config_defaults.validate(c)


def test_patch_embed_as_matmul_is_the_convolution():
  """model.patch_embed="matmul": the same parameters (names, shapes, initial values) and the same product as
  the strided convolution (itself checked against timm above): logits in float32 and bf16, gradients."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  one_block = dict(TINY, depth=1)  # the patch embedding is what differs
  conv = VisionTransformer(**one_block)
  matmul = VisionTransformer(**one_block, patch_embed="matmul")
  params = jax.jit(conv.init)(jax.random.key(0), x)
  same_init = jax.jit(matmul.init)(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(same_init)
  jax.tree.map(np.testing.assert_array_equal, params, same_init)
  convs = lambda model: str(jax.make_jaxpr(lambda p: model.apply(p, x))(params)).count("conv_general_dilated")
  assert (convs(conv), convs(matmul)) == (1, 0)  # the matmul form really runs
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    models = [VisionTransformer(**one_block, dtype=dtype, patch_embed=p) for p in ("conv", "matmul")]
    want, got = (jax.jit(lambda p: m.apply(p, x)["logits"])(params) for m in models)
    assert float(jnp.max(jnp.abs(got - want))) <= tol * float(jnp.max(jnp.abs(want))), dtype
  grads = [jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x)["logits"]))))(params)  # not linear
           for m in (conv, matmul)]
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0], jax.tree.leaves(grads[1])):
    assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-12, jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match=r"model.patch_embed='dense': expected one of \('conv', 'matmul'\)"):
    VisionTransformer(**TINY, patch_embed="dense").init(jax.random.key(0), x)
