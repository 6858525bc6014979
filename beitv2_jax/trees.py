"""Nested-dict parameter trees: flatten / unflatten by path, map over leaves, and the official key of a path.

Our parameter paths mirror the official PyTorch keys (`blocks_3/attn/qkv/kernel` is `blocks.3.attn.qkv.weight`),
so `path_to_key` is the one naming rule that the converter, the optimizer's parameter groups and the teacher
loader share.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  """{'a': {'b': x}} -> {('a', 'b'): x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  """Inverse of flatten."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def leaves(tree) -> list:
  return list(flatten(tree).values()) if isinstance(tree, Mapping) else [tree]


def map_leaves(tree: Mapping, fn: Callable) -> dict:
  return {k: map_leaves(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def map_leaves_multi(trees: list, fn: Callable) -> dict:
  """fn over the corresponding leaves of several trees of one structure."""
  first = trees[0]
  return {k: map_leaves_multi([t[k] for t in trees], fn) if isinstance(first[k], Mapping)
          else fn(*[t[k] for t in trees]) for k in first}


def path_to_key(path: Iterable[str]) -> str:
  """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
  parts = []
  for p in path:
    if p == "patch_embed_proj":
      parts += ["patch_embed", "proj"]
      continue
    m = re.fullmatch(r"(.+)_(\d+)", p)
    if m and not p.startswith("gamma_"):
      parts += [m.group(1), m.group(2)]
    else:
      parts.append({"kernel": "weight", "scale": "weight"}.get(p, p))
  return ".".join(parts)
