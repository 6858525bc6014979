"""The norm-EMA vector quantizer of VQ-KD (docs/method.md §1.2), as pure functions over a `Codebook` pytree.

The codebook is not a parameter: gradients never touch it. Each training step moves every used code by
`E <- l2norm(decay * E + (1 - decay) * l2norm(mean of the vectors assigned to it))`, with counts and sums
taken over the *global* batch. Under `jax.jit` with sharded inputs the sums below are global by
construction (XLA inserts the all-reduce); under `shard_map` pass `axis_name` to psum explicitly.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Codebook:
  embedding: Array      # (K, D) unit vectors
  usage: Array          # (K,) EMA of assignment counts (official `quantize.cluster_size`)
  interval_counts: Array  # (K,) assignments since the last log interval (for codebook_usage)
  last_used: Array      # (K,) int32 step at which each code was last assigned (dead-code restart)
  initted: Array        # () bool, k-means init done

  @property
  def size(self) -> int:
    return self.embedding.shape[0]


def l2norm(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def new_codebook(key: Array, size: int, dim: int, initted: bool = False) -> Codebook:
  """l2norm(randn) codes (the official fallback without k-means); k-means init replaces them."""
  return Codebook(embedding=l2norm(jax.random.normal(key, (size, dim), jnp.float32)),
                  usage=jnp.zeros((size,), jnp.float32), interval_counts=jnp.zeros((size,), jnp.float32),
                  last_used=jnp.zeros((size,), jnp.int32), initted=jnp.asarray(initted))


# The code search and k-means compare cosines that differ in the 3rd-4th decimal for near-ties: at JAX's
# default matmul precision a float32 product is one bfloat16 pass on TPUs and TF32 on recent GPUs, which
# alone moved 0.9% / 0.1% of a ViT-B tokenizer's labels (benchmarks/label_precision.py, emulated). The
# search is ~1% of a MIM step's FLOPs, so it runs in true float32.
SEARCH_PRECISION = jax.lax.Precision.HIGHEST


def nearest_code(embedding: Array, z: Array) -> Array:
  """Index of the nearest code by cosine (== argmin squared L2 for unit vectors). z: (..., D)."""
  sim = jnp.einsum("...d,kd->...k", z.astype(jnp.float32), embedding.astype(jnp.float32),
                   precision=SEARCH_PRECISION)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def quantize(embedding: Array, z: Array) -> tuple[Array, Array, Array]:
  """z: (..., D) l2-normalised encoder output.

  Returns (z_q with the straight-through gradient to z, commitment loss (beta 1, mean over all
  elements), code ids)."""
  ids = nearest_code(embedding, z)
  zq = embedding[ids]
  commit = jnp.mean((jax.lax.stop_gradient(zq) - z) ** 2)
  zq_st = z + jax.lax.stop_gradient(zq - z)
  return zq_st, commit, ids


def code_stats(z: Array, ids: Array, size: int, axis_name: Optional[str] = None) -> tuple[Array, Array]:
  """(bins (K,), sums (K, D)) over the batch; psum'd over `axis_name` inside shard_map."""
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  ids = ids.reshape(-1)
  bins = jnp.zeros((size,), jnp.float32).at[ids].add(1.0)
  sums = jax.ops.segment_sum(z, ids, num_segments=size)
  if axis_name is not None:
    bins, sums = jax.lax.psum((bins, sums), axis_name)
  return bins, sums


def ema_update(cb: Codebook, z: Array, ids: Array, decay: float = 0.99, step: Array | int = 0,
               axis_name: Optional[str] = None, restart_after: int = 0,
               restart_key: Optional[Array] = None) -> Codebook:
  """One norm-EMA step (docs/method.md §1.2.5). z: (..., D) l2-normalised vectors, ids their codes.

  restart_after > 0 enables the (non-official) dead-code restart: a code not assigned for that many
  steps is re-seeded with a random vector of the current batch.
  """
  bins, sums = code_stats(z, ids, cb.size, axis_name)
  mean = l2norm(sums / jnp.maximum(bins, 1.0)[:, None])
  mean = jnp.where((bins == 0)[:, None], cb.embedding, mean)
  embedding = l2norm(decay * cb.embedding + (1 - decay) * mean)
  step = jnp.asarray(step, jnp.int32)
  last_used = jnp.where(bins > 0, step, cb.last_used)
  if restart_after > 0:
    flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    if axis_name is not None:  # every device must pick the same replacements
      flat = jax.lax.all_gather(flat, axis_name, tiled=True)
    dead = (step - last_used) >= restart_after
    pick = jax.random.randint(restart_key, (cb.size,), 0, flat.shape[0])
    embedding = jnp.where(dead[:, None], l2norm(flat[pick]), embedding)
    last_used = jnp.where(dead, step, last_used)
  return cb.replace(embedding=embedding, usage=decay * cb.usage + (1 - decay) * bins,
                    interval_counts=cb.interval_counts + bins, last_used=last_used)


def kmeans(z: Array, size: int, key: Array, iters: int = 10) -> tuple[Array, Array]:
  """Cosine k-means as the official `kmeans(..., use_cosine_sim=True)`: initial means are `size` random
  rows (without replacement when there are enough), assignment by max dot product, new mean = l2norm of
  the mean of the assigned vectors, empty clusters keep their mean. Returns (means (K, D), bins (K,))."""
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  n = z.shape[0]
  if n >= size:
    first = jax.random.permutation(key, n)[:size]
  else:
    first = jax.random.randint(key, (size,), 0, n)
  means = z[first]

  def body(_, carry):
    means, _ = carry
    ids = jnp.argmax(jnp.matmul(z, means.T, precision=SEARCH_PRECISION), axis=-1)
    bins = jnp.zeros((size,), jnp.float32).at[ids].add(1.0)
    sums = jax.ops.segment_sum(z, ids, num_segments=size)
    new = l2norm(sums / jnp.maximum(bins, 1.0)[:, None])
    return jnp.where((bins == 0)[:, None], means, new), bins

  return jax.lax.fori_loop(0, iters, body, (means, jnp.zeros((size,), jnp.float32)))


def kmeans_init(cb: Codebook, z: Array, key: Array, iters: int = 10) -> Codebook:
  """The codebook replaced by k-means on this (global) batch, as the official first training forward does
  when `kmeans_init` is set. The tokenizer runs it in its first step only (TokenizerTask.first_step): a
  conditional inside every step would make the GPU wait for the host each step."""
  means, _ = kmeans(z, cb.size, key, iters)
  # The usage EMA (official `quantize.cluster_size`) starts from zero: the official k-means copies its bin
  # counts into `embedding.cluster_size`, a buffer that is never read again, not into the usage EMA.
  return cb.replace(embedding=means, usage=jnp.zeros_like(cb.usage), initted=jnp.asarray(True))


def usage_metrics(counts: Array) -> dict[str, Array]:
  """Fraction of codes used and perplexity of the code distribution, from assignment counts."""
  total = jnp.maximum(counts.sum(), 1.0)
  p = counts / total
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"codebook_usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy),
          "unused_codes": jnp.sum(counts == 0)}
