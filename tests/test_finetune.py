"""Transfer: layer-wise lr decay, mixup/cutmix, fine-tune / linear-probe / k-NN runs, export round trip."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import beitv2_jax
from beitv2_jax import main as entry
from beitv2_jax.models.vit import VisionTransformer
from beitv2_jax.train import finetune, optim
from helpers import load_config, tokenizer_config, pretrain_config


def test_layer_decay_scales_follow_the_official_ids():
  """scale = decay ** (L + 1 - id): id 0 for cls_token / mask_token / pos_embed / patch_embed, i+1 for
  blocks.i (its rel-pos table included), L+1 for fc_norm, head and the rest."""
  m = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10,
                        use_abs_pos_emb=True)
  params = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  scales = optim.layer_decay_scales(params, depth=3, decay=0.65)
  flat = {optim.official_key(p): float(v) for p, v in __import__("beitv2_jax.convert", fromlist=["x"]).flatten(scales).items()}
  L = 3
  for key, s in flat.items():
    if key.startswith(("cls_token", "pos_embed", "patch_embed")):
      lid = 0
    elif key.startswith("blocks."):
      lid = int(key.split(".")[1]) + 1
    else:
      lid = L + 1
    assert s == pytest.approx(0.65 ** (L + 1 - lid)), key
  assert flat["blocks.2.attn.relative_position_bias_table"] == pytest.approx(0.65 ** 1)
  assert flat["head.weight"] == 1.0 and flat["patch_embed.proj.weight"] == pytest.approx(0.65 ** 4)
  # scanned params get the same per-layer scales along their stacked axis
  ms = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10, scan=True)
  ps = ms.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  ss = optim.layer_decay_scales(ps, depth=3, decay=0.65)
  np.testing.assert_allclose(np.asarray(ss["blocks"]["block"]["mlp"]["fc1"]["kernel"]).ravel(), 0.65 ** np.array([3, 2, 1]))


def test_weight_decay_mask_follows_the_official_groups():
  from beitv2_jax.convert import flatten
  m = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=10,
                        use_mask_token=True, use_abs_pos_emb=True)
  params = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mask = {optim.official_key(p): v for p, v in flatten(optim.decay_mask(params)).items()}
  assert mask["mask_token"] and mask["blocks.0.attn.relative_position_bias_table"] and mask["head.weight"]
  assert not mask["cls_token"] and not mask["pos_embed"] and not mask["blocks.0.attn.q_bias"]
  assert not mask["blocks.0.gamma_1"] and not mask["blocks.0.norm1.weight"] and not mask["head.bias"]


def test_schedule_matches_the_official_cosine_scheduler():
  s = optim.warmup_cosine(1.0, 100, 10, 0.1)
  np.testing.assert_allclose([float(s(i)) for i in (0, 9)], [0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, atol=1e-6)
  ref = 0.1 + 0.45 * (1 + np.cos(np.pi * 45 / 90))
  np.testing.assert_allclose(float(s(55)), ref, atol=1e-6)


def test_mixup_cutmix_targets_sum_to_one_and_match_lambda():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(8, 16, 16, 3), jnp.float32)
  y = jnp.arange(8) % 4
  for seed in range(6):
    xm, t = finetune.mixup_cutmix(jax.random.key(seed), x, y, 4)
    np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, atol=1e-5)
    lam = float(np.asarray(t)[0, int(y[0])] - 0.1 / 4) / 0.9 if y[0] != y[7] else None
    if lam is not None:  # the image is lam * own + (1 - lam) * partner, by pixels or by area
      own = np.isclose(np.asarray(xm[0]), np.asarray(x[0]), atol=1e-6).mean()
      mixed = np.asarray(lam * x[0] + (1 - lam) * x[7])
      assert np.allclose(np.asarray(xm[0]), mixed, atol=1e-5) or abs(own - lam) < 0.1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny tokenizer and a tiny MIM model trained on the digits (a short but real pretraining)."""
  root = tmp_path_factory.mktemp("transfer")
  tok, pt = str(root / "tok"), str(root / "pt")
  entry.run(tokenizer_config(steps=60, batch=32, **{"data.name": "mnist5k", "model.dead_code_restart_steps": 0}), tok)
  entry.run(pretrain_config(tok, steps=300, batch=32, **{"data.name": "mnist5k"}), pt)
  return pt


