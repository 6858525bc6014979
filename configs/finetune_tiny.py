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
  c.init_from = ""
  c.num_classes = 0                  # 0: from the dataset
  c.model = vit_model("tiny", init_values=0.1, drop_path_rate=0.1, use_cls=False, head_init_scale=0.001)
  c.aug = dict(min_crop_scale=0.08, rand_augment_layers=2, rand_augment_magnitude=9.0, reprob=0.25, mixup=0.8, cutmix=1.0,
               mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1,
               mixup_group_size=128)  # one draw per 128 images (the official per-GPU batch); 32 is one group
  c.optim.update(lr=2e-3, min_lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.65, clip_grad=0.0)
  return c
