"""The whole method on real offline images (task `demo`, configs/demo.py):

  1. train a tiny VQ-KD tokenizer          -> WORKDIR/tokenizer
  2. pretrain a tiny BEiT v2 on its codes  -> WORKDIR/pretrain
  3. linear-probe and k-NN the pretrained encoder and the same encoder at random init (the baseline)
  4. pictures (WORKDIR/*.png) and a results table (WORKDIR/results.md, printed at the end)

Every stage is an ordinary run in its own sub-workdir, so rerunning the demo resumes where it stopped.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import api, checkpoint, parallel, report, tasks
from beitv2_jax.config_defaults import with_updates
from beitv2_jax.data import sources, transforms
from beitv2_jax.train import loop
from beitv2_jax.train.writer import read_metrics


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  main = jax.process_index() == 0
  tok_dir, pt_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "pretrain")

  # ---- 1. Tokenizer ------------------------------------------------------------------------------
  _, tok_metrics = loop.run(tasks.task_class("tokenizer")(config.tokenizer, tok_dir, mesh))
  # ---- 2. MIM pretraining ------------------------------------------------------------------------
  pt_config = with_updates(config.pretrain, {"tokenizer_path": tok_dir})
  _, pt_metrics = loop.run(tasks.task_class("pretrain")(pt_config, pt_dir, mesh))
  # ---- 3. Probes: pretrained vs random init ------------------------------------------------------
  results = {"tokenizer": tok_metrics, "pretrain": pt_metrics}
  for name, init in (("pretrained", pt_dir), ("random_init", "")):
    lp = with_updates(config.linprobe, {"init_from": init})
    _, m = loop.run(tasks.task_class("linprobe")(lp, os.path.join(workdir, f"linprobe_{name}"), mesh))
    results[f"linprobe_{name}"] = m.get("top1", float("nan"))
    kc = with_updates(config.knn, {"init_from": init})
    results[f"knn_{name}"] = tasks.run_function("knn")(kc, os.path.join(workdir, f"knn_{name}"))["top1"]

  # ---- 4. Pictures, the tokenizer report and the table -------------------------------------------
  if main:
    pictures(config, workdir, tok_dir, pt_dir)
    # what the photo-trained codes say about the digits the probes classify
    d = config.linprobe.data
    results["tokenizer_report"] = report.report(tok_dir, d.name, os.path.join(workdir, "tokenizer_report"),
                                                train_split=d.train_split, eval_split=d.eval_split)
    table = results_table(results, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    print("\n" + table, flush=True)
  flat = {k: v for k, v in results.items() if not isinstance(v, dict)}
  flat.update({f"tokenizer_report_{k}": v for k, v in results.get("tokenizer_report", {}).items()
               if isinstance(v, (int, float))})
  flat.update({f"tokenizer_{k}": v for k, v in tok_metrics.items() if k.startswith(("rec_loss", "codebook", "eval_"))})
  flat.update({f"pretrain_{k}": v for k, v in pt_metrics.items() if k.startswith(("mlm_acc", "eval_", "loss"))})
  checkpoint.write_json(os.path.join(workdir, "results.json"), flat)
  return flat


def results_table(r: dict, config) -> str:
  t, p, tr = r["tokenizer"], r["pretrain"], r.get("tokenizer_report", {"data": "-", "eval_split": "-"})
  nan = float("nan")
  teacher = config.tokenizer.teacher
  rows = [
      ("Tokenizer", "rec_loss (1 - cos to the teacher), last interval", f"{t.get('rec_loss', float('nan')):.4f}"),
      ("Tokenizer", "codebook usage, last interval",
       f"{t.get('codebook_usage', float('nan')):.1%} of {config.tokenizer.model.codebook_size}"),
      ("Tokenizer", "teacher", "random CLIP (no weights offline)" if teacher == "random" else teacher),
      ("Tokenizer", f"NMI(code; class) per patch, {tr['data']}/{tr['eval_split']}",
       f"{tr.get('code_label_nmi', nan):.3f}"),
      ("Tokenizer", f"k-NN on bags of codes, {tr['data']} (majority class {tr.get('chance_top1', nan):.1%})",
       f"{tr.get('bag_of_codes_knn_top1', nan):.1%}"),
      ("MIM", "masked-token accuracy, main head (training batches, last interval)",
       f"{p.get('mlm_acc_1', float('nan')):.1%}"),
      ("MIM", "always the batch's most frequent code (training batches)",
       f"{p.get('mlm_majority_acc', float('nan')):.1%}"),
      ("MIM", "masked-token accuracy, main head (held-out)", f"{p.get('eval_mlm_acc_1', float('nan')):.1%}"),
      ("MIM", "masked-token accuracy, aggregation head (held-out)", f"{p.get('eval_mlm_acc_2', float('nan')):.1%}"),
      ("MIM", "majority-code baseline (held-out)", f"{p.get('eval_majority_code_acc', float('nan')):.1%}"),
      ("Linear probe", "top-1, pretrained encoder", f"{r['linprobe_pretrained']:.1%}"),
      ("Linear probe", "top-1, same encoder at random init", f"{r['linprobe_random_init']:.1%}"),
      ("k-NN (k=20)", "top-1, pretrained encoder", f"{r['knn_pretrained']:.1%}"),
      ("k-NN (k=20)", "top-1, same encoder at random init", f"{r['knn_random_init']:.1%}"),
  ]
  lines = ["| stage | metric | value |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------
def pictures(config, workdir, tok_dir, pt_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tok = api.load(tok_dir)
  mim = api.load(pt_dir)
  size = config.pretrain.model.img_size
  source = sources.make_source(config.pretrain.data.name, "all")  # centre crops of every image
  view = transforms.EvalTransform(size)
  from PIL import Image
  n_show = 8
  grid = size // config.pretrain.model.patch_size
  # centre crops of up to 512 images and their codes; the pictures show n_show of them, evenly spaced
  all_imgs = np.stack([view(Image.fromarray(np.asarray(source[i]["image"])), None)["image"]
                       for i in range(min(len(source), 512))])
  all_imgs = np.repeat(all_imgs, 3, -1) if all_imgs.shape[-1] == 1 else all_imgs
  all_ids = np.concatenate([np.asarray(tok.encode(all_imgs[i:i + 128].astype(np.float32) / 255.0))
                            for i in range(0, len(all_imgs), 128)])
  picks = np.linspace(0, len(all_imgs) - 1, n_show).astype(int)  # the same picks as report.pictures'
  images, ids = all_imgs[picks], all_ids[picks].reshape(-1, grid, grid)

  # Training curves
  tm, pm = read_metrics(tok_dir), read_metrics(pt_dir)
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
  rows = [m for m in tm if "rec_loss" in m]
  ax[0].plot([m["step"] for m in rows], [m["rec_loss"] for m in rows])
  ax[0].set(title="tokenizer: rec_loss", xlabel="step")
  ax[1].plot([m["step"] for m in rows], [m["codebook_usage"] for m in rows])
  ax[1].set(title="tokenizer: codebook usage", xlabel="step", ylim=(0, 1.05))
  rows = [m for m in pm if "mlm_acc_1" in m]
  ax[2].plot([m["step"] for m in rows], [m["mlm_acc_1"] for m in rows], label="main head")
  ax[2].plot([m["step"] for m in rows], [m["mlm_acc_2"] for m in rows], label="aggregation head")
  ax[2].set(title="MIM: masked-token accuracy", xlabel="step")
  ax[2].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "training_curves.png"), dpi=90)
  plt.close(fig)

  # Codebook usage and token maps (the tokenizer report's pictures) over the centre crops
  report.pictures(all_imgs, all_ids, tok.codebook.shape[0], grid, workdir, n_show=n_show)

  # Masked prediction: image, mask, patches predicted right (green) / wrong (red)
  from beitv2_jax.data.masking import MaskingGenerator
  mg = MaskingGenerator.from_ratio((grid, grid), config.pretrain.mask.ratio, config.pretrain.mask.min_patches)
  masks = np.stack([mg(np.random.default_rng(s)).reshape(-1).astype(bool) for s in range(n_show)])
  main_logits, _ = mim(np.asarray(transforms.imagenet_normalize(jnp.asarray(images))), masks)
  pred = np.asarray(jnp.argmax(main_logits, -1))
  target = ids.reshape(n_show, -1)
  fig, ax = plt.subplots(3, n_show, figsize=(1.6 * n_show, 5))
  ps = config.pretrain.model.patch_size
  for j in range(n_show):
    pos = np.flatnonzero(masks[j])
    right = pred[j] == target[j][pos]
    ax[0, j].imshow(images[j]); ax[0, j].axis("off")
    shown = images[j].copy().astype(float) / 255
    over = np.zeros((grid, grid, 4))
    for p in pos:
      over[p // grid, p % grid] = (0.2, 0.2, 0.2, 0.85)
    ax[1, j].imshow(shown); ax[1, j].imshow(np.kron(over, np.ones((ps, ps, 1)))); ax[1, j].axis("off")
    res = np.zeros((grid, grid, 4))
    for p, ok in zip(pos, right):
      res[p // grid, p % grid] = (0, 0.8, 0, 0.6) if ok else (0.9, 0, 0, 0.6)
    ax[2, j].imshow(shown); ax[2, j].imshow(np.kron(res, np.ones((ps, ps, 1)))); ax[2, j].axis("off")
    ax[2, j].set_title(f"{right.mean():.0%} right", fontsize=8)
  ax[0, 0].set_title("image", fontsize=8, loc="left"); ax[1, 0].set_title("mask", fontsize=8, loc="left")
  fig.suptitle("masked prediction: green = masked patch whose code the model predicts right")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "masked_prediction.png"), dpi=110)
  plt.close(fig)
