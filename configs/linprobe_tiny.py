"""Linear probe on frozen features, sized for 2 CPU cores on the offline digits.

Protocol (ours; the official code released no linear-probe script and its users could not reproduce the
paper's 80.1%, see docs/method.md §4.2): features = the final-layer [CLS] token after the final norm (what patch
aggregation trains; `probe.pool='mean'` for mean-pooled patch tokens, `probe.layer=k` for block k), an
optional parameter-free BatchNorm (`probe.batchnorm`, as MAE), one linear layer trained with AdamW and a
cosine schedule on RandomResizedCrop + flip, evaluated with resize + centre crop.

Run:  python -m beitv2_jax.main --config=configs/linprobe_tiny.py --workdir=workdirs/lp --config.init_from=workdirs/pt_tiny
`init_from` empty probes the same architecture at random init (the baseline).
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/linprobe_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("linprobe")
  c.data.name = "mnist5k"
  c.batch_size = 128
  c.total_steps = 300
  c.warmup_steps = 20
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.model = vit_model("tiny", init_values=0.1)   # used for the random-init baseline and image size
  c.probe.update(layer=-1, pool="cls", batchnorm=True)
  c.optim.update(lr=1e-2, min_lr=1e-5, b1=0.9, b2=0.999, weight_decay=0.0)
  return c
