"""Fields every task config has, with their defaults. Recipe files in configs/ start from `base(task)`
and set what their recipe says; every field can be overridden on the command line
(`--config.batch_size=256`, `--config.optim.lr=1e-3`)."""
from __future__ import annotations

import ml_collections

TASKS = ("tokenizer", "pretrain", "finetune", "linprobe", "knn", "demo")


def base(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.batch_size = 128            # global, over all processes and devices
  c.epochs = 1.0
  c.total_steps = 0             # > 0 overrides epochs
  c.warmup_epochs = 0.0
  c.warmup_steps = -1           # >= 0 overrides warmup_epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 0        # 0: evaluate at the end only
  c.keep_checkpoints = 3        # the last N ...
  c.keep_every_steps = 0        # ... plus every K-th (0: none)
  c.stop_after_steps = 0        # > 0: save and exit at this step; the same command resumes

  c.data = ml_collections.ConfigDict(dict(
      name="mnist5k", train_split="train", eval_split="val", num_workers=0, read_threads=4,
      device_prefetch=2))  # batches kept in flight to the devices ahead of the step
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # data=-1: all devices / fsdp
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="beitv2_jax", name=""))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, clip_grad=0.0))
  return c


def vit_model(size: str = "base", **kw) -> ml_collections.ConfigDict:
  """Backbone sizes: tiny (CPU tests and demos), base, large.

  Execution fields (no effect on the math beyond rounding, never stored with a checkpoint): dtype of the
  matmuls, scan over blocks, remat policy, attention ("auto": cuDNN flash attention on GPUs in bf16, the
  explicit XLA form elsewhere; "xla" | "cudnn" force one; see beitv2_jax/models/attention.py).
  """
  sizes = {
      "tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2),
      "small": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
      "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
      "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
  }
  if size not in sizes:
    raise ValueError(f"unknown model size {size!r}: expected one of {sorted(sizes)}")
  m = dict(sizes[size], mlp_ratio=4.0, dtype="float32", scan=False, remat="none",
           attention="auto")
  m.update(kw)
  return ml_collections.ConfigDict(m)
