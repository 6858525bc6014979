"""The BEiT ViT backbone (docs/method.md §0), shared by the tokenizer, the MIM student and the classifier.

Parameter names mirror the official PyTorch state-dict keys (`blocks_3/attn/qkv/kernel` is
`blocks.3.attn.qkv.weight`), so that `convert.py` is a renaming plus transposes. With `scan=True` the
blocks live stacked under `blocks/` (leading axis = layer); `convert.py` stacks and unstacks.

Numerics: parameters, LayerNorms, softmax and the residual stream are float32; matmuls run in `dtype`
(bfloat16 on accelerators).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax.kernels.add_layernorm import add_layernorm
from beitv2_jax.models import attention as attention_lib
from beitv2_jax.models.build import ADD_NORM, PATCH_EMBED

Array = jax.Array
LN_EPS = 1e-6  # official BEiT; HF's BeitConfig default (1e-12) is wrong for these weights.


# ------------------------------------------------------------------------------------------------
# Initialisers. Two official conventions (docs/method.md §1.4, §3.2, §7.10) plus PyTorch's defaults.
# ------------------------------------------------------------------------------------------------
def trunc_normal(std: float = 0.02, bound_in_std: float = 2.0 / 0.02):
  """timm trunc_normal_(std, a, b) with bounds given in units of std (no variance correction)."""
  return nn.initializers.truncated_normal(stddev=std, lower=-bound_in_std, upper=bound_in_std)


def torch_default_kernel():
  """PyTorch nn.Linear / nn.Conv2d default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# init_style -> (linear kernel, linear bias given fan_in, patch conv kernel, patch conv bias, token init)
#  "finetune": modeling_finetune / modeling_vqkd: trunc_normal(.02) with absolute +-2 bounds (so plain
#              N(0, .02)); the patch conv keeps PyTorch's default init.
#  "pretrain": modeling_pretrain: truncation at +-1 std (effective std ~0.0108), conv included.
#  "torch":    modules built after `apply(_init_weights)`: PyTorch defaults, non-zero biases.
def _inits(style: str):
  zeros = lambda fan_in: nn.initializers.zeros
  if style == "finetune":
    return trunc_normal(0.02), zeros, torch_default_kernel(), torch_default_bias, trunc_normal(0.02)
  if style == "pretrain":
    t1 = trunc_normal(0.02, 1.0)
    return t1, zeros, t1, zeros, t1
  if style == "torch":
    return torch_default_kernel(), torch_default_bias, torch_default_kernel(), torch_default_bias, trunc_normal(0.02)
  raise ValueError(f"unknown init_style {style!r}; expected 'finetune', 'pretrain' or 'torch'")


def relative_position_index(window: Sequence[int]) -> np.ndarray:
  """BEiT's (N+1, N+1) index into a [(2h-1)(2w-1)+3, H] table; row/col 0 is the CLS token."""
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()
  rel[:, :, 0] += wh - 1
  rel[:, :, 1] += ww - 1
  rel[:, :, 0] *= 2 * ww - 1
  num_rel = (2 * wh - 1) * (2 * ww - 1) + 3
  idx = np.zeros((wh * ww + 1,) * 2, dtype=np.int32)
  idx[1:, 1:] = rel.sum(-1)
  idx[0, :] = num_rel - 3  # CLS -> patch
  idx[:, 0] = num_rel - 2  # patch -> CLS
  idx[0, 0] = num_rel - 1  # CLS -> CLS
  return idx


def num_relative_distance(window: Sequence[int]) -> int:
  return (2 * window[0] - 1) * (2 * window[1] - 1) + 3


def gather_rel_pos_bias(table: Array, window: Sequence[int]) -> Array:
  """(num_relative_distance, heads) table -> (heads, N+1, N+1) attention bias."""
  idx = relative_position_index(window)
  n = idx.shape[0]
  return table[idx.reshape(-1)].reshape(n, n, table.shape[-1]).transpose(2, 0, 1)


