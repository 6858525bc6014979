"""BEiT v2 ViT-B/16 masked image modeling, the official recipe (spec §3.6, PRETRAINING.md).

Run (ImageNet via tfds, a trained tokenizer; see README):
  python -m beitv2_jax.main --config=configs/pretrain_base.py:epochs=1600 --workdir=$WORKDIR \
      --config.tokenizer_path=/path/to/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth
Arg: epochs=300 (default; betas (0.9, 0.98), drop path 0) or epochs=1600 (betas (0.9, 0.999), drop path 0.1).
Sized for: 16x V100-32GB officially (batch 128/GPU = 2048); e.g. a TPU v4-32 / v5p-32 or 16 GPUs here.
Expected after fine-tuning (configs/finetune_base.py): 85.0 (300 ep) / 85.5 (1600 ep) ImageNet top-1;
80.1 linear probe (1600 ep, paper abstract).
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  return pretrain_config("base", arg)


def pretrain_config(size: str, arg: str):
  epochs = recipe_args(arg, {"epochs": 300}, f"configs/pretrain_{size}.py")["epochs"]
  if epochs not in (300, 1600):
    raise ValueError(f"epochs={epochs}: the official recipes are 300 and 1600")
  c = base("pretrain")
  c.data.name = "tfds:imagenet2012"
  c.data.eval_split = ""
  c.data.num_workers = 16
  c.batch_size = 2048
  c.epochs = epochs
  c.warmup_epochs = 10
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.model = vit_model(size, dtype="bfloat16",
                      init_values={"base": 0.1, "large": 1e-5}[size],
                      drop_path_rate=0.1 if epochs == 1600 else 0.0,
                      early_layers={"base": 9, "large": 21}[size], head_layers=2, agg_init_style="torch",
                      mask_ratio=75 / 196, min_mask_patches=16, min_crop_scale=0.2,
                      second_interpolation="bicubic")
  c.tokenizer_path = ""   # an official vqkd_*.pth or a tokenizer workdir (required)
  c.tokenizer_dtype = "bfloat16"
  c.tokenizer = None
  c.optim.update(lr=1.5e-3, min_lr=1e-5, b1=0.9, b2=0.999 if epochs == 1600 else 0.98, eps=1e-8,
                 weight_decay=0.05, clip_grad=3.0)
  return c
