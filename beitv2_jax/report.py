"""A tokenizer report: what a VQ-KD tokenizer's codes are, on a dataset.

  python -m beitv2_jax.report --tokenizer=WORKDIR_OR_VQKD_PTH --data=mnist5k [--out=DIR]

Encodes the centre crops of `--eval_split` (and, for the k-NN, `--train_split`) and writes to `--out`
(default: TOKENIZER/report when the tokenizer is a workdir, else ./tokenizer_report):
- report.json / report.md: codebook usage (share of codes used), dead codes, perplexity (exp of the code
  distribution's entropy; the codebook size at most), the most frequent code's share;
- where the data have labels, how much the codes say about them: the normalised mutual information between
  a patch's code and its image's class (sklearn's arithmetic normalisation, over all patches), and a
  weighted k-NN (k 20, T 0.07, cosine) on each image's bag of codes (its code histogram), train -> eval;
- codebook_usage.png (codes by frequency, log scale) and token_maps.png (images beside their code grids,
  the most frequent codes in fixed colours: where the same code lands across images).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from beitv2_jax import api
from beitv2_jax.data import pipeline, sources, transforms


def encode_split(tok: api.Model, data: str, split: str, batch: int = 128, max_images: int = 0):
  """(images uint8 (B, S, S, 3), code ids (B, N), labels (B,)) of a split's centre crops."""
  source = sources.make_source(data, split)
  images, ids, labels = [], [], []
  for b in pipeline.eval_batches(source, transforms.EvalTransform(tok.img_size), batch):
    keep = b["valid"].astype(bool)
    imgs = b["image"][keep]
    if imgs.shape[-1] == 1:
      imgs = np.repeat(imgs, 3, -1)
    images.append(imgs)
    ids.append(np.asarray(tok.encode(imgs.astype(np.float32) / 255.0)))
    labels.append(np.asarray(b["label"])[keep])
    if max_images and sum(len(i) for i in images) >= max_images:
      break
  cut = max_images or None
  return (np.concatenate(images)[:cut], np.concatenate(ids)[:cut], np.concatenate(labels)[:cut],
          source.num_classes)


def teacher_features(teacher, data: str, split: str, img_size: int, grid: int, batch: int = 100):
  """(L2-normalised mean-pooled patch features, labels, num_classes) of a split's centre crops at img_size,
  seen by the teacher as a tokenizer with a grid x grid token grid would show them (Teacher.apply)."""
  import jax
  import jax.numpy as jnp
  fn = jax.jit(lambda p, x: teacher.apply(p, transforms.to_unit(x), grid).mean(axis=1))
  source = sources.make_source(data, split)
  feats, labels = [], []
  for b in pipeline.eval_batches(source, transforms.EvalTransform(img_size), batch):
    keep = b["valid"].astype(bool)
    f = np.asarray(fn(teacher.params, jnp.asarray(b["image"])))[keep]
    feats.append(f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12))
    labels.append(b["label"][keep])
  return np.concatenate(feats), np.concatenate(labels), source.num_classes


def linear_probe_top1(train_x, train_y, eval_x, eval_y, num_classes: int, steps: int = 500, lr: float = 0.01,
                      weight_decay: float = 1e-4) -> float:
  """Top-1 of a softmax regression on frozen features (standardised with the train split's statistics;
  full batch, AdamW): the linear-probe reference for features that are not an encoder of ours."""
  import jax
  import jax.numpy as jnp
  import optax
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  x, y = jnp.asarray((train_x - mu) / sd), jnp.asarray(train_y)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.adamw(lr, weight_decay=weight_decay)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

  def step(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps))(params)
  pred = np.asarray(jnp.argmax(jnp.asarray((eval_x - mu) / sd) @ params["w"] + params["b"], -1))
  return float(np.mean(pred == eval_y))


def teacher_reference(teacher, data: str, img_size: int, grid: int, train_split: str = "train",
                      eval_split: str = "val") -> dict:
  """What a teacher's own features give on labelled data: the weighted k-NN (k 20, T 0.07, cosine) and a
  linear probe (linear_probe_top1) on its mean-pooled patch features, train -> eval."""
  from beitv2_jax.train.knn import knn_classify
  tr, trl, n = teacher_features(teacher, data, train_split, img_size, grid)
  ev, evl, _ = teacher_features(teacher, data, eval_split, img_size, grid)
  return dict(teacher=teacher.source, data=data, grid=grid, teacher_px=teacher.module.image_size,
              train=len(tr), eval=len(ev), knn_top1=float(np.mean(knn_classify(tr, trl, ev, n) == evl)),
              linear_top1=linear_probe_top1(tr, trl, ev, evl, n))


