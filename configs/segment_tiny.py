"""UperNet on the tiny BEiT encoder on the offline `digits_on_photos` set (red / green / blue tiles showing a
0, 1 or 2 pasted on crops of the scikit-image photos; 4 classes, the photo included): the segmentation path
end to end on 2 CPU cores in about two minutes.

Run:  python -m beitv2_jax.main --config=configs/segment_tiny.py --workdir=workdirs/seg_tiny \
        [--config.init_from=tests/data/mim_tiny_mnist.safetensors]  # a tiny pretraining; empty: random init
Expected: held-out mIoU ~0.88 and aAcc ~0.96 after 300 steps, where predicting the photo everywhere scores
0.18 and 0.73 (benchmarks/RESULTS.md).
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/segment_tiny.py")  # takes none: a typo is refused, not ignored
  c = base("segment")
  c.data.name = "digits_on_photos"
  c.batch_size = 16
  c.total_steps = 300
  c.warmup_steps = 30
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  # the tiny encoder of configs/pretrain_tiny.py (depth 2, width 64, 4 px patches), so a tiny pretraining loads;
  # its two blocks feed the four pyramid levels (the official base takes blocks 4, 6, 8, 12)
  c.model = vit_model("tiny", init_values=0.1, drop_path_rate=0.1, out_indices=(0, 0, 1, 1), channels=32,
                      aux_channels=16, dropout=0.1)
  # 64 px images rescaled by 0.5-2 of (256, 64) -> 32-128 px, 32 px crops (the official 2048x512 / 512 recipe
  # scaled by 1/8 on the crop); the photo is class 0 and scored (reduce_zero_label off)
  c.seg.update(crop=32, scale_long=256, scale_short=64, stride=21, reduce_zero_label=False)
  c.optim.update(lr=2e-3, min_lr=0.0, weight_decay=0.05, layer_decay=0.75)
  return c
