"""ImageNet-1k fine-tuning of BEiT v2 ViT-L/16 (docs/method.md §4.1).

Run:  python -m beitv2_jax.main --config=configs/finetune_large.py:pt1600 --workdir=$WORKDIR --config.init_from=...
Args: pt300, pt1600 (default), ft21k.  Sized for: 8x V100 officially (1024 = 64 x 8 x 2 accumulation);
8+ GPUs here, or a TPU v4-16 (8 chips, 128 per chip: 29.1 of 30.75 GiB; `python -m beitv2_jax.aot`).
Expected top-1: pt300 86.6, pt1600 87.3, ft21k 88.4 (official eval log 88.370).
"""
from beitv2_jax.config_defaults import sibling_recipe


def get_config(arg: str = ""):
  return sibling_recipe(__file__, "finetune_base").finetune_config("large", arg or "pt1600")
