"""Weighted k-NN (k 20, T 0.07, cosine; DINO / iBOT protocol) on frozen features of the offline digits.

Run:  python -m beitv2_jax.main --config=configs/knn_tiny.py --workdir=workdirs/knn --config.init_from=workdirs/pt_tiny
`init_from` empty evaluates the same architecture at random init (the baseline).
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/knn_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("knn")
  c.data.name = "mnist5k"
  c.batch_size = 256
  c.model = vit_model("tiny", init_values=0.1)
  c.probe.update(layer=-1, pool="cls")
  c.knn.update(k=20, temperature=0.07)
  return c
