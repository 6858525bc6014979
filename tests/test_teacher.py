"""Our CLIP / DINO teachers equal transformers' own forward passes (within 1e-5), loaded through our
loader from both the msgpack (Flax) and the safetensors (PyTorch) formats."""
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
