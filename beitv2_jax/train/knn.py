"""Task `knn`: weighted k-NN classification on frozen features (k 20, T 0.07, cosine; DINO / iBOT).

Features of the training split are computed by every process for its own rows and gathered across
hosts; each validation feature votes with exp(sim / T) over its k nearest training features.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from beitv2_jax import checkpoint, parallel
from beitv2_jax.data import pipeline, sources, transforms
from beitv2_jax.train.writer import MetricWriter
from beitv2_jax import api


def extract(config, model: api.Model, split: str, mesh):
  """L2-normalised features and labels of a whole split, gathered on every process."""
  from jax.experimental import multihost_utils
  f, params = api.feature_fn(model, config.probe.layer, config.probe.pool)

  @jax.jit
  def fn(params, batch):
    feats = f(params, api.encoder_input(model, batch["image"]))
    return feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)

  source = sources.make_source(config.data.name, split)
  params = jax.device_put(params, parallel.replicated(mesh))
  feats, labels, valid = [], [], []
  for local in pipeline.eval_batches(source, transforms.EvalTransform(config.model.img_size), config.batch_size):
    batch = parallel.to_global({"image": local["image"]}, mesh)
    out = fn(params, batch)
    feats.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    labels.append(np.asarray(multihost_utils.process_allgather(local["label"], tiled=True)) if jax.process_count() > 1
                  else local["label"])
    valid.append(np.asarray(multihost_utils.process_allgather(local["valid"], tiled=True)) if jax.process_count() > 1
                 else local["valid"])
  keep = np.concatenate(valid).astype(bool)
  return np.concatenate(feats)[keep], np.concatenate(labels)[keep], source.num_classes


def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07, chunk=1024):
  """Weighted k-NN votes: top-k cosine neighbours weighted by exp(sim / T). Returns predicted labels."""
  k = min(k, len(train_feats))
  tf = jnp.asarray(train_feats)
  tl = jnp.asarray(train_labels)

  @jax.jit
  def predict(q):
    sims, idx = jax.lax.top_k(q @ tf.T, k)
    weights = jnp.exp(sims / temperature)
    votes = jnp.zeros((q.shape[0], num_classes)).at[jnp.arange(q.shape[0])[:, None], tl[idx]].add(weights)
    return jnp.argmax(votes, -1)

  return np.concatenate([np.asarray(predict(jnp.asarray(test_feats[i:i + chunk])))
                         for i in range(0, len(test_feats), chunk)])


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  model = api.load_encoder(config.init_from, config.model, config.seed)
  trf, trl, num_classes = extract(config, model, config.data.train_split, mesh)
  tef, tel, _ = extract(config, model, config.data.eval_split, mesh)
  pred = knn_classify(trf, trl, tef, num_classes, config.knn.k, config.knn.temperature)
  top1 = float(np.mean(pred == tel))
  result = {"top1": top1, "num_train": len(trf), "num_eval": len(tef)}
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_json(os.path.join(workdir, "config.json"), {"task": "knn", "config": config.to_dict(),
                                                                "encoder": model.source or "random init"})
  writer = MetricWriter(workdir)
  writer.write(0, result)
  writer.close()
  if jax.process_index() == 0:
    print(f"[knn] k={config.knn.k} T={config.knn.temperature}: top1 {top1:.4f} "
          f"({len(tef)} eval / {len(trf)} train, encoder: {model.source or 'random init'})", flush=True)
  return result
