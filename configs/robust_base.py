"""A fine-tuned ViT-B/16 ImageNet-1k classifier on the robustness sets, as the official `--robust_test`:
ImageNet-A and ImageNet-R over their 200 classes (the other logits masked), ImageNet-Sketch and ImageNetV2
(matched-frequency) over all 1000. Top-1 / top-5 per set in WORKDIR/metrics.jsonl.

Run:  python -m beitv2_jax.main --config=configs/robust_base.py --workdir=workdirs/robust \
        --config.init_from=workdirs/ft_base      # or an official / timm fine-tuned file
Data: `tfds build imagenet_a imagenet_r imagenet_sketch imagenet_v2 --file_format=array_record` once (tfds
downloads all four; building needs tensorflow, reading does not), or folders:
`--config.robust.datasets=folder:/data/imagenet-a,folder:/data/imagenet-r --config.robust.split=all`.
Hardware: any; one GPU evaluates the ~110k images of the four sets in minutes.
"""
from beitv2_jax.config_defaults import base, recipe_args


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/robust_base.py")  # takes none: a typo is refused, not ignored
  c = base("robust")
  c.batch_size = 256
  c.dtype = "bfloat16"
  c.crop_pct = 0.875
  return c
