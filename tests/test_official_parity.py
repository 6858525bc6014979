"""The official architectures in PyTorch, built from the official key layout with random weights, loaded
through `beitv2_jax.load` and compared: the VQ-KD tokenizer (modeling_vqkd.VQKD + norm_ema_quantizer, in
train mode for a few EMA steps) and the MIM model (modeling_pretrain, aggregation head, shared relative
position bias; benchmarks/torch_mim.py). The classifier's parity with timm is in test_vit.py."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import beitv2_jax
from beitv2_jax.models import quantizer
from beitv2_jax.models.vqkd import VQKD
from beitv2_jax.train.tokenizer import cosine_rec_loss
from helpers import ROOT

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import torch_mim  # noqa: E402  (the MIM model in the official layout, timm's Beit blocks)

IMG, PATCH, DIM, HEADS, K, CODE_DIM, TEACHER_DIM = 32, 4, 64, 2, 64, 32, 48
GRID = IMG // PATCH


class OfficialViT(nn.Module):
  """modeling_finetune.VisionTransformer as VQ-KD builds it: learned absolute position embedding, no
  relative position bias, no layer scale, mean-pooling mode (`fc_norm`, forward with return_patch_tokens)."""

  def __init__(self, img, patch, in_chans, depth):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(in_chans, DIM, patch, patch)
    self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, DIM) * 0.02)
    self.blocks = torch_mim._blocks(DIM, HEADS, depth, None, [0.0] * depth)
    self.fc_norm = nn.LayerNorm(DIM, eps=1e-6)

  def forward(self, x):  # (B, C, H, W) -> (B, N, DIM): fc_norm(patch tokens)
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.fc_norm(x[:, 1:])


class EmbeddingEMA(nn.Module):
  def __init__(self):
    super().__init__()
    self.weight = nn.Parameter(F.normalize(torch.randn(K, CODE_DIM), dim=-1), requires_grad=False)
    self.register_buffer("cluster_size", torch.zeros(K))  # dead state on this path (spec: never used)
    self.register_buffer("embed_avg", self.weight.data.clone())
    self.register_buffer("initted", torch.ones(1))


class NormEMAVectorQuantizer(nn.Module):
  """norm_ema_quantizer.NormEMAVectorQuantizer.forward (beta 1, decay 0.99), one process, k-means done."""

  def __init__(self, decay=0.99):
    super().__init__()
    self.decay = decay
    self.embedding = EmbeddingEMA()
    self.register_buffer("cluster_size", torch.zeros(K))

  def forward(self, z):  # (B, C, h, w)
    z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)
    flat = z.reshape(-1, CODE_DIM)
    e = self.embedding.weight
    d = flat.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", flat, e)
    ids = torch.argmin(d, dim=1)
    z_q = self.embedding.weight[ids].view(z.shape)
    encodings = F.one_hot(ids, K).type(z.dtype)
    if self.training:
      bins = encodings.sum(0)
      self.cluster_size.data.mul_(self.decay).add_(bins, alpha=1 - self.decay)
      zero_mask = bins == 0
      bins = bins.masked_fill(zero_mask, 1.0)
      embed_sum = flat.t() @ encodings
      embed_normalized = F.normalize((embed_sum / bins.unsqueeze(0)).t(), p=2, dim=-1)
      embed_normalized = torch.where(zero_mask[..., None], e, embed_normalized)
      e.data.mul_(self.decay).add_(embed_normalized, alpha=1 - self.decay)
      e.data.copy_(F.normalize(e.data, p=2, dim=-1))
    loss = F.mse_loss(z_q.detach(), z)
    z_q = z + (z_q - z).detach()
    return z_q.permute(0, 3, 1, 2), loss, ids


class OfficialVQKD(nn.Module):
  """modeling_vqkd.VQKD without its teacher (the target is handed in): pre_process, encoder,
  encode_task_layer in float32, quantizer, decoder over the code map (1x1 patch embed), decode_task_layer,
  cosine reconstruction loss."""

  def __init__(self, decoder_depth=1):
    super().__init__()
    self.encoder = OfficialViT(IMG, PATCH, 3, 2)
    self.decoder = OfficialViT(GRID, 1, CODE_DIM, decoder_depth)
    self.quantize = NormEMAVectorQuantizer()
    self.encode_task_layer = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, CODE_DIM))
    self.decode_task_layer = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, TEACHER_DIM))

  def forward(self, images01, target):
    x = torch.where(images01.max() <= 1.0, images01 * 255.0, images01) / 127.5 - 1.0  # pre_process
    z = self.encode_task_layer(self.encoder(x))
    z = z.transpose(1, 2).reshape(z.shape[0], CODE_DIM, GRID, GRID)
    quantize, emb_loss, ids = self.quantize(z)
    rec = self.decode_task_layer(self.decoder(quantize))
    t, r = target / target.norm(dim=-1, keepdim=True), rec / rec.norm(dim=-1, keepdim=True)
    rec_loss = (1 - (t * r).sum(-1)).mean()
    return ids.view(images01.shape[0], -1), rec, emb_loss, rec_loss


def _randomise(module, seed):
  """Every parameter moved off its init (LayerNorm ones and zeros, zero biases) so none hides a mismatch."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not name.startswith("quantize."):
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_vqkd_matches_the_official_architecture_and_its_ema_steps(tmp_path):
  """The official VQ-KD's state dict (every key of the released files: encoder, decoder, both task layers,
  the codebook and its dead EMA buffers) loads through beitv2_jax.load; on the same images the two give
  the same code ids, decoder features (1e-4) and losses (1e-5 relative); three training-mode EMA steps
  leave the same codebook (1e-5) and usage buffer (`quantize.cluster_size`)."""
  torch.manual_seed(0)
  ref = OfficialVQKD()
  _randomise(ref, 1)
  sd = {k: v for k, v in ref.state_dict().items()}
  assert {"quantize.embedding.weight", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
          "quantize.embedding.initted", "quantize.cluster_size", "decoder.patch_embed.proj.weight",
          "encode_task_layer.2.weight", "decode_task_layer.2.weight"} <= set(sd)
  assert tuple(sd["decoder.patch_embed.proj.weight"].shape) == (DIM, CODE_DIM, 1, 1)
  path = str(tmp_path / "vqkd.pth")
  torch.save({"model": sd}, path)
  m = beitv2_jax.load(path, num_heads=HEADS)
  assert m.kind == "tokenizer" and m.grid == GRID and len(m.codebook) == K

  rng = np.random.RandomState(0)
  batches = [rng.rand(4, IMG, IMG, 3).astype(np.float32) for _ in range(3)]
  targets = [rng.randn(4, GRID * GRID, TEACHER_DIM).astype(np.float32) for _ in range(3)]

  # Eval mode: ids, decoder features and both losses.
  ref.eval()
  with torch.no_grad():
    t_ids, t_rec, t_emb, t_rec_loss = ref(_nchw(batches[0]), torch.from_numpy(targets[0]))
  ids = np.asarray(m.encode(batches[0]))
  np.testing.assert_array_equal(ids, t_ids.numpy())
  np.testing.assert_allclose(np.asarray(m.decode(ids)), t_rec.numpy(), atol=1e-4, rtol=0)
  z = m.module.apply({"params": m.params}, jnp.asarray(batches[0]), method=VQKD.encode)
  zq, commit, _ = quantizer.quantize(jnp.asarray(m.codebook), z)
  rec = m.module.apply({"params": m.params}, zq, method=VQKD.decode)
  assert float(commit) == pytest.approx(t_emb.item(), rel=1e-5)
  assert float(cosine_rec_loss(rec, jnp.asarray(targets[0]))) == pytest.approx(t_rec_loss.item(), rel=1e-5)

  # Training mode: the norm-EMA codebook update, step by step.
  ref.train()
  cb = quantizer.new_codebook(jax.random.key(0), K, CODE_DIM, initted=True)
  cb = cb.replace(embedding=jnp.asarray(m.codebook))
  for step, (x, t) in enumerate(zip(batches, targets)):
    with torch.no_grad():
      t_ids, *_ = ref(_nchw(x), torch.from_numpy(t))
    z = m.module.apply({"params": m.params}, jnp.asarray(x), method=VQKD.encode)
    ids = quantizer.nearest_code(cb.embedding, z)
    np.testing.assert_array_equal(np.asarray(ids), t_ids.numpy())
    cb = quantizer.ema_update(cb, z, ids, 0.99, step)
  moved = np.abs(np.asarray(cb.embedding) - np.asarray(m.codebook)).max()
  assert moved > 1e-3  # the EMA really moved the codes
  np.testing.assert_allclose(np.asarray(cb.embedding), ref.quantize.embedding.weight.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(cb.usage), ref.quantize.cluster_size.numpy(), atol=1e-5, rtol=0)


