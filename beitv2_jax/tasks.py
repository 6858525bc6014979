"""The training tasks by name (config.task). `knn` and `demo` are not trained by the loop: main runs them."""
from __future__ import annotations

TRAINED = ("tokenizer", "pretrain", "finetune", "linprobe")


def task_class(name: str):
  """The loop Task class of a config.task name; ValueError naming the choices for any other."""
  if name == "tokenizer":
    from beitv2_jax.train.tokenizer import TokenizerTask
    return TokenizerTask
  if name == "pretrain":
    from beitv2_jax.train.pretrain import PretrainTask
    return PretrainTask
  if name in ("finetune", "linprobe"):
    from beitv2_jax.train import finetune
    return finetune.FinetuneTask if name == "finetune" else finetune.LinearProbeTask
  raise ValueError(f"unknown task {name!r}: expected one of {sorted(TRAINED + ('knn', 'demo'))}")
