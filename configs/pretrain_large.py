"""BEiT v2 ViT-L/16 masked image modeling, the official recipe (docs/method.md §3.6).

Run:  python -m beitv2_jax.main --config=configs/pretrain_large.py:epochs=1600 --workdir=$WORKDIR \
          --config.tokenizer_path=...
Sized for: 64x V100-32GB officially (32/GPU = 2048); a TPU v4-64 here (32 chips, 64 per chip: 26.0 of 30.75
GiB without FSDP, compiled by `python -m beitv2_jax.aot`; benchmarks/RESULTS.md, "Cloud TPU slices").
`--config.mesh.fsdp=8` shards parameters and optimizer state where memory is shorter.
Expected after fine-tuning: 86.6 (300 ep) / 87.3 (1600 ep) ImageNet top-1 (configs/finetune_large.py).
Labels' precision: as in configs/pretrain_base.py (the same ViT-B/16 tokenizer, run in bfloat16: 1.6% of the
labels differ from float32 execution, 0.19% with --config.tokenizer_dtype=float16, the better choice on GPUs
once checked there; bfloat16 by default because TPUs have no fast float16 matmul).
"""
from beitv2_jax.config_defaults import sibling_recipe


def get_config(arg: str = ""):
  return sibling_recipe(__file__, "pretrain_base").pretrain_config("large", arg)
