"""How often the tokenizer's precision changes the MIM labels: the code id of every patch of real images
computed with the frozen VQ-KD tokenizer executed in float32, float16 and bfloat16 (matmuls in that dtype;
LayerNorms, softmax, the residual stream, encode_task_layer and the nearest-code search in float32, as in
beitv2_jax/models/vit.py and PretrainTask.targets), and the fraction of labels that differ.

  python benchmarks/label_precision.py TOKENIZER [--data photos:all,mnist5k:val,demo] [--batch 32]
      [--max-images N] [--num-heads H] [--json out.json]

TOKENIZER: a tokenizer workdir (or WORKDIR/checkpoints/<step>), an official-layout vqkd .pth /
.safetensors, or `random:<config>` for a randomly initialised tokenizer of that pretraining config's
student size (pretrain.random_tokenizer, e.g. random:pretrain_base = ViT-B/16 at 224 px, 8192 codes of
dim 32): random weights, so its near-tie rate is not a trained tokenizer's.
Data (all offline): `photos:<split>` (the scikit-image photos), `mnist5k:<split>`, `demo` (the official
demo image in tests/data/official_demo; skipped with a note when absent). Every image goes through the eval
transform (resize to img_size / 0.875, centre crop) and reaches the tokenizer as uint8 / 255, as in
pretraining.

Besides the three dtypes, some rows change only the code search, on the same z: `+search16` is the official
code as written (under fp16 autocast its nearest-code distance `z^2 + e^2 - 2 einsum(z, e)` runs the einsum
in float16, dot products rounded to fp16, where ours searches in float32); `+tf32` / `+bf16` round the
search's inputs as JAX's default matmul precision does for float32 on recent GPUs / TPUs. This script runs
every float32 matmul at "highest", so its float32 is float32 on any backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from beitv2_jax import api  # noqa: E402
from beitv2_jax.data import decode, sources, transforms  # noqa: E402
from beitv2_jax.models import quantizer  # noqa: E402
from beitv2_jax.models.build import DTYPES  # noqa: E402
from beitv2_jax.models.vqkd import VQKD  # noqa: E402

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEMO_IMAGE = os.path.join(ROOT, "tests", "data", "official_demo", "ILSVRC2012_val_00031649.JPEG")
# Label sets: "<dtype>" is the encoder executed in that dtype with our float32 code search; the suffixes
# change only the search, on the same z: "+search16" the official one under fp16 autocast (see above),
# "+tf32" / "+bf16" a float32 search at JAX's default matmul precision on recent GPUs (inputs rounded
# to TF32) / on TPUs (one bfloat16 pass), what quantizer.nearest_code gets there unless told "highest".
SEARCHES = ("", "+search16", "+tf32", "+bf16")
# (name, a, b): the fraction of patches whose label from set a differs from set b.
PAIRS = (("fp16 vs fp32", "float16", "float32"), ("bf16 vs fp32", "bfloat16", "float32"),
         ("fp16 vs bf16", "float16", "bfloat16"),
         ("fp16+search16 (official autocast) vs fp32", "float16+search16", "float32"),
         ("fp16 vs fp16+search16", "float16", "float16+search16"),
         ("bf16 vs fp16+search16", "bfloat16", "float16+search16"),
         ("fp32, tf32 search vs fp32", "float32+tf32", "float32"),
         ("fp32, bf16 search vs fp32", "float32+bf16", "float32"),
         ("bf16, tf32 search vs fp32", "bfloat16+tf32", "float32"),
         ("bf16, bf16 search vs fp32", "bfloat16+bf16", "float32"))


# ------------------------------------------------------------------------------------------------
# Tokenizers: one api.Model per dtype, the same parameters in each
# ------------------------------------------------------------------------------------------------
def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("")


def tokenizers(spec: str, num_heads: int = 0) -> dict:
  """dtype name -> api.Model. Files and workdirs go through beitv2_jax.load(spec, dtype=name), the public
  path whose float16 this measures; a random tokenizer is built once and its module cloned per dtype (the
  parameters are float32 in every dtype, so the three share them). `num_heads`: for .pth / .safetensors,
  whose keys do not say it (api.load assumes head dim 64: right for the official tokenizers, wrong for
  the tiny one, whose 2 heads of 32 would load as 1 head of 64 and give other labels)."""
  if spec.startswith("random:"):
    from beitv2_jax.train.pretrain import random_tokenizer
    config = load_config(spec.split(":", 1)[1])
    config.tokenizer_dtype = "float32"
    base = random_tokenizer(config)
    return {name: dataclasses.replace(base, module=base.module.clone(dtype=DTYPES[name]))
            for name in DTYPE_NAMES}
  kw = {"num_heads": num_heads} if num_heads else {}
  models = {name: api.load(spec, dtype=name, **kw) for name in DTYPE_NAMES}
  if models["float32"].kind != "tokenizer":
    raise SystemExit(f"{spec} holds a {models['float32'].kind} checkpoint, not a tokenizer")
  return models


def describe(model: api.Model) -> str:
  enc = model.module.encoder
  return (f"img_size {enc['img_size']}, patch {enc['patch_size']} ({model.grid}x{model.grid} patches), encoder "
          f"depth {enc['depth']} width {enc['embed_dim']} heads {enc['num_heads']}, {len(model.codebook)} codes of dim "
          f"{model.codebook.shape[1]}")


# ------------------------------------------------------------------------------------------------
# Images: the eval transform at the tokenizer's img_size, uint8
# ------------------------------------------------------------------------------------------------
def load_images(data: str, size: int, max_images: int = 0) -> list[tuple[str, np.ndarray]]:
  """[(source name, (n, size, size, 3) uint8)], in the order asked; `demo` is left out (with a note) when
  tests/data/official_demo is not there."""
  view = transforms.EvalTransform(size)
  out = []
  for item in (d for d in data.split(",") if d):
    kind, _, split = item.partition(":")
    if kind == "demo":
      if not os.path.exists(DEMO_IMAGE):
        print(f"note: {DEMO_IMAGE} not found: the demo image is left out", flush=True)
        continue
      with Image.open(DEMO_IMAGE) as im:
        raw, name = [np.asarray(im.convert("RGB"))], "demo"
    elif kind in ("photos", "mnist5k"):
      src = sources.make_source(kind, split or "all")
      raw, name = [decode.decode_image(src[i])[0] for i in range(len(src))], src.name
    else:
      raise SystemExit(f"unknown data {item!r}: expected photos:<split>, mnist5k:<split> or demo")
    if max_images:
      raw = raw[:max_images]
    out.append((name, np.stack([view(Image.fromarray(im), None)["image"] for im in raw])))
  if not out:
    raise SystemExit("no images: --data named nothing that is here")
  return out


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------
_ENCODE: dict = {}


def encode_fn(module):
  """jit (params, codebook, uint8 images) -> (z (B, N, D) float32, {search suffix: ids (B, N)}).
  z and ids[""] are PretrainTask.targets' computation: uint8 / 255 -> VQKD.encode -> quantizer.nearest_code.
  One per module (kept in the entry, so a recycled id is never mistaken for it): each source reuses it."""
  entry = _ENCODE.get(id(module))
  if entry is None or entry[0] is not module:
    def f(params, codebook, images_uint8):
      # "highest": float32 matmuls (encode_task_layer, the code search, the float32 encoder) in true float32
      # on every backend; JAX's default would run them as TF32 on recent GPUs and one bf16 pass on TPUs,
      # and the reference would not be float32. It does not touch the 16-bit matmuls.
      with jax.default_matmul_precision("highest"):
        images01 = images_uint8.astype(jnp.float32) / 255.0
        z = module.apply({"params": params}, images01, method=VQKD.encode)
        ids = {"": quantizer.nearest_code(codebook, z),
               "+tf32": quantizer.nearest_code(round_mantissa(codebook, 10), round_mantissa(z, 10)),
               "+bf16": quantizer.nearest_code(round_mantissa(codebook, 7), round_mantissa(z, 7))}
      ids["+search16"] = official_fp16_search(codebook, z)
      return z, ids
    entry = _ENCODE[id(module)] = (module, jax.jit(f))
  return entry[1]


def round_mantissa(x, bits: int):
  """x rounded to `bits` explicit mantissa bits (10: TF32, 7: bfloat16), kept in float32: the inputs of a
  reduced-precision matmul, whose products are then exact and summed in float32."""
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=bits)


def official_fp16_search(codebook, z):
  """NormEMAVectorQuantizer.forward under torch.cuda.amp.autocast: the squared norms in float32, the
  einsum in float16 (its output rounded to fp16), argmin over the codes."""
  cb = codebook.astype(jnp.float32)
  dots = jnp.einsum("...d,kd->...k", z.astype(jnp.float16), cb.astype(jnp.float16)).astype(jnp.float32)
  d = jnp.sum(z * z, -1, keepdims=True) + jnp.sum(cb * cb, -1) - 2.0 * dots
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def run_dtype(model: api.Model, images: np.ndarray, batch: int) -> tuple[np.ndarray, dict]:
  """(z, {search suffix: ids}) for every image; the last batch is padded with black images (the
  preprocess' batch max stays <= 1, so padding changes no real image's result) and the padding dropped."""
  f = encode_fn(model.module)
  cb = jnp.asarray(model.codebook)
  zs, ids = [], {k: [] for k in SEARCHES}
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    n = len(x)
    if n < batch:
      x = np.concatenate([x, np.zeros((batch - n,) + x.shape[1:], x.dtype)])
    z, labels = jax.device_get(f(model.params, cb, jnp.asarray(x)))
    zs.append(z[:n])
    for k in SEARCHES:
      ids[k].append(labels[k][:n])
  return np.concatenate(zs), {k: np.concatenate(v) for k, v in ids.items()}


def top2_gap(codebook: np.ndarray, z: np.ndarray) -> np.ndarray:
  """float32 cosine of the nearest code minus that of the runner-up, per patch: how near a tie is. In
  chunks: 1000 MNIST digits at 224 px against 8192 codes would be a 6 GB similarity matrix at once."""
  z = z.reshape(-1, z.shape[-1])
  cb = np.asarray(codebook, np.float32).T
  gaps = []
  for i in range(0, len(z), 4096):
    top = np.partition(z[i:i + 4096] @ cb, -2, axis=-1)[:, -2:]
    gaps.append(top[:, 1] - top[:, 0])
  return np.concatenate(gaps)


def measure(models: dict, sets: list, batch: int) -> dict:
  """Per source and in total: images, patches, for each pair the number and fraction of differing labels,
  the rms / max |z - z_fp32| of each dtype's encoder output (unit vectors), and how many fp32 labels are
  within 1e-3 / 1e-2 cosine of a tie; `nonfinite`: patches whose z has an inf / nan (float16 overflows
  past 65504: its labels would be garbage)."""
  rows = {}
  total = {"images": 0, "patches": 0, "differ": {p[0]: 0 for p in PAIRS}, "z_sq": {n: 0.0 for n in DTYPE_NAMES},
           "z_max": {n: 0.0 for n in DTYPE_NAMES}, "nonfinite": {n: 0 for n in DTYPE_NAMES}, "gap_lt_1e-3": 0,
           "gap_lt_1e-2": 0}
  for name, images in sets:
    out = {n: run_dtype(models[n], images, batch) for n in DTYPE_NAMES}
    labels = {n + k: out[n][1][k] for n in DTYPE_NAMES for k in SEARCHES}
    gap = top2_gap(models["float32"].codebook, out["float32"][0])
    row = {"images": len(images), "patches": int(labels["float32"].size),
           "differ": {p: int((labels[a] != labels[b]).sum()) for p, a, b in PAIRS},
           "z_sq": {n: float(((out[n][0] - out["float32"][0]).astype(np.float64) ** 2).sum()) for n in DTYPE_NAMES},
           "z_max": {n: float(np.abs(out[n][0] - out["float32"][0]).max()) for n in DTYPE_NAMES},
           "nonfinite": {n: int((~np.isfinite(out[n][0]).all(-1)).sum()) for n in DTYPE_NAMES},
           "gap_lt_1e-3": int((gap < 1e-3).sum()), "gap_lt_1e-2": int((gap < 1e-2).sum())}
    rows[name] = row
    for k in ("images", "patches", "gap_lt_1e-3", "gap_lt_1e-2"):
      total[k] += row[k]
    for p in row["differ"]:
      total["differ"][p] += row["differ"][p]
    for n in DTYPE_NAMES:
      total["nonfinite"][n] += row["nonfinite"][n]
      total["z_sq"][n] += row["z_sq"][n]
      total["z_max"][n] = max(total["z_max"][n], row["z_max"][n])
  rows["total"] = total
  dim = models["float32"].codebook.shape[1]
  for row in rows.values():
    row["fraction"] = {p: row["differ"][p] / row["patches"] for p in row["differ"]}
    row["z_rms"] = {n: (row["z_sq"][n] / (row["patches"] * dim)) ** 0.5 for n in DTYPE_NAMES}
    row["near_tie"] = {"1e-3": row["gap_lt_1e-3"] / row["patches"], "1e-2": row["gap_lt_1e-2"] / row["patches"]}
  return rows


def print_table(rows: dict) -> None:
  """One row per comparison, one column per source: the fraction of labels that differ (and how many)."""
  names = list(rows)
  print("| labels that differ | " + " | ".join(f"{n} ({rows[n]['images']} img, {rows[n]['patches']} patches)"
                                             for n in names) + " |")
  print("|---" * (1 + len(names)) + "|")
  for pair, _, _ in PAIRS:
    print(f"| {pair} | " + " | ".join(f"{rows[n]['fraction'][pair]:.3%} ({rows[n]['differ'][pair]})" for n in names)
          + " |")
  print("| fp32 labels within 1e-3 / 1e-2 cosine of a tie | "
        + " | ".join(f"{rows[n]['near_tie']['1e-3']:.2%} / {rows[n]['near_tie']['1e-2']:.2%}" for n in names) + " |")
  t = rows["total"]
  print("encoder output vs float32 (unit vectors; rms / max abs): "
        + ", ".join(f"{n} {t['z_rms'][n]:.2e} / {t['z_max'][n]:.2e}" for n in DTYPE_NAMES[1:])
        + "; patches with a non-finite z: " + ", ".join(f"{n} {t['nonfinite'][n]}" for n in DTYPE_NAMES))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("tokenizer", help="workdir, vqkd .pth / .safetensors, or random:<pretrain config>")
  p.add_argument("--data", default="photos:all,mnist5k:val,demo")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--max-images", type=int, default=0, help="at most this many per source (0: all)")
  p.add_argument("--num-heads", type=int, default=0,
                 help=".pth / .safetensors only: the encoder's heads (default: head dim 64)")
  p.add_argument("--json", default="", help="also write the numbers here")
  a = p.parse_args(argv)
  t0 = time.time()
  models = tokenizers(a.tokenizer, a.num_heads)
  m = models["float32"]
  print(f"tokenizer: {a.tokenizer} ({describe(m)}); backend {jax.default_backend()}", flush=True)
  sets = load_images(a.data, m.img_size, a.max_images)
  rows = measure(models, sets, a.batch)
  print_table(rows)
  print(f"({time.time() - t0:.0f} s)")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"tokenizer": a.tokenizer, "describe": describe(m), "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