def test_finetune_starts_from_the_pretrained_encoder_and_learns(pretrained, tmp_path):
  """The classifier starts from the MIM encoder (shared rel-pos table copied into every block, fresh head
  scaled by 0.001) and fine-tuning it lifts top-1 well above chance (10 classes)."""
  from beitv2_jax import parallel
  c = load_config("finetune_tiny")
  c.init_from = pretrained
  c.total_steps, c.batch_size, c.warmup_steps = 200, 32, 20
  c.aug.update(dict(mixup=0.0, cutmix=0.0, rand_augment_layers=0, reprob=0.0, min_crop_scale=0.5))
  c.data.eval_split, c.data.read_threads = "val", 0
  task = finetune.FinetuneTask(c, str(tmp_path / "ft"), parallel.make_mesh(1, 1))
  p0 = task.init_state(jax.random.PRNGKey(0)).params
  mim = beitv2_jax.load(pretrained)
  shared = np.asarray(mim.params["backbone"]["rel_pos_bias"]["relative_position_bias_table"])
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(p0[f"blocks_{i}"]["attn"]["relative_position_bias_table"]), shared)
    np.testing.assert_array_equal(np.asarray(p0[f"blocks_{i}"]["mlp"]["fc1"]["kernel"]),
                                  np.asarray(mim.params["backbone"][f"blocks_{i}"]["mlp"]["fc1"]["kernel"]))
  assert np.abs(np.asarray(p0["head"]["kernel"])).max() < 1e-3  # trunc_normal(.02) x 0.001
  top1 = entry.run(c, str(tmp_path / "run"))["top1"]
  print("fine-tune top1 from the tiny pretrained encoder", top1)
  assert top1 > 0.18


def test_linear_probe_beats_random_init_and_knn_runs(pretrained, tmp_path):
  probe, knn = {}, {}
  for name, init in (("pretrained", pretrained), ("random", "")):
    c = load_config("linprobe_tiny")
    c.init_from, c.total_steps, c.data.read_threads = init, 150, 0
    probe[name] = entry.run(c, str(tmp_path / f"lp_{name}"))["top1"]
    k = load_config("knn_tiny")
    k.init_from = init
    knn[name] = entry.run(k, str(tmp_path / f"knn_{name}"))["top1"]
  print("linear probe", probe, "knn", knn)
  # 10 classes: chance is 0.1. Measured here: probe 0.245 vs 0.154 at random init; k-NN 0.237 vs 0.273 --
  # this tiny MNIST-pretrained encoder does not beat random init under k-NN (the demo's photo-pretrained
  # one does); see benchmarks/RESULTS.md.
  assert probe["pretrained"] > 0.2 and knn["pretrained"] > 0.15 and knn["random"] > 0.15
  assert probe["pretrained"] > probe["random"]


def test_tokenizer_encoder_can_be_probed(tmp_path):
  tok = str(tmp_path / "tok")
  entry.run(tokenizer_config(steps=4), tok)
  k = load_config("knn_tiny")
  k.init_from = tok
  assert 0.0 <= entry.run(k, str(tmp_path / "knn"))["top1"] <= 1.0


def test_export_then_import_round_trips_exactly(tmp_path):
  m = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                        init_values=0.1)
  params = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), params)
  model = beitv2_jax.Model("classifier", m, params, dict(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                                          num_heads=2, num_classes=10, init_values=0.1))
  for ext in ("safetensors", "pth"):
    path = str(tmp_path / f"clf.{ext}")
    beitv2_jax.export_state_dict(model, path)
    back = beitv2_jax.load(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, params)
  ours = str(tmp_path / "ours")
  beitv2_jax.save_model(model, ours)
  again = beitv2_jax.load(ours)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.params, params)


def test_finetuned_classifier_loads_in_timm_with_identical_logits(tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  c = load_config("finetune_tiny")
  c.total_steps, c.batch_size, c.data.read_threads, c.data.eval_split = 3, 16, 0, ""
  c.model.update(dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2))
  wd = str(tmp_path / "ft")
  entry.run(c, wd)
  model = beitv2_jax.load(wd)
  path = str(tmp_path / "ft.safetensors")
  beitv2_jax.export_state_dict(model, path)
  tm = timm.create_model("beitv2_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                         depth=2, num_heads=2, num_classes=10).eval()
  from safetensors.torch import load_file
  tm.load_state_dict(load_file(path), strict=True)
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(model(x)), ref, atol=1e-5)
