"""VQ-KD tokenizer, the official recipe (docs/method.md §2): vqkd_encoder_base_decoder_3x768x12_clip.

Run (8 GPUs or a v4-8 / v5e-8; ImageNet prepared with tfds, see README):
  python -m beitv2_jax.main --config=configs/tokenizer_base.py --workdir=$WORKDIR
Variants: `configs/tokenizer_base.py:decoder_depth=1` (the 1x768x12 tokenizer),
          `--config.teacher=facebook/dino-vitb16` (the DINO teacher; decoder output 768).
Sized for: 8x V100-32GB in the official run (batch 64/GPU); 8 GPUs here, or a TPU v4-8 (4 chips, 128 per
chip: 19.7 of 30.75 GiB, compiled by `python -m beitv2_jax.aot`; benchmarks/RESULTS.md, "Cloud TPU slices").
Expected (TOKENIZER.md): codebook usage 97% (3-layer decoder) / 100% (1-layer); the tokenizer then gives
85.0 (300 ep) / 85.5 (1600 ep) ImageNet fine-tune top-1 after BEiT v2 pretraining of ViT-B/16.
Precision: encoder, decoder and teacher matmuls in bfloat16 (LayerNorms, softmax, the residual stream,
encode_task_layer and the code search in float32); the official run used fp16 autocast. A bfloat16 encoder
puts 1.6-1.7% of the patches on another code than float32 would, float16 0.13-0.19%
(benchmarks/label_precision.py, RESULTS.md "Tokenizer label precision"): near-ties, which the EMA codebook
update averages over. Training stays in bfloat16: float16 training needs a loss scaler against gradient
underflow, which this trainer does not have, and TPUs have no fast float16 matmul. The teacher's output is
a regression target (no argmax), so its bfloat16 rounding flips no code.
"""
from beitv2_jax.config_defaults import base, recipe_args, tokenizer_model


def get_config(arg: str = ""):
  args = recipe_args(arg, {"decoder_depth": 3}, "configs/tokenizer_base.py")
  c = base("tokenizer")
  c.data.name = "tfds:imagenet2012"
  c.data.eval_split = "val"
  c.data.num_workers = 16
  c.batch_size = 512                 # 64 / GPU x 8
  c.epochs = 100
  c.warmup_epochs = 10
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500    # ~1 epoch
  c.eval_every_steps = 25020         # every 10 epochs
  c.model = tokenizer_model("base", decoder_depth=args["decoder_depth"], decoder_embed_dim=768,
                            decoder_num_heads=12, codebook_size=8192, codebook_dim=32, teacher_dim=0,
                            dtype="bfloat16")
  c.quantizer.update(ema_decay=0.99, kmeans_init=True, dead_code_restart_steps=0)
  c.teacher = "openai/clip-vit-base-patch16"
  c.teacher_dtype = "bfloat16"
  # lr 5e-5 per 128 images, scaled by batch/128 in code -> 2e-4 at 512 (run_vqkd_training.py)
  c.optim.update(lr=5e-5, scale_lr_by_batch=True, min_lr=1e-5, b1=0.9, b2=0.99, eps=1e-8,
                 weight_decay=1e-4, clip_grad=0.0)
  return c