class RelativePositionBias(nn.Module):
  """The shared table of the MIM model (`rel_pos_bias.relative_position_bias_table`), zero init."""
  window: Sequence[int]
  num_heads: int

  @nn.compact
  def __call__(self) -> Array:
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (num_relative_distance(self.window), self.num_heads))
    return gather_rel_pos_bias(table, self.window)


# ------------------------------------------------------------------------------------------------
# Block
# ------------------------------------------------------------------------------------------------
class QKV(nn.Module):
  """The fused q/k/v projection's parameter (`attn/qkv/kernel`, (D, 3D), official `attn.qkv.weight`),
  applied as three matmuls: q, k and v come out contiguous, (B, N, D) each, where slicing one (B, N, 3D)
  product would copy them. Same products, same initialisation as nn.Dense(3D, use_bias=False)."""
  kernel_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (d, 3 * d)).astype(self.dtype)
    x = x.astype(self.dtype)
    return tuple(x @ kernel[:, i * d:(i + 1) * d] for i in range(3))


class Attention(nn.Module):
  num_heads: int
  window: Optional[Sequence[int]] = None  # per-layer relative position table when set
  init_style: str = "finetune"
  dtype: Any = jnp.float32
  attention: str = "auto"  # models/attention.py: "auto" | "xla" | "cudnn"

  @nn.compact
  def __call__(self, x: Array, rel_pos_bias: Optional[Array] = None) -> Array:
    b, n, d = x.shape
    h = self.num_heads
    kinit, binit, *_ = _inits(self.init_style)
    impl = attention_lib.resolve(self.attention, self.dtype, d // h)
    # The fused kernel wants a multiple of 8 tokens: pad once here, so that q, k, v come out padded.
    x = attention_lib.pad_tokens(x, impl)
    n_pad = x.shape[1]
    q, k, v = QKV(kinit, self.dtype, name="qkv")(x)
    # The k bias is a constant zero (official: concat(q_bias, zeros, v_bias)).
    q = q + self.param("q_bias", nn.initializers.zeros, (d,)).astype(q.dtype)
    v = v + self.param("v_bias", nn.initializers.zeros, (d,)).astype(v.dtype)
    q, k, v = (t.reshape(b, n_pad, h, d // h) for t in (q, k, v))
    bias = rel_pos_bias
    if self.window is not None:
      table = self.param("relative_position_bias_table", nn.initializers.zeros,
                         (num_relative_distance(self.window), h))
      own = gather_rel_pos_bias(table, self.window)
      bias = own if bias is None else own + bias
    out = attention_lib.attention(q, k, v, bias, impl, valid=n)
    out = nn.Dense(d, kernel_init=kinit, bias_init=binit(d), dtype=self.dtype, name="proj")(out.reshape(b, n_pad, d))
    return out[:, :n]  # the padded rows go (the slice fuses into the residual add)


@jax.custom_vjp
def gelu(x: Array) -> Array:
  """Exact (erf) GELU, torch's nn.GELU(): computed in float32, rounded once to x's dtype.

  The backward is torch's formula, dy * (cdf(x) + x * pdf(x)), recomputed from x (which the backward
  keeps anyway) behind an optimization barrier. Autodiff of jax.nn.gelu instead writes its erfc term out
  in the forward and reads it back: one more (B, N, 4D) tensor each way, per block."""
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  xf = x.astype(jnp.float32)
  return (0.5 * xf * jax.lax.erfc(-xf * _SQRT_HALF)).astype(x.dtype), x


def _gelu_bwd(x, g):
  # the barrier keeps XLA from sharing the forward's erfc with this (and so storing it between the two)
  xf = jax.lax.optimization_barrier(x).astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
  hidden: int
  init_style: str = "finetune"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    kinit, binit, *_ = _inits(self.init_style)
    x = nn.Dense(self.hidden, kernel_init=kinit, bias_init=binit(d), dtype=self.dtype, name="fc1")(x)
    x = gelu(x)  # exact erf GELU, as torch nn.GELU
    return nn.Dense(d, kernel_init=kinit, bias_init=binit(self.hidden), dtype=self.dtype, name="fc2")(x)


def drop_path_scale(batch: int, rate: Array | float, rng: Array) -> Array:
  """(batch,) float32: drop_path's factor per example (0, or 1 / keep), the same draw as drop_path's."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (batch,))
  return jnp.where(mask, 1.0 / jnp.maximum(keep, 1e-12), 0.0)


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
  """timm drop_path: drop whole samples, rescale survivors by 1/keep."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0).astype(x.dtype)


def check_add_norm(add_norm: str, backend: str | None = None, platform: str | None = None,
                   device_count: int | None = None) -> bool:
  """True for the Pallas residual add + LayerNorm. "pallas" is a Triton kernel: GPUs run it compiled, CPUs in
  interpret mode (tests); XLA cannot partition its call, so on GPUs it runs on one device for now. The backend,
  device platform and count are this process's, or a compile target's (beitv2_jax.aot)."""
  if add_norm not in ADD_NORM:
    raise ValueError(f"model.add_norm={add_norm!r}: expected one of {ADD_NORM}")
  if add_norm != "pallas":
    return False
  backend = backend or jax.default_backend()
  if backend == "tpu":
    raise ValueError("model.add_norm='pallas' is a Triton kernel (GPUs); on TPUs use 'xla'")
  if backend == "gpu" and (platform or jax.devices()[0].platform) != "cuda":
    raise ValueError("model.add_norm='pallas' is compiled for NVIDIA GPUs only; use 'xla'")
  count = device_count or jax.device_count()
  if backend == "gpu" and count > 1:
    raise ValueError(f"model.add_norm='pallas' runs on one GPU for now ({count} here: XLA cannot "
                     "partition the Triton call); use 'xla'")
  return True


class AddNorm(nn.Module):
  """(x + row_scale * gamma * h, LayerNorm of that sum) in one Pallas kernel (kernels/add_layernorm.py), with
  nn.LayerNorm's parameters (`scale`, `bias`): the same checkpoint as the unfused block."""

  @nn.compact
  def __call__(self, x: Array, h: Array, gamma: Array, row_scale: Array, out_dtype) -> tuple[Array, Array]:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    return add_layernorm(x, h, gamma, row_scale, scale, bias, LN_EPS, out_dtype)  # compiled on CUDA only


class Block(nn.Module):
  """Pre-LN block: x + DropPath(gamma_1 * Attn(LN(x))), x + DropPath(gamma_2 * MLP(LN(x))).

  add_norm="pallas" computes the attention branch's residual add and norm2 in one kernel (same math; drop
  path as a per-example scale 0 or 1 / keep). residual_dtype=bfloat16 (opt-in, not the official numerics)
  stores x between blocks in bfloat16: half the bytes of every residual add and LayerNorm input; the adds
  and the LayerNorm statistics still run in float32."""
  num_heads: int
  mlp_ratio: float = 4.0
  init_values: float = 0.0  # 0 -> no layer scale
  window: Optional[Sequence[int]] = None
  use_drop_path: bool = False
  init_style: str = "finetune"
  dtype: Any = jnp.float32
  attention: str = "auto"
  add_norm: str = "xla"
  residual_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, rel_pos_bias: Optional[Array] = None, drop_path_rate: Array | float = 0.0,
               train: bool = False) -> Array:
    d = x.shape[-1]
    x = x.astype(self.residual_dtype)
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)
    attn = Attention(self.num_heads, self.window, self.init_style, self.dtype, self.attention, name="attn")
    mlp = Mlp(int(d * self.mlp_ratio), self.init_style, self.dtype, name="mlp")
    gamma = lambda i: (self.param(f"gamma_{i}", nn.initializers.constant(self.init_values), (d,))
                       if self.init_values > 0 else None)
    dropping = train and self.use_drop_path
    if check_add_norm(self.add_norm):
      h = attn(ln("norm1")(x).astype(self.dtype), rel_pos_bias)
      row_scale = (drop_path_scale(x.shape[0], drop_path_rate, self.make_rng("dropout"))[:, None]
                   * jnp.ones(x.shape[:2]) if dropping else jnp.ones(x.shape[:2]))
      g1 = gamma(1)
      x, n2 = AddNorm(name="norm2")(x, h, jnp.ones((d,)) if g1 is None else g1, row_scale, self.dtype)
      branches = [("2", mlp, lambda _: n2)]
    else:
      branches = [("1", lambda y: attn(y, rel_pos_bias), lambda x: ln("norm1")(x).astype(self.dtype)),
                  ("2", mlp, lambda x: ln("norm2")(x).astype(self.dtype))]
    for i, fn, norm in branches:
      y = fn(norm(x)).astype(jnp.float32)
      g = gamma(i)
      if g is not None:
        y = y * g
      if dropping:
        y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
      # the add in float32, the sum stored in residual_dtype (one rounding; gamma's gradient summed in float32)
      x = (x.astype(jnp.float32) + y).astype(self.residual_dtype)
    return x


class _ScanBlock(nn.Module):
  """Adapter so that nn.scan can carry x and feed per-layer drop-path rates."""
  block_kwargs: dict
  train: bool = False

  @nn.compact
  def __call__(self, x, rate, rel_pos_bias):
    x = Block(**self.block_kwargs, name="block")(x, rel_pos_bias, rate, self.train)
    return x, x


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_blocks(x, name: str, depth: int, block_kwargs: dict, drop_path_rates: Sequence[float],
               rel_pos_bias=None, train: bool = False, scan: bool = False, remat: str = "none"):
  """Applies `depth` blocks inside the calling module's compact method.

  Unrolled, the params are `{name}_i`; scanned, they are stacked under `{name}/block`.
  Returns the final x and every block's output stacked, shape (depth, B, N, D).
  """
  rates = jnp.asarray(drop_path_rates, jnp.float32)
  x = x.astype(block_kwargs.get("residual_dtype", jnp.float32))  # scan's carry keeps one dtype
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  policy = REMAT_POLICIES[remat]
  if scan:
    body = _ScanBlock if remat == "none" else nn.remat(_ScanBlock, policy=policy, prevent_cse=False)
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=depth)
    return scanned(block_kwargs, train, name=name)(x, rates, rel_pos_bias)
  block_cls = Block if remat == "none" else nn.remat(Block, policy=policy, static_argnums=(4,))
  hidden = []
  for i in range(depth):
    x = block_cls(**block_kwargs, name=f"{name}_{i}")(x, rel_pos_bias, rates[i], train)
    hidden.append(x)
  return x, jnp.stack(hidden)


