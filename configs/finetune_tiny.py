"""Tiny fine-tuning for 2 CPU cores: MNIST-5k digits at 32 px, from `init_from` (a pretrain_tiny workdir)
or from scratch when it is empty.

Run:  python -m beitv2_jax.main --config=configs/finetune_tiny.py --workdir=workdirs/ft_tiny \
          --config.init_from=workdirs/pt_tiny
`init_from` takes anything `beitv2_jax.load` reads, e.g. tests/data/mim_tiny_mnist.safetensors (a tiny MIM model
pretrained 1500 steps on MNIST-5k). Expected: the pretrained init beats the same model from scratch at equal
steps (200 steps, batch 32, light augmentation: 0.318 vs 0.239 top-1; benchmarks/RESULTS.md).
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/finetune_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("finetune")
  c.data.name = "mnist5k"
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.model = vit_model("tiny", init_values=0.1, drop_path_rate=0.1, final_norm="fc_norm", head_init_scale=0.001)
  # config.aug: the official recipe's (RandAugment 2 x m9, erasing 0.25, mixup 0.8 / cutmix 1.0 per 128 images)
  c.optim.update(lr=2e-3, min_lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.65, clip_grad=0.0)
  return c
