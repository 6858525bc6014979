"""A tiny VQ-KD tokenizer for 2 CPU cores, on real images that install offline.

Run:  python -m beitv2_jax.main --config=configs/tokenizer_tiny.py --workdir=workdirs/tok_tiny
Data: `photos` (the natural photos inside scikit-image; random crops at 32 px) by default;
      `--config.data.name=mnist5k` for the MNIST digits.
Teacher: a randomly initialised tiny CLIP (no weights can be downloaded offline), so the codes are a
      distillation of random features: this config checks the machinery, not tokenizer quality. Point
      `--config.teacher` at a CLIP folder to distil a real one.
Dead-code restart is ON here (quantizer.dead_code_restart_steps=20; it is off in the official recipe and in
tokenizer_base.py): with a random teacher and 300 steps, half the codes go unused without it (measured on
the photos: codebook_usage 0.48 and rec_loss 0.089 at step 300 with it off; 1.00 and 0.080 with it on).
Expected (2-core CPU, ~1 min for 300 steps): rec_loss falls from ~0.37 to ~0.08, codebook_usage ~1.0.
"""
from beitv2_jax.config_defaults import base, recipe_args, tokenizer_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/tokenizer_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("tokenizer")
  c.data.name = "photos"
  c.data.train_split = "all"
  c.data.eval_split = ""
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 20
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  c.model = tokenizer_model("tiny", decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2,
                            codebook_size=512, codebook_dim=32, teacher_dim=0)
  c.quantizer.update(ema_decay=0.99, kmeans_init=True, dead_code_restart_steps=20)
  c.teacher = "random"               # the tiny CLIP of config.random_teacher: width 64, depth 2, dim 32
  c.optim.update(lr=5e-4, scale_lr_by_batch=False, min_lr=1e-5, b1=0.9, b2=0.99, eps=1e-8,
                 weight_decay=1e-4, clip_grad=0.0)
  return c
