"""BEiT v2 in JAX/Flax: VQ-KD tokenizer, masked image modeling, fine-tuning, probing.

`beitv2_jax.load` and friends come from `beitv2_jax.api`, imported on first use: importing the package
stays cheap, and `python -m beitv2_jax.convert` / `beitv2_jax.main` run their module once, not twice.
"""
__all__ = ["load", "Model", "save_model", "export_state_dict"]
__version__ = "0.1.0"


def __getattr__(name):
  if name in __all__:
    from beitv2_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'beitv2_jax' has no attribute {name!r}")