def code_statistics(ids: np.ndarray, codebook_size: int) -> dict:
  counts = np.bincount(ids.ravel(), minlength=codebook_size)
  p = counts / counts.sum()
  nz = p[p > 0]
  entropy = float(-(nz * np.log(nz)).sum())
  return dict(codebook_size=int(codebook_size), patches=int(counts.sum()), codes_used=int((counts > 0).sum()),
              codebook_usage=float((counts > 0).mean()), dead_codes=int((counts == 0).sum()),
              perplexity=float(np.exp(entropy)), entropy_bits=entropy / np.log(2), top_code_share=float(p.max()))


def code_label_nmi(ids: np.ndarray, labels: np.ndarray) -> float:
  """Normalised mutual information between a patch's code and its image's class, over all patches:
  I(C; Y) / mean(H(C), H(Y)) (sklearn's normalized_mutual_info_score, average_method='arithmetic')."""
  codes = ids.reshape(len(ids), -1)
  y = np.repeat(labels, codes.shape[1])
  c = codes.ravel()
  _, ci = np.unique(c, return_inverse=True)
  _, yi = np.unique(y, return_inverse=True)
  joint = np.zeros((ci.max() + 1, yi.max() + 1))
  np.add.at(joint, (ci, yi), 1.0)
  joint /= joint.sum()
  pc, py = joint.sum(1), joint.sum(0)
  nz = joint > 0
  mi = float((joint[nz] * np.log(joint[nz] / np.outer(pc, py)[nz])).sum())
  h = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())
  denom = (h(pc) + h(py)) / 2
  return mi / denom if denom > 0 else 0.0


def bag_of_codes(ids: np.ndarray, codebook_size: int) -> np.ndarray:
  """Each image's L2-normalised code histogram, (B, codebook_size)."""
  h = np.zeros((len(ids), codebook_size), np.float32)
  np.add.at(h, (np.repeat(np.arange(len(ids)), ids.shape[1]), ids.reshape(len(ids), -1).ravel()), 1.0)
  return h / np.linalg.norm(h, axis=1, keepdims=True)


def report(tokenizer: str, data: str, out: str = "", train_split: str = "train", eval_split: str = "val",
           max_images: int = 0, batch: int = 128, title: str = "") -> dict:
  """Computes the report, writes report.json, report.md and the pictures to `out`, returns the numbers."""
  tok = api.load(tokenizer)
  if tok.kind != "tokenizer":
    raise ValueError(f"{tokenizer} holds a {tok.kind} checkpoint, not a tokenizer")
  out = out or (os.path.join(tokenizer, "report") if os.path.isdir(tokenizer) else "tokenizer_report")
  os.makedirs(out, exist_ok=True)
  k = len(tok.codebook)
  images, ids, labels, num_classes = encode_split(tok, data, eval_split, batch, max_images)
  r = dict(tokenizer=tok.source or tokenizer, data=data, eval_split=eval_split, images=len(ids),
           **code_statistics(ids, k))
  if num_classes > 1:
    r["code_label_nmi"] = code_label_nmi(ids, labels)
    if train_split:
      from beitv2_jax.train.knn import knn_classify
      _, tr_ids, tr_labels, _ = encode_split(tok, data, train_split, batch, max_images)
      pred = knn_classify(bag_of_codes(tr_ids, k), tr_labels, bag_of_codes(ids, k), num_classes)
      r.update(bag_of_codes_knn_top1=float(np.mean(pred == labels)), train_split=train_split,
               chance_top1=float(np.bincount(labels).max() / len(labels)))
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(r, f, indent=1)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(markdown(r, title))
  pictures(images, ids, k, tok.grid, out, title)
  return r


