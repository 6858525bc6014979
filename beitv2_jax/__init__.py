"""BEiT v2 in JAX/Flax: VQ-KD tokenizer, masked image modeling, fine-tuning, probing."""
from beitv2_jax.api import Model, export_state_dict, load, save_model

__all__ = ["load", "Model", "save_model", "export_state_dict"]
__version__ = "0.1.0"
