"""Metrics out: WORKDIR/metrics.jsonl (one JSON object per log step), TensorBoard event files (through
tensorboardX, no TensorFlow needed), and Weights & Biases when installed and `config.wandb.enabled`."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Optional

import jax
import numpy as np


def _scalar(v) -> Any:
  a = np.asarray(v)
  if a.size != 1:
    return None
  x = a.item()
  return x if isinstance(x, (int, bool)) or not isinstance(x, float) or math.isfinite(x) else str(x)


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch when it is installed
  (4 s at every start) only to accept torch tensors, and falls back to numpy when the import fails. We pass it
  Python floats. A torch already imported is left alone."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricWriter:
  def __init__(self, workdir: str, wandb_config: Optional[dict] = None, tensorboard: bool = True,
               drop_after_step: Optional[int] = None):
    """drop_after_step: on resume, the step restored; rows of later steps (logged by the interrupted run
    after its last checkpoint, about to be logged again) are removed from metrics.jsonl."""
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = self.wandb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    if drop_after_step is not None:
      self._drop_rows_after(drop_after_step)
    if tensorboard:
      try:
        self.tb = _summary_writer(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("tensorboardX not installed: no TensorBoard events")
    if wandb_config and wandb_config.get("enabled"):
      try:
        import wandb
        self.wandb = wandb.init(project=wandb_config.get("project", "beitv2_jax"),
                                name=wandb_config.get("name") or None, config=wandb_config.get("run_config"),
                                dir=workdir, resume="allow", id=wandb_config.get("id") or None)
      except ImportError:
        logging.warning("config.wandb.enabled but wandb is not installed: skipped")

  def _drop_rows_after(self, step: int) -> None:
    rows = read_metrics(os.path.dirname(self.path))
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) == len(rows):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, self.path)
    print(f"metrics.jsonl: dropped {len(rows) - len(keep)} row(s) past step {step}, logged after the last "
          "checkpoint (they are logged again as the run resumes)", flush=True)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is not None:
        row[k] = s
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:  # a line cut short by a kill mid-write
        continue
  return rows