def test_mim_model_matches_the_official_architecture_on_both_heads(tmp_path):
  """The official pretraining model (shared rel_pos_bias, layer scale, [MASK] token, cls_pt_layers on the
  last block's [CLS] and block `early_layers`' patches, shared norm and lm_head) in its checkpoint layout
  loads through beitv2_jax.load and gives the same logits on both heads at the masked positions (1e-4)."""
  torch.manual_seed(0)
  depth, early = 4, 1  # the loader infers early_layers = depth - 3 outside the registered 12 / 24 blocks
  ref = torch_mim.BEiTForMIM(IMG, PATCH, DIM, depth, HEADS, vocab=K, early_layers=early, head_layers=2).eval()
  _randomise(ref, 2)
  sd = {k: v for k, v in ref.state_dict().items()}
  assert {"rel_pos_bias.relative_position_bias_table", "cls_pt_layers.1.gamma_2", "lm_head.weight",
          "mask_token", "blocks.3.attn.q_bias"} <= set(sd)
  assert not any(k.startswith("blocks.") and "relative_position_bias_table" in k for k in sd)
  path = str(tmp_path / "pt.pth")
  torch.save({"model": sd}, path)
  m = beitv2_jax.load(path, num_heads=HEADS)
  assert m.kind == "mim" and m.config["early_layers"] == early

  rng = np.random.RandomState(0)
  x = rng.randn(3, IMG, IMG, 3).astype(np.float32)
  n, masked = GRID * GRID, 26
  mask = np.zeros((3, n), bool)
  for i in range(3):
    mask[i, rng.choice(n, masked, replace=False)] = True
  main, agg = m(x, mask)
  idx = torch_mim.masked_positions(torch.from_numpy(mask), masked)
  with torch.no_grad():
    t_main, t_agg = ref(_nchw(x), torch.from_numpy(mask), idx)
  np.testing.assert_allclose(np.asarray(main), t_main.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(agg), t_agg.numpy(), atol=1e-4, rtol=0)
  assert np.abs(t_main.numpy() - t_agg.numpy()).max() > 1e-2  # the two heads really differ
