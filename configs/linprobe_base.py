"""Linear probe of a BEiT v2 ViT-B/16 on ImageNet-1k (frozen encoder).

Protocol (ours; no official linear-probe script exists and the paper's 80.1% was not reproduced by users,
docs/method.md §4.2): the final-layer [CLS] after the final norm (what patch aggregation trains), a parameter-free
BatchNorm, one linear layer; AdamW lr 4e-3 (BEiT v1 linear eval's example), batch 1024, 100 epochs,
cosine, RandomResizedCrop + flip; eval Resize(256) + CenterCrop(224). Options: `probe.pool=mean`,
`probe.layer=k` (block k, 1-based), `probe.batchnorm=False`.

Run:  python -m beitv2_jax.main --config=configs/linprobe_base.py --workdir=$WORKDIR --config.init_from=...
Sized for: 8 GPUs / one TPU host (a v4-8: 1.5 GiB per chip, `python -m beitv2_jax.aot`). Paper: 80.1
(ViT-B/16, 1600 ep) [protocol unverified].
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/linprobe_base.py")  # takes none: a typo is refused, not ignored
  c = base("linprobe")
  c.data.name = "tfds:imagenet2012"
  c.data.eval_split = "val"
  c.data.num_workers = 16
  c.batch_size = 1024
  c.epochs = 100
  c.warmup_epochs = 10
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.eval_every_steps = 12500
  c.num_classes = 1000
  c.model = vit_model("base", init_values=0.1)
  c.probe.update(layer=-1, pool="cls", batchnorm=True)
  c.optim.update(lr=4e-3, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.0)
  return c
