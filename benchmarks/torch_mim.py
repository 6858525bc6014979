"""The PyTorch peer of our MIM step: what a user would run instead of this codebase, timed the same way.

The same BEiT v2 pretraining step as `beitv2_jax.train.pretrain` (modeling_pretrain + engine_for_pretraining):
a frozen VQ-KD encoder forward makes the labels (ViT with absolute position embedding, fc_norm on every
patch token, Linear-Tanh-Linear to 32-d in float32, l2norm, nearest of 8192 codes); the student is the BEiT
backbone (shared relative position bias, layer scale, [MASK] token) plus the 2-block patch-aggregation head
on [CLS of the last block, patches of block `early_layers`]; both heads share the final norm and the
8192-way lm_head on the masked tokens; loss = CE(main) + CE(aggregation); AdamW with the official
weight-decay groups and gradient clipping at 3.0. Blocks are timm's Beit blocks (SDPA attention with the
bias as its mask), with bf16 autocast, fused AdamW and, with --compile, torch.compile.

Module and parameter names follow the official key layout (`blocks.3.attn.qkv.weight`,
`cls_pt_layers.0...`, `lm_head`, `encoder.blocks...`, `encode_task_layer.0`), so our exported state dicts
(`convert.to_state_dict`) load into it unchanged: tests/test_benchmarks.py checks the loss and every
gradient against our step on the same weights.

The masked tokens are gathered by index (argsort of the mask, row-major order) rather than boolean
indexing: the same rows when every image has the same number of masked patches, as the mask generator
gives, and a static shape that torch.compile keeps in one graph.

  python benchmarks/torch_mim.py --size=tiny --steps=3                      # CPU, float32
  python benchmarks/torch_mim.py --size=base --batch=256 --compile=0,1      # GPU, bf16 autocast
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beitv2_jax import flops  # noqa: E402  (the same FLOP count as ours: the MFU numerator)

LN = functools.partial(nn.LayerNorm, eps=1e-6)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, as beitv2_jax/roofline.py


def _blocks(dim: int, heads: int, depth: int, init_values, drop_path_rates):
  from timm.models.beit import Block
  return nn.ModuleList([Block(dim, heads, qkv_bias=True, mlp_ratio=4.0, drop_path=r, init_values=init_values,
                              norm_layer=LN, window_size=None) for r in drop_path_rates])


class PatchEmbed(nn.Module):
  def __init__(self, patch: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
    return self.proj(x).flatten(2).transpose(1, 2)


class VQKDEncoder(nn.Module):
  """The part of the official VQKD that makes MIM labels: `encoder.*`, `encode_task_layer.*` and the
  codebook (`quantize.embedding.weight`)."""

  def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, codebook_size: int = 8192,
               codebook_dim: int = 32):
    super().__init__()
    self.encoder = nn.Module()
    self.encoder.patch_embed = PatchEmbed(patch, dim)
    n = (img // patch) ** 2
    self.encoder.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.encoder.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
    self.encoder.blocks = _blocks(dim, heads, depth, None, [0.0] * depth)
    self.encoder.fc_norm = LN(dim)
    self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, codebook_dim))
    self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, codebook_dim), dim=-1))

  @torch.no_grad()
  def forward(self, images01):
    """(B, 3, H, W) images in [0, 1] -> (B, N) code ids."""
    e = self.encoder
    x = torch.where(images01.max() <= 1.0, images01 * 255.0, images01) / 127.5 - 1.0  # official pre_process
    x = e.patch_embed(x)
    x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + e.pos_embed
    for blk in e.blocks:
      x = blk(x)
    h = e.fc_norm(x[:, 1:])
    with torch.autocast(h.device.type, enabled=False):  # the official encode_task_layer runs in float32
      z = F.normalize(self.encode_task_layer(h.float()), dim=-1)
      return torch.argmax(z @ self.codebook.float().T, dim=-1)


class BEiTForMIM(nn.Module):
  """modeling_pretrain's VisionTransformerForMaskedImageModelingCLS with shared_lm_head=True."""

  def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, vocab: int = 8192,
               init_values: float = 0.1, drop_path_rate: float = 0.1, early_layers: int = 9, head_layers: int = 2):
    super().__init__()
    from timm.models.beit import RelativePositionBias
    grid = img // patch
    self.early_layers = early_layers
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.rel_pos_bias = RelativePositionBias((grid, grid), heads)
    self.blocks = _blocks(dim, heads, depth, init_values, np.linspace(0, drop_path_rate, depth).tolist())
    self.norm = LN(dim)
    self.lm_head = nn.Linear(dim, vocab)
    agg_rates = np.linspace(0, drop_path_rate, max(depth, early_layers + head_layers))
    self.cls_pt_layers = _blocks(dim, heads, head_layers, init_values,
                                 agg_rates[early_layers:early_layers + head_layers].tolist())

  def forward(self, images, mask, idx):
    """images (B, 3, H, W) normalised, mask (B, N) bool, idx (B, M) masked positions -> 2 x (B, M, vocab)."""
    x = self.patch_embed(images)
    w = mask.unsqueeze(-1).type_as(x)
    x = x * (1 - w) + self.mask_token * w
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    bias = self.rel_pos_bias()
    early = None
    for i, blk in enumerate(self.blocks):
      x = blk(x, shared_rel_pos_bias=bias)
      if i + 1 == self.early_layers:
        early = x
    heads = lambda t: self.lm_head(self.norm(torch.gather(t[:, 1:], 1, idx[..., None].expand(-1, -1, t.shape[-1]))))
    main = heads(x)
    x = torch.cat([x[:, :1], early[:, 1:]], dim=1)
    for blk in self.cls_pt_layers:
      x = blk(x, shared_rel_pos_bias=bias)
    return main, heads(x)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def masked_positions(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
  """Row-major indices of the masked patches (as beitv2_jax.models.mim.masked_positions)."""
  return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :num_masked]


