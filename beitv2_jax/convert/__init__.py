"""Official / timm PyTorch state dicts <-> our Flax parameter trees (the unilm beit2 and timm key layouts).

Our parameter paths mirror the official keys, so one rule maps both ways:
  `blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight` (transposed), `norm1/scale` <-> `norm1.weight`,
  `patch_embed_proj/kernel` (kh, kw, in, out) <-> `patch_embed.proj.weight` (out, in, kh, kw).
Scanned models keep blocks stacked under `blocks/block`; they are unstacked before conversion.
Reading a file never runs code from it (read_state_dict: torch weights-only with argparse.Namespace allowed,
.npz without pickles); .safetensors is the preferred format.

The command line (`python -m beitv2_jax.convert`) is in `convert/__main__.py`: it loads through
`beitv2_jax.api`, which itself builds on this module.
"""
from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Iterable, Mapping

import numpy as np

from beitv2_jax import trees
from beitv2_jax.errors import one_line

# Keys the official / timm checkpoints carry that are buffers, not parameters.
BUFFER_PATTERNS = (r"(^|\.)relative_position_index$", r"(^|\.)k_bias$")


class CheckpointMismatchError(ValueError):
  """Missing, unexpected or mis-shaped keys between a state dict and a model."""


# ------------------------------------------------------------------------------------------------
# Reading state dicts
# ------------------------------------------------------------------------------------------------
# What official BEiT v2 / timm .pth files hold beyond tensors, containers and numbers: the training scripts
# save {'model', 'optimizer', 'epoch', 'scaler', 'args'} with `args` an argparse.Namespace. Anything else
# in a pickle is code the file could run on load, so it is refused.
TORCH_SAFE_GLOBALS = (argparse.Namespace,)
SAFETENSORS_PREFERRED = "safetensors files hold only tensors and are preferred"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth / .pt / .bin (torch), .safetensors or .npz file into {key: float32/int ndarray}.

  Official checkpoints nest the weights under 'model' (or 'module' for DeepSpeed fine-tunes, or
  'state_dict'); those wrappers are removed. Loading never runs code: torch files are read with
  weights_only=True (plus TORCH_SAFE_GLOBALS), .npz without pickles. A file that is not a checkpoint, or
  needs a Python global beyond those, raises one ValueError naming the file and the problem.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if not os.path.isfile(path):
    raise ValueError(f"{path} is not a file: expected a .pth / .pt / .bin, .safetensors or .npz checkpoint")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
  if path.endswith(".safetensors"):
    sd = _read_safetensors(path)
  elif path.endswith(".npz"):
    sd = _read_npz(path)
  else:
    sd = _read_torch(path)
  if not sd:
    raise ValueError(f"{path} holds no tensors: not a state dict")
  return {k: np.asarray(v) for k, v in sd.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (SafetensorError, ValueError, TypeError, OSError) as e:
    raise ValueError(f"{path} is not a valid .safetensors file: {one_line(e)}") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
  # numpy reports a non-zip file as "contains pickled data", which misleads: check the zip header first.
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a .npz archive (no zip header)")
  try:
    with np.load(path, allow_pickle=False) as archive:  # object arrays would unpickle: refused
      return {k: archive[k] for k in archive.files}
  except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a valid .npz of arrays: {one_line(e)}") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); .safetensors files do not") from e
  obj = _torch_load_weights_only(torch, path)
  for key in ("model", "module", "state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_load_weights_only(torch, path: str) -> Any:
  import pickle
  try:
    with torch.serialization.safe_globals(list(TORCH_SAFE_GLOBALS)):  # scoped: no global registration
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    name = _disallowed_global(str(e))
    if name:
      raise ValueError(f"refusing to load {path}: it needs the Python global {name}, and unpickling globals "
                       f"could run code (allowed beyond tensors: "
                       f"{', '.join(_qualname(g) for g in TORCH_SAFE_GLOBALS)}); {SAFETENSORS_PREFERRED}") from None
    raise ValueError(f"{path} is not a valid PyTorch checkpoint: {_unpickling_reason(str(e))}; "
                     f"{SAFETENSORS_PREFERRED}") from None
  except Exception as e:  # a corrupt or foreign file surfaces as EOFError, KeyError, RuntimeError, ...
    detail = " ".join(str(e).split())
    raise ValueError(f"{path} is not a valid PyTorch checkpoint "
                     f"({type(e).__name__}{': ' + detail if detail else ''})") from None


def _disallowed_global(message: str) -> str:
  """The global torch's weights-only unpickler refused ('GLOBAL posix.system ...'), or ''."""
  m = re.search(r"GLOBAL ([\w.]+)", message)
  return m.group(1) if m else ""


def _unpickling_reason(message: str) -> str:
  """torch's weights-only message without its advice to re-run with weights_only=False (unsafe)."""
  m = re.search(r"WeightsUnpickler error: ([^\n]+)", message)
  return m.group(1).strip() if m else " ".join(message.split())[:300]


def _qualname(obj) -> str:
  return f"{obj.__module__}.{obj.__qualname__}"


# ------------------------------------------------------------------------------------------------
# Scanned <-> per-layer blocks
# ------------------------------------------------------------------------------------------------
def unstack_scanned(params: Mapping) -> dict:
  """`{name}/block/...` stacked over layers -> `{name}_i/...` (any nesting level)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping) and set(v.keys()) == {"block"}:
      n = trees.leaves(v)[0].shape[0]
      for i in range(n):
        out[f"{k}_{i}"] = trees.map_leaves(v["block"], lambda a: a[i])
    elif isinstance(v, Mapping):
      out[k] = unstack_scanned(v)
    else:
      out[k] = v
  return out


def stack_for_scan(params: Mapping, template: Mapping) -> dict:
  """Inverse of unstack_scanned, following the layout of `template` (a scanned tree)."""
  out = {}
  for k, v in template.items():
    if isinstance(v, Mapping) and set(v.keys()) == {"block"}:
      n = trees.leaves(v)[0].shape[0]
      blocks = [params[f"{k}_{i}"] for i in range(n)]
      out[k] = {"block": trees.map_leaves_multi(blocks, lambda *xs: np.stack([np.asarray(x) for x in xs]))}
    elif isinstance(v, Mapping):
      out[k] = stack_for_scan(params[k], v)
    else:
      out[k] = params[k]
  return out


# ------------------------------------------------------------------------------------------------
# Key mapping
# ------------------------------------------------------------------------------------------------
def to_torch_layout(path: tuple, a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, dtype=np.float32)
  if path[-1] == "kernel":
    return a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1)
  return a


def from_torch_layout(path: tuple, a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, dtype=np.float32)
  if path[-1] == "kernel":
    return a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
  return a


def to_state_dict(params: Mapping, strip: str = "", add: str = "") -> dict[str, np.ndarray]:
  """Our params -> official/timm state dict. `strip`: a top-level subtree to unwrap (e.g. 'backbone');
  `add`: a key prefix to add (e.g. 'encoder.')."""
  params = unstack_scanned(params)
  out = {}
  for path, a in trees.flatten(params).items():
    if strip and path[0] == strip:
      path = path[1:]
    out[add + trees.path_to_key(path)] = to_torch_layout(path, a)
  return out


def from_state_dict(sd: Mapping[str, np.ndarray], template: Mapping, strip: str = "", add: str = "",
                    ignore: Iterable[str] = (), what: str = "checkpoint") -> dict:
  """Official/timm state dict -> our params shaped like `template` (a tree of arrays or ShapeDtypeStructs).

  Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key. Keys matching a
  regex in `ignore` (or a buffer) are allowed to be unused.
  """
  unrolled = unstack_scanned(trees.map_leaves(template, lambda a: np.zeros(a.shape, np.float32)))
  flat = trees.flatten(unrolled)
  used, missing, shapes = set(), [], []
  out = {}
  for path, ref in flat.items():
    tpath = path[1:] if strip and path[0] == strip else path
    key = add + trees.path_to_key(tpath)
    if key not in sd:
      missing.append(key)
      continue
    a = from_torch_layout(path, sd[key])
    if a.shape != ref.shape:
      shapes.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {_torch_shape(path, ref.shape)}")
      continue
    used.add(key)
    out[path] = a
  patterns = tuple(BUFFER_PATTERNS) + tuple(ignore)
  unexpected = [k for k in sd if k not in used and not any(re.search(p, k) for p in patterns)
                and k not in missing]
  if missing or unexpected or shapes:
    lines = [f"{what} does not match the model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise CheckpointMismatchError("\n".join(lines))
  tree = trees.unflatten(out)
  if _is_scanned(template):
    tree = stack_for_scan(tree, template)
  return tree


def _torch_shape(path, shape):
  if path[-1] == "kernel":
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _is_scanned(tree) -> bool:
  return any("block" in p and p[p.index("block") - 1] == "blocks" for p in trees.flatten(tree) if len(p) > 1)


# ------------------------------------------------------------------------------------------------
# Official-checkpoint surgery (as the official run_class_finetuning.py loads a pretraining checkpoint)
# ------------------------------------------------------------------------------------------------
def broadcast_shared_rel_pos(sd: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """A pretraining checkpoint's shared `rel_pos_bias.relative_position_bias_table` copied into every
  block (what run_class_finetuning.py does)."""
  sd = dict(sd)
  shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
  if shared is not None:
    for i in range(depth):
      sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
  return sd


def resize_rel_pos_table(table: np.ndarray, dst_window: tuple[int, int]) -> np.ndarray:
  """Resizes a [(2h-1)(2w-1)+3, H] table to another window (official: geometric-progression coordinates
  and a per-head cubic interpolation; scipy's interp2d is gone, RectBivariateSpline(kx=ky=3) is the same
  spline family). The 3 CLS entries are kept."""
  from scipy.interpolate import RectBivariateSpline
  src_len = table.shape[0] - 3
  src = int(round(np.sqrt(src_len)))
  dst = 2 * dst_window[0] - 1
  if src == dst:
    return table
  extra, table = table[-3:], table[:-3]

  def geometric(r, n):
    return (1.0 - r ** n) / (1.0 - r)

  left, right = 1.01, 1.5
  while right - left > 1e-6:  # bisection, as the official code, for q with sum_{i<src/2} q^i = dst/2
    q = (left + right) / 2.0
    if geometric(q, src // 2) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for i in range(src // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  r_ids = [-d for d in reversed(dis)]
  x = np.array(r_ids + [0] + dis)
  t = dst // 2.0
  dx = np.arange(-t, t + 0.1, 1.0)
  out = []
  for h in range(table.shape[1]):
    z = table[:, h].reshape(src, src)
    f = RectBivariateSpline(x, x, z, kx=3, ky=3)
    out.append(f(dx, dx).reshape(-1, 1))
  return np.concatenate([np.concatenate(out, axis=-1), extra], axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Architecture inference from keys and shapes
# ------------------------------------------------------------------------------------------------
def infer_vit_config(sd: Mapping[str, np.ndarray], prefix: str = "", head_dim: int = 64) -> dict:
  """VisionTransformer kwargs that fit the keys of an official/timm (sub)state dict."""
  p = prefix
  if f"{p}cls_token" not in sd:
    raise CheckpointMismatchError(f"no '{p}cls_token' key: not a BEiT / ViT state dict")
  d = sd[f"{p}cls_token"].shape[-1]
  conv = sd[f"{p}patch_embed.proj.weight"]
  patch = conv.shape[-1]
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k)))
  table_key = next((k for k in (f"{p}rel_pos_bias.relative_position_bias_table",
                                f"{p}blocks.0.attn.relative_position_bias_table") if k in sd), None)
  heads = sd[table_key].shape[1] if table_key else d // head_dim
  if table_key:
    window = int(round((np.sqrt(sd[table_key].shape[0] - 3) + 1) / 2))
  elif f"{p}pos_embed" in sd:
    window = int(round(np.sqrt(sd[f"{p}pos_embed"].shape[1] - 1)))
  else:
    window = 224 // patch
  gamma = sd.get(f"{p}blocks.0.gamma_1")
  cfg = dict(
      img_size=window * patch, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
      mlp_ratio=sd[f"{p}blocks.0.mlp.fc1.weight"].shape[0] / d,
      use_abs_pos_emb=f"{p}pos_embed" in sd,
      rel_pos=("shared" if f"{p}rel_pos_bias.relative_position_bias_table" in sd
               else "layer" if table_key else "none"),
      init_values=float(np.abs(gamma).mean()) if gamma is not None else 0.0,
      use_mask_token=f"{p}mask_token" in sd,
      num_classes=int(sd[f"{p}head.weight"].shape[0]) if f"{p}head.weight" in sd else 0,
      final_norm="fc_norm" if f"{p}fc_norm.weight" in sd else "norm",
  )
  return cfg
