"""AdamW as the official scripts build it: per-step warm-up + cosine, weight-decay exclusions, layer-wise
lr decay, optional global-norm clipping."""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beitv2_jax.trees import flatten, path_to_key, unflatten


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> Callable:
  """utils.cosine_scheduler: linspace(0, base, W) warm-up, then final + (base-final)/2 (1 + cos(pi i/(T-W)))."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = int(min(warmup_steps, total_steps))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * step / max(warmup_steps - 1, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def official_key(path: tuple) -> str:
  return path_to_key(tuple(str(p) for p in path))


def decay_mask(params, skip_names: Sequence[str] = ("cls_token", "pos_embed")) -> dict:
  """True where weight decay applies: not on 1-D params (norms, gammas, q/v biases), biases, or the
  named tokens (official `get_parameter_groups`; mask_token and rel-pos tables ARE decayed). Scanned
  params carry a leading layer axis, so 'ndim' is judged per layer."""
  def decide(path, leaf):
    name = official_key(path)
    ndim = leaf.ndim - (1 if _is_scanned_path(path) else 0)
    last = name.split(".")[-1]
    return not (ndim <= 1 or name.endswith(".bias") or last in skip_names)
  return unflatten({p: decide(p, a) for p, a in flatten(params).items()})


def _is_scanned_path(path) -> bool:
  return any(a == "blocks" and b == "block" for a, b in zip(path[:-1], path[1:]))


def layer_id(path: tuple, depth: int) -> int:
  """Official layer ids for layer-wise lr decay: 0 for embeddings, i+1 for block i, depth+1 otherwise."""
  name = official_key(path)
  name = re.sub(r"^(backbone|encoder)\.", "", name)
  if name.split(".")[0] in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  m = re.match(r"blocks\.(\d+)\.", name)
  if m:
    return int(m.group(1)) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float) -> dict:
  """decay ** (depth + 1 - layer_id) per parameter; scanned blocks get a (depth, 1, ...) array."""
  def scale(path, leaf):
    if _is_scanned_path(path):
      ids = np.arange(leaf.shape[0]) + 1
      return jnp.asarray(decay ** (depth + 1 - ids), jnp.float32).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return jnp.asarray(decay ** (depth + 1 - layer_id(path, depth)), jnp.float32)
  return unflatten({p: scale(p, a) for p, a in flatten(params).items()})


def scale_by_tree(scales) -> optax.GradientTransformation:
  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None):
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(init, update)


def adamw(params, schedule: Callable, b1: float, b2: float, eps: float, weight_decay: float,
          clip_grad: Optional[float] = None, layer_decay: Optional[float] = None, depth: int = 0,
          trainable: Optional[dict] = None) -> optax.GradientTransformation:
  """clip -> Adam -> decoupled weight decay (masked) -> lr schedule -> layer-decay scale.

  The per-group lr of the official code multiplies both the Adam step and the decay term, which is what
  scaling the final update does. `trainable` (bool tree) freezes params with zero updates.
  """
  parts = []
  if clip_grad:
    parts.append(optax.clip_by_global_norm(clip_grad))
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(weight_decay, mask=decay_mask(params)),
            optax.scale_by_learning_rate(schedule)]
  if layer_decay is not None and layer_decay != 1.0:
    parts.append(scale_by_tree(layer_decay_scales(params, depth, layer_decay)))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