def losses(student, tokenizer, batch, num_masked: int):
  """(loss, main logits, aggregation logits, labels) for a batch of uint8 NCHW images and bool masks."""
  mean = torch.tensor(IMAGENET_MEAN, device=batch["image"].device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=batch["image"].device).view(1, 3, 1, 1)
  ids = tokenizer(batch["tokenizer_image"].float() / 255.0)
  idx = masked_positions(batch["mask"], num_masked)
  labels = torch.gather(ids, 1, idx)
  main, agg = student((batch["image"].float() / 255.0 - mean) / std, batch["mask"], idx)
  main, agg = main.float(), agg.float()
  loss = (F.cross_entropy(main.flatten(0, 1), labels.flatten())
          + F.cross_entropy(agg.flatten(0, 1), labels.flatten()))
  return loss, main, agg, labels


def param_groups(model: nn.Module, weight_decay: float):
  """The official optim_factory groups: no decay for 1-D tensors, biases and the skip list."""
  skip = {"cls_token", "pos_embed"}
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(p)
  return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(size: str, device: str):
  from beitv2_jax.config_defaults import vit_model
  m = vit_model(size)
  dims = (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads)
  early = max(1, m.depth - 3)
  student = BEiTForMIM(*dims, vocab=8192, early_layers=early).to(device)
  tokenizer = VQKDEncoder(*dims, codebook_size=8192).to(device).eval()
  return student, tokenizer, m, early


def flops_per_image(m, early: int, num_masked: int, head_layers: int = 2) -> float:
  """pretrain.PretrainTask's count: 3 x (student fwd + aggregation blocks + two heads) + tokenizer fwd."""
  n = (m.img_size // m.patch_size) ** 2 + 1
  student = (flops.vit_forward_flops(m.img_size, m.patch_size, m.embed_dim, m.depth, m.mlp_ratio)
             + head_layers * flops.block_forward_flops(n, m.embed_dim, m.mlp_ratio)
             + 2 * flops.linear_flops(num_masked, m.embed_dim, 8192))
  return 3 * student + flops.vit_forward_flops(m.img_size, m.patch_size, m.embed_dim, m.depth, m.mlp_ratio)


def synthetic_batch(m, batch: int, device: str) -> tuple[dict, int]:
  """uint8 images and BEiT v2 block masks (our generator: 75 of 196 patches at ViT-B/16)."""
  from beitv2_jax.data.masking import MaskingGenerator
  grid = m.img_size // m.patch_size
  gen = MaskingGenerator.from_ratio((grid, grid), 75 / 196, 16 if grid >= 14 else 4)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (batch, 3, m.img_size, m.img_size), dtype=np.uint8))
  mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)).reshape(-1).astype(bool) for i in range(batch)]))
  return ({"image": images.to(device), "tokenizer_image": images.clone().to(device), "mask": mask.to(device)},
          gen.num_masking_patches)


def bench(size: str, batch: int, steps: int, compile_model: bool, device: str, dtype: str) -> dict:
  torch.manual_seed(0)
  student, tokenizer, m, early = build(size, device)
  b, num_masked = synthetic_batch(m, batch, device)
  fused = device == "cuda"
  opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1.5e-3, betas=(0.9, 0.999), eps=1e-8, fused=fused)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  loss_fn = losses
  if compile_model:
    student_c, tokenizer_c = torch.compile(student), torch.compile(tokenizer)
  else:
    student_c, tokenizer_c = student, tokenizer

  def step():
    with autocast:
      loss = loss_fn(student_c, tokenizer_c, b, num_masked)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0, foreach=True)
    opt.step()
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(2):  # warm-up (and compilation)
    loss = step()
  sync()
  warm_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  dt = (time.perf_counter() - t0) / steps
  fl = flops_per_image(m, early, num_masked)
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  tflops = fl * batch / dt / 1e12
  return dict(task="pretrain (torch peer)", size=size, dtype=dtype, batch=batch, compile=compile_model,
              device=kind, torch=torch.__version__, step_ms=1000 * dt, img_per_sec=batch / dt,
              gflops_per_img=fl / 1e9, model_tflops=tflops, mfu=tflops * 1e12 / peak if peak else None,
              peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
              warmup_s=warm_s, loss=loss.item())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="tiny", choices=("tiny", "small", "base", "large"))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--compile", default="0", help="comma list of 0 | 1: eager and/or torch.compile")
  ap.add_argument("--dtype", default=None, help="bfloat16 (autocast, default on a GPU) | float32")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  for c in a.compile.split(","):
    row = bench(a.size, a.batch, a.steps, c == "1", device, dtype)
    print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
