"""ImageNet-1k fine-tuning of BEiT v2 ViT-B/16 (docs/method.md §4.1, get_started_for_image_classification.md).

Run:  python -m beitv2_jax.main --config=configs/finetune_base.py:pt1600 --workdir=$WORKDIR \
          --config.init_from=/path/to/beitv2_base_patch16_224_pt1k.pth     (or our pretrain workdir)
Args: pt300 (from 300-epoch pretraining), pt1600 (default), ft21k (after 21k intermediate fine-tuning).
Sized for: 8x V100 officially (batch 1024 = 128 x 8); 8 GPUs here, or a TPU v4-8 (4 chips, 256 per chip:
28.6 of 30.75 GiB, close to the limit; compiled by `python -m beitv2_jax.aot`, benchmarks/RESULTS.md).
Expected top-1: pt300 85.0, pt1600 85.5, ft21k 86.5 (official eval log 86.458).
"""
from beitv2_jax.config_defaults import base, vit_model

# setting -> (lr, epochs, warmup_epochs, layer_decay, drop_path, mixup, cutmix)
RECIPES = {
    "base": {"pt300": (5e-4, 100, 20, 0.65, 0.1, 0.8, 1.0), "pt1600": (5e-4, 100, 20, 0.6, 0.2, 0.8, 1.0),
             "ft21k": (5e-5, 30, 20, 0.75, 0.1, 0.0, 0.0)},
    "large": {"pt300": (5e-4, 50, 5, 0.8, 0.2, 0.8, 1.0), "pt1600": (2e-4, 50, 5, 0.8, 0.2, 0.8, 1.0),
              "ft21k": (7e-5, 20, 5, 0.8, 0.25, 0.0, 0.0)},
}


def get_config(arg: str = ""):
  return finetune_config("base", arg or "pt1600")


def finetune_config(size: str, setting: str):
  if setting not in RECIPES[size]:
    raise ValueError(f"unknown setting {setting!r}: expected one of {sorted(RECIPES[size])}")
  lr, epochs, warmup, layer_decay, drop_path, mixup, cutmix = RECIPES[size][setting]
  c = base("finetune")
  c.data.name = "tfds:imagenet2012"
  c.data.eval_split = "val"
  c.data.num_workers = 16
  c.batch_size = 1024
  c.epochs = epochs
  c.warmup_epochs = warmup
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1250
  c.eval_every_steps = 1250
  c.num_classes = 1000
  c.crop_pct = 0.875                 # eval: Resize(256) + CenterCrop(224)
  c.model = vit_model(size, dtype="bfloat16", init_values=0.1, drop_path_rate=drop_path, final_norm="fc_norm",
                      head_init_scale=0.001)
  c.aug.update(min_crop_scale=0.08, rand_augment_layers=2, rand_augment_magnitude=9.0, reprob=0.25,
               mixup=mixup, cutmix=cutmix, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1,
               # one mixup / cutmix draw per group, as per GPU officially: 1024 = 128 x 8 GPUs (base),
               # 64 x 8 x 2 nodes (large)
               mixup_group_size={"base": 128, "large": 64}[size])
  c.optim.update(lr=lr, min_lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, layer_decay=layer_decay,
                 clip_grad=0.0)
  return c