# ------------------------------------------------------------------------------------------------
# Vision transformer
# ------------------------------------------------------------------------------------------------
class PatchMatmul(nn.Module):
  """`nn.Conv(features, (p, p), strides=(p, p), padding="VALID")` with the same parameters (`kernel`
  (p, p, C, features), `bias`), the same initialisers and the same math, computed as a patchify reshape and
  one matmul. Why: on an H200, cuDNN ran the ViT-B 16x16 stride-16 patch conv at ~5% of its roofline (an
  indexed implicit GEMM, 1.9 ms per step; benchmarks/RESULTS.md), where the same product as a GEMM is one
  cuBLAS call."""
  features: int
  patch_size: int
  kernel_init: Any
  bias_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    b, h, w, c = images.shape
    p = self.patch_size
    kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    # (B, H, W, C) -> (B, H/p, W/p, p, p, C): each patch's pixels in the kernel's (row, column, channel) order
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
    y = jnp.dot(patches, kernel.reshape(p * p * c, self.features).astype(self.dtype))
    return y + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
  """BEiT `VisionTransformer` (modeling_finetune) and the MIM/tokenizer variants.

  rel_pos: "none" | "shared" (one table, `rel_pos_bias/...`) | "layer" (a table in every block).
  final_norm: "norm" (LayerNorm on every token; CLS pooling), "fc_norm" (LayerNorm on the mean of the
    patch tokens and, for the tokenizer, on each patch token) or "none" (the MIM model applies its own).
  """
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  num_classes: int = 0
  use_abs_pos_emb: bool = False
  rel_pos: str = "layer"
  init_values: float = 0.1
  drop_path_rate: float = 0.0
  use_mask_token: bool = False
  final_norm: str = "fc_norm"
  init_style: str = "finetune"
  head_init_scale: float = 1.0
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = "none"
  attention: str = "auto"  # an execution choice like dtype: never stored with a checkpoint
  add_norm: str = "xla"    # "pallas": Block's fused residual add + norm2 (execution, like attention)
  residual_dtype: Any = jnp.float32  # bfloat16: x between blocks in bf16 (opt-in numerics change)
  patch_embed: str = "conv"  # "matmul": the patch conv as patchify + one matmul (execution, same math)

  @property
  def grid(self) -> tuple[int, int]:
    return (self.img_size // self.patch_size,) * 2

  def block_kwargs(self, init_style: Optional[str] = None) -> dict:
    return dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, init_values=self.init_values,
                window=self.grid if self.rel_pos == "layer" else None,
                use_drop_path=self.drop_path_rate > 0, init_style=init_style or self.init_style,
                dtype=self.dtype, attention=self.attention, add_norm=self.add_norm,
                residual_dtype=self.residual_dtype)

  def embed(self, images: Array, mask: Optional[Array]) -> Array:
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by patch size {self.patch_size}")
    *_, conv_k, conv_b, tok = _inits(self.init_style)
    fan_in = images.shape[-1] * self.patch_size ** 2
    if self.patch_embed not in PATCH_EMBED:
      raise ValueError(f"model.patch_embed={self.patch_embed!r}: expected one of {PATCH_EMBED}")
    if self.patch_embed == "matmul":
      proj = PatchMatmul(self.embed_dim, self.patch_size, conv_k, conv_b(fan_in), dtype=self.dtype,
                         name="patch_embed_proj")
    else:
      proj = nn.Conv(self.embed_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                     kernel_init=conv_k, bias_init=conv_b(fan_in), dtype=self.dtype, name="patch_embed_proj")
    x = proj(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d).astype(jnp.float32)
    if self.use_mask_token:
      mask_token = self.param("mask_token", tok, (1, 1, d))
      if mask is not None:
        w = mask.reshape(b, gh * gw, 1).astype(x.dtype)
        x = x * (1 - w) + mask_token * w
    cls = self.param("cls_token", tok, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    if self.use_abs_pos_emb:
      x = x + self.param("pos_embed", tok, (1, gh * gw + 1, d))
    return x

  @nn.compact
  def __call__(self, images: Array, mask: Optional[Array] = None, train: bool = False) -> dict:
    """images: (B, H, W, C) float. mask: optional (B, N) bool, True where [MASK] replaces the patch.

    Returns a dict: `x` (B, N+1, D) last block output before any norm, `hidden` (depth, B, N+1, D) every
    block's output, `rel_pos_bias` (the shared bias or None), and, by final_norm, `tokens` (normed tokens),
    `patch_tokens`, `pooled` (the head input) and `logits` when num_classes > 0.
    """
    x = self.embed(images, mask)
    rel_pos_bias = None
    if self.rel_pos == "shared":
      rel_pos_bias = RelativePositionBias(self.grid, self.num_heads, name="rel_pos_bias")()
    elif self.rel_pos not in ("layer", "none"):
      raise ValueError(f"rel_pos must be 'none', 'shared' or 'layer', got {self.rel_pos!r}")
    rates = np.linspace(0, self.drop_path_rate, self.depth).tolist()
    x, hidden = run_blocks(x, "blocks", self.depth, self.block_kwargs(), rates, rel_pos_bias, train,
                           self.scan, self.remat)
    x = x.astype(jnp.float32)  # a bfloat16 residual stream (residual_dtype) ends here; `hidden` keeps it
    out = {"x": x, "hidden": hidden, "rel_pos_bias": rel_pos_bias}
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)
    if self.final_norm == "norm":
      out["tokens"] = ln("norm")(x)
      out["patch_tokens"] = out["tokens"][:, 1:]
      out["pooled"] = out["tokens"][:, 0]
    elif self.final_norm == "fc_norm":
      fc_norm = ln("fc_norm")
      out["pooled"] = fc_norm(x[:, 1:].mean(axis=1))
      out["patch_tokens"] = fc_norm(x[:, 1:])
    elif self.final_norm != "none":
      raise ValueError(f"final_norm must be 'norm', 'fc_norm' or 'none', got {self.final_norm!r}")
    if self.num_classes > 0:
      scale = self.head_init_scale
      kinit = lambda *a: trunc_normal(0.02)(*a) * scale
      out["logits"] = nn.Dense(self.num_classes, kernel_init=kinit, name="head")(out["pooled"])
    return out