def markdown(r: dict, title: str = "") -> str:
  rows = [("codebook usage", f"{r['codebook_usage']:.1%} ({r['codes_used']} of {r['codebook_size']} codes)"),
          ("dead codes", str(r["dead_codes"])),
          ("perplexity", f"{r['perplexity']:.1f} (of {r['codebook_size']} possible)"),
          ("most frequent code", f"{r['top_code_share']:.1%} of the patches")]
  if "code_label_nmi" in r:
    rows.append(("NMI(code; class), per patch", f"{r['code_label_nmi']:.3f}"))
  if "bag_of_codes_knn_top1" in r:
    rows.append((f"k-NN on bags of codes ({r['train_split']} -> {r['eval_split']})",
                 f"{r['bag_of_codes_knn_top1']:.3f} (majority class {r['chance_top1']:.3f})"))
  head = f"## Tokenizer report{': ' + title if title else ''}\n\n{r['tokenizer']} on {r['data']}/{r['eval_split']}, "
  return (head + f"{r['images']} images, {r['patches']} patches\n\n| | |\n|---|---|\n"
          + "".join(f"| {a} | {b} |\n" for a, b in rows))


def code_colours(ids: np.ndarray, codebook_size: int):
  """(colour index of each code, colormap): the 19 most frequent codes keep one colour each across all
  images (grey: any other code), so a code that lands on the same kind of part in different images shows
  as the same colour there."""
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  counts = np.bincount(ids.ravel(), minlength=codebook_size)
  top = np.argsort(counts)[::-1][:19]
  colour_of = np.full(codebook_size, 19)
  colour_of[top] = np.arange(len(top))
  return colour_of, ListedColormap(list(plt.get_cmap("tab20").colors[:19]) + [(0.82, 0.82, 0.82)])


def draw_token_map(ax, grid_ids: np.ndarray, colour_of: np.ndarray, cmap):
  """One image's code grid: each cell in its code's colour (code_colours), the code id written on it."""
  ax.imshow(colour_of[grid_ids], cmap=cmap, vmin=0, vmax=19)
  for (r, c), v in np.ndenumerate(grid_ids):
    ax.text(c, r, str(v), ha="center", va="center", fontsize=4)
  ax.axis("off")


def pictures(images, ids, codebook_size: int, grid: int, out: str, title: str = "", n_show: int = 8):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  counts = np.bincount(ids.ravel(), minlength=codebook_size)
  fig, ax = plt.subplots(figsize=(8, 3))
  ax.bar(np.arange(codebook_size), np.sort(counts)[::-1], width=1.0)
  ax.set(title=f"{title + ': ' if title else ''}{np.mean(counts > 0):.0%} of {codebook_size} codes used",
         xlabel="code (sorted by frequency)", ylabel="patches", yscale="log")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "codebook_usage.png"), dpi=90)
  plt.close(fig)

  colour_of, cmap = code_colours(ids, codebook_size)
  picks = np.linspace(0, len(images) - 1, min(n_show, len(images))).astype(int)
  fig, ax = plt.subplots(2, len(picks), figsize=(1.6 * len(picks), 3.4), squeeze=False)
  for j, i in enumerate(picks):
    g = ids[i].reshape(grid, grid)
    ax[0, j].imshow(images[i]); ax[0, j].axis("off")
    draw_token_map(ax[1, j], g, colour_of, cmap)
  fig.suptitle(f"{title + ': ' if title else ''}token maps (the 19 most frequent codes in fixed colours, "
               "others grey)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "token_maps.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description="A VQ-KD tokenizer report: codebook usage, perplexity, dead codes, "
                                           "what the codes say about the labels, histogram and token maps.")
  ap.add_argument("--tokenizer", required=True, help="a tokenizer workdir / checkpoint or an official vqkd_*.pth")
  ap.add_argument("--data", default="mnist5k", help="tfds:<name>, folder:<root>, mnist5k, digits, photos")
  ap.add_argument("--eval_split", default="val")
  ap.add_argument("--train_split", default="train", help="the k-NN's reference split ('' to skip the k-NN)")
  ap.add_argument("--out", default="")
  ap.add_argument("--max_images", type=int, default=0, help="per split; 0: all")
  ap.add_argument("--batch", type=int, default=128)
  a = ap.parse_args(argv)
  from beitv2_jax.errors import one_line
  try:
    r = report(a.tokenizer, a.data, a.out, a.train_split, a.eval_split, a.max_images, a.batch)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {one_line(e)}") from None
  print(markdown(r))
  return r


if __name__ == "__main__":
  main()
