"""Tiny BEiT v2 pretraining for 2 CPU cores on real offline images, tokenizer included.

Run:  python -m beitv2_jax.main --config=configs/pretrain_tiny.py --workdir=workdirs/pt_tiny
With an empty tokenizer_path it first trains configs/tokenizer_tiny.py into WORKDIR/tokenizer, so this one
command shows the whole of stage 1 + 2. Data: the scikit-image photos, random 32 px crops, an 8x8 grid of
4 px patches, 40% masked (26 of 64) in blocks; evaluated on centre crops of the held-out photos.
The nested tokenizer runs without dead-code restart: on MNIST digits restart spread the background over
many interchangeable codes (masked accuracy 0.039 vs a 0.032 majority baseline), and without restart MNIST's blank background is
one code covering half the patches (the majority baseline is then ~50%); the photos have no such code.
Expected (2-core CPU, ~4 min): eval_mlm_acc_1 about twice eval_majority_code_acc (measured at 400 steps,
evaluated on all photos: 0.22 vs 0.10).
"""
from beitv2_jax.config_defaults import base, recipe_args, sibling_recipe, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/pretrain_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("pretrain")
  c.data.name = "photos"
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.batch_size = 64
  c.total_steps = 400
  c.warmup_steps = 40
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.model = vit_model("tiny", init_values=0.1, drop_path_rate=0.0, early_layers=1, head_layers=2,
                      agg_init_style="torch")
  c.mask.update(ratio=0.4, min_patches=4)  # 26 of the 8x8 patches
  c.aug.update(min_crop_scale=0.2, second_interpolation="bicubic")
  c.tokenizer_path = ""                    # "": train `tokenizer` first, into WORKDIR/tokenizer
  c.tokenizer = sibling_recipe(__file__, "tokenizer_tiny").get_config()
  c.tokenizer.data.train_split = "train"
  c.tokenizer.quantizer.dead_code_restart_steps = 0
  c.optim.update(lr=1.5e-3, min_lr=1e-5, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, clip_grad=3.0)
  return c
