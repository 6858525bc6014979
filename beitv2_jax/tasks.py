"""Every `config.task` by name, in one place: main, the config checks, the AOT compiler and the benchmarks look
names up here.

TRAINED tasks are `train.loop.Task` subclasses the shared loop runs; RUNS are whole runs main hands over
(k-NN evaluation of a frozen encoder, a classifier on the robustness sets, the demo's chain of stages). Modules are imported on first use, so
reading the names costs nothing.
"""
from __future__ import annotations

import importlib
import os

TRAINED = {
    "tokenizer": "beitv2_jax.train.tokenizer:TokenizerTask",
    "pretrain": "beitv2_jax.train.pretrain:PretrainTask",
    "finetune": "beitv2_jax.train.finetune:FinetuneTask",
    "linprobe": "beitv2_jax.train.finetune:LinearProbeTask",
    "segment": "beitv2_jax.train.segment:SegmentTask",
}
RUNS = {
    "knn": "beitv2_jax.train.knn:run",
    "robust": "beitv2_jax.train.robust:run",
    "demo": "beitv2_jax.demo:run",
}
TASKS = tuple(TRAINED) + tuple(RUNS)


def check_name(name: str) -> None:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}: expected one of {list(TASKS)}")


def _resolve(target: str):
  module, attr = target.split(":")
  return getattr(importlib.import_module(module), attr)


def task_class(name: str):
  """The loop Task class of a trained task; ValueError naming the choices for any other name."""
  check_name(name)
  if name not in TRAINED:
    raise ValueError(f"task {name!r} is not trained by the loop: expected one of {list(TRAINED)}")
  return _resolve(TRAINED[name])


def run_function(name: str):
  """`run(config, workdir) -> dict` of a task main hands over whole (knn, demo)."""
  check_name(name)
  if name not in RUNS:
    raise ValueError(f"task {name!r} is trained by the loop: expected one of {list(RUNS)}")
  return _resolve(RUNS[name])


def train_tokenizer_stage(config, workdir: str, mesh):
  """Stage 1 before stage 2: a pretraining config with an empty `tokenizer_path` first trains its
  `config.tokenizer` into WORKDIR/tokenizer (a normal run: rerunning resumes it, a finished one is only
  reloaded), and returns a copy of the config that points `tokenizer_path` there. Other configs pass through."""
  if config.task != "pretrain" or config.tokenizer_path:
    return config
  if config.tokenizer is None:
    raise ValueError("config.tokenizer_path is empty and the config has no `tokenizer` sub-config to train one: "
                     "point tokenizer_path at a tokenizer workdir or an official vqkd_*.pth")
  from beitv2_jax.train import loop
  path = os.path.join(workdir, "tokenizer")
  print(f"[pretrain] no tokenizer_path: training the tokenizer of config.tokenizer into {path}", flush=True)
  loop.validate(config.tokenizer, mesh)
  loop.run(task_class("tokenizer")(config.tokenizer, path, mesh))
  from beitv2_jax.config_defaults import with_updates
  return with_updates(config, {"tokenizer_path": path})