def classifier_kwargs(*, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, init_values,
                      drop_path_rate, final_norm, head_init_scale, num_classes) -> dict:
  """A fine-tuning `config.model` -> modeling_finetune's beit_*_patch16_224 (a relative position table in
  every block, layer scale, the fine-tuning init). final_norm "fc_norm": mean pooling, the official
  fine-tuning (use_mean_pooling); "norm": the [CLS] token."""
  return dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
              use_abs_pos_emb=False, rel_pos="layer", init_values=init_values, init_style="finetune",
              drop_path_rate=drop_path_rate, img_size=img_size, num_classes=num_classes, final_norm=final_norm,
              head_init_scale=head_init_scale)


def encoder_kwargs(*, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, init_values) -> dict:
  """A probe's or k-NN's `config.model` -> the BEiT v2 pretraining encoder (shared relative position table,
  layer scale, final norm, the pretraining init): what a random-init baseline measures."""
  return dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_ratio, use_abs_pos_emb=False, rel_pos="shared", init_values=init_values,
              use_mask_token=False, final_norm="norm", init_style="pretrain")


def rescale_init(params: dict, prefix_depth: Sequence[tuple[str, int]]) -> dict:
  """The official `fix_init_weight`: divide block i's (1-based) attn.proj and mlp.fc2 kernels by sqrt(2i).

  prefix_depth: (name, first_layer_id) pairs, e.g. [("blocks", 1)] or [("cls_pt_layers", early + 1)].
  Works on unrolled (`blocks_i`) and scanned (`blocks/block`, stacked) trees.
  """
  params = jax.tree.map(lambda a: a, params)  # shallow copy of the nested dicts

  def scale_block(block, factor):
    block = dict(block)
    for mod, sub in (("attn", "proj"), ("mlp", "fc2")):
      m = dict(block[mod]); s = dict(m[sub])
      k = s["kernel"]
      f = jnp.asarray(factor, k.dtype).reshape((-1,) + (1,) * (k.ndim - 1)) if np.ndim(factor) else factor
      s["kernel"] = k / f
      m[sub] = s; block[mod] = m
    return block

  for name, first in prefix_depth:
    if name in params and "block" in params[name]:  # scanned
      n = params[name]["block"]["attn"]["proj"]["kernel"].shape[0]
      factor = np.sqrt(2.0 * (np.arange(n) + first))
      params[name] = {"block": scale_block(params[name]["block"], factor)}
      continue
    i = 0
    while f"{name}_{i}" in params:
      params[f"{name}_{i}"] = scale_block(params[f"{name}_{i}"], math.sqrt(2.0 * (i + first)))
      i += 1
  return params
