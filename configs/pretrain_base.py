"""BEiT v2 ViT-B/16 masked image modeling, the official recipe (docs/method.md §3.6, PRETRAINING.md).

Run (ImageNet via tfds, a trained tokenizer; see README):
  python -m beitv2_jax.main --config=configs/pretrain_base.py:epochs=1600 --workdir=$WORKDIR \
      --config.tokenizer_path=/path/to/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth
Arg: epochs=300 (default; betas (0.9, 0.98), drop path 0) or epochs=1600 (betas (0.9, 0.999), drop path 0.1).
Sized for: 16x V100-32GB officially (batch 128/GPU = 2048). Here 16 GPUs, or a TPU v4-32 (16 chips, 128 per
chip: 19.1 of 30.75 GiB), v5p-32 (19.2 of 95.7), v5e-64 or v6e-64 (64 chips, 32 per chip: 5.8 GiB), each
compiled for that slice by `python -m beitv2_jax.aot` (benchmarks/RESULTS.md, "Cloud TPU slices").
Expected after fine-tuning (configs/finetune_base.py): 85.0 (300 ep) / 85.5 (1600 ep) ImageNet top-1;
80.1 linear probe (1600 ep, paper abstract).
Labels' precision (`tokenizer_dtype`): the frozen tokenizer's matmuls run in bfloat16 (its LayerNorms,
softmax, residual stream and nearest-code search in float32). Measured on the CPU by
benchmarks/label_precision.py (RESULTS.md, "Tokenizer label precision"): against float32 execution,
bfloat16 changes 1.6% of the patch labels of a ViT-B/16-sized tokenizer (random weights) on real photos
and float16 0.19% (a trained tiny tokenizer: 1.7% vs 0.13%); the official code under fp16 autocast, its
code-search einsum in fp16 too, changes 0.36%. The changed labels are near-ties: 79 of bfloat16's 80 went to
float32's runner-up code, within 5e-3 cosine of the nearest. (The code search runs in true float32,
precision HIGHEST: at JAX's default, TF32 on recent GPUs and one bf16 pass on TPUs, it alone moved 0.11% /
0.89%, emulated.) float16 would be the closer match to float32 and to the official labels at no cost on GPUs (fp16 matmuls run at
bf16 speed there; the tokenizer forward is 35 of the step's 164 GFLOPs per image), but bfloat16 stays the
default: this recipe also targets TPUs, which have no fast float16 matmul, and the float16 tokenizer has not
run on a GPU yet (its padded-key mask value, once -inf in float16, is now finite and tested on the CPU).
On a GPU, run
`python benchmarks/label_precision.py random:pretrain_base --data photos:all` there first (it reports
non-finite outputs), then pass --config.tokenizer_dtype=float16.
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
                      early_layers={"base": 9, "large": 21}[size], head_layers=2, agg_init_style="torch")
  c.mask.update(ratio=75 / 196, min_patches=16)  # 75 of the 14x14 patches
  c.aug.update(min_crop_scale=0.2, second_interpolation="bicubic")
  c.tokenizer_path = ""   # an official vqkd_*.pth or a tokenizer workdir (required: no `tokenizer` to train)
  c.tokenizer_dtype = "bfloat16"
  c.optim.update(lr=1.5e-3, min_lr=1e-5, b1=0.9, b2=0.999 if epochs == 1600 else 0.98, eps=1e-8,
                 weight_decay=0.05, clip_grad=3.0)
  return c
