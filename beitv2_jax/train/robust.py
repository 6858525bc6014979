"""Task `robust`: a classifier on the ImageNet robustness test sets, as the official `--robust_test` does
(beit2/run_class_finetuning.py with imagenet_a_r_indices.py): ImageNet-A and ImageNet-R are scored over their
200 classes only (the classifier's other 800 logits are masked out before top-1 / top-5), ImageNet-Sketch and
ImageNetV2 over all 1000.

The sets come through tfds (`tfds:imagenet_a`, `tfds:imagenet_r`, `tfds:imagenet_sketch`, `tfds:imagenet_v2`,
split `test`; their builders label every image in ImageNet-1k's 1000 classes) or as folders
`root/<wnid>/<image>` (`folder:/data/imagenet-a`, the set named by the folder; labels mapped to the 1000
classes by WordNet id). Evaluation is the fine-tuning eval transform (resize img_size / crop_pct, centre crop).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import api, checkpoint, parallel
from beitv2_jax.data import imagenet_subsets, pipeline, sources, transforms
from beitv2_jax.train.loop import topk_correct, validate
from beitv2_jax.train.writer import MetricWriter


def load_set(name: str, split: str):
  """The source of one robustness set, labelled in ImageNet-1k's classes (a folder's WordNet-id
  sub-folders mapped to them)."""
  kind, _, arg = name.partition(":")
  if kind == "folder":
    return sources.folder(arg, split, class_names=imagenet_subsets.imagenet_class_names())
  return sources.make_source(name, split)


def class_mask(name: str, source, num_classes: int) -> np.ndarray:
  """The classes a set is scored over: its 200 for ImageNet-A / -R, else all."""
  subset = imagenet_subsets.subset_of(name)
  if subset is None:
    return np.ones(num_classes, bool)
  names = getattr(source, "classes", None)
  if names is None or len(names) != num_classes:
    raise ValueError(f"{name}: needs ImageNet-1k's {num_classes} WordNet ids as its label names to score it over "
                     f"the {subset} classes; the source has {len(names) if names is not None else 'no'} names")
  return imagenet_subsets.class_mask(subset, names)


def evaluate_set(model: api.Model, name: str, split: str, batch_size: int, crop_pct: float, mesh) -> dict:
  """top-1 / top-5 (over the set's classes) of `model` on one set, every image once, on the mesh."""
  source = load_set(name, split)
  num_classes = model.config["num_classes"]
  if source.num_classes != num_classes:
    raise ValueError(f"{name} is labelled in {source.num_classes} classes but the classifier has {num_classes}: "
                     "the robustness sets need an ImageNet-1k classifier")
  mask = class_mask(name, source, num_classes)

  @jax.jit
  def counts(params, batch):
    logits = model.module.apply({"params": params}, transforms.imagenet_normalize(batch["image"]))["logits"]
    logits = jnp.where(jnp.asarray(mask), logits.astype(jnp.float32), -jnp.inf)
    w = batch["valid"].astype(jnp.float32)
    top1, top5 = topk_correct(logits, batch["label"], (1, min(5, int(mask.sum()))))
    outside = jnp.sum(w * ~jnp.asarray(mask)[batch["label"]])
    return jnp.stack([jnp.sum(top1 * w), jnp.sum(top5 * w), jnp.sum(w), outside])

  params = jax.device_put(model.params, parallel.replicated(mesh))
  sums = np.zeros(4)
  transform = transforms.EvalTransform(model.config["img_size"], crop_pct)
  for local in pipeline.eval_batches(source, transform, batch_size):
    local.pop("bad", None)
    sums += np.asarray(jax.device_get(counts(params, parallel.to_global(local, mesh))))
  if sums[3]:
    raise ValueError(f"{name}: {int(sums[3])} images are labelled outside the {int(mask.sum())} classes the set is "
                     "scored over: is this the right dataset?")
  return {"top1": sums[0] / sums[2], "top5": sums[1] / sums[2], "images": int(sums[2]),
          "classes": int(mask.sum())}


def run(config, workdir: str) -> dict:
  if not config.init_from:
    raise ValueError("config.init_from is empty: point it at a fine-tuned classifier (a finetune workdir, an "
                     "official or timm fine-tuned file)")
  model = api.load(config.init_from, dtype=config.dtype)
  if model.kind != "classifier":
    raise ValueError(f"init_from {config.init_from} holds a {model.kind} checkpoint, not a classifier: the "
                     "robustness sets score a fine-tuned ImageNet-1k classifier")
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, mesh)  # the batch splits over the devices
  names = [n.strip() for n in config.robust.datasets.split(",") if n.strip()]
  if not names:
    raise ValueError("config.robust.datasets is empty: name the sets, e.g. tfds:imagenet_a,tfds:imagenet_r")
  result = {}
  for name in names:
    r = evaluate_set(model, name, config.robust.split, config.batch_size, config.crop_pct, mesh)
    key = imagenet_subsets.set_name(name)
    result.update({f"{key}/top1": r["top1"], f"{key}/top5": r["top5"], f"{key}/images": r["images"]})
    if jax.process_index() == 0:
      print(f"[robust] {name}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} ({r['images']} images, "
            f"{r['classes']} classes)", flush=True)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_json(os.path.join(workdir, "config.json"), {"task": "robust", "config": config.to_dict(),
                                                                "classifier": model.source})
  writer = MetricWriter(workdir)
  writer.write(0, result)
  writer.close()
  return result
