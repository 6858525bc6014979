"""ADE20K semantic segmentation, UperNet on BEiT v2 ViT-L/16 at 512 px: the official large recipe.

Run:  python -m beitv2_jax.main --config=configs/segment_large.py --workdir=runs/seg_l \
        --config.init_from=runs/pt_large --config.data.name=folder:/data/ADEChallengeData2016
Hardware: 8 GPUs (2 images each) or a v4-16. Expected (paper): 56.7 mIoU (57.5 with ImageNet-21k
intermediate fine-tuning). Blocks 8, 12, 16, 24 (out_indices 7, 11, 15, 23), 1024 channels, drop path 0.2,
init_values 1e-6 (used only without a checkpoint), lr 4e-5, layer decay 0.9; the rest as segment_base.py.
"""
from beitv2_jax.config_defaults import recipe_args, sibling_recipe, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/segment_large.py")
  c = sibling_recipe(__file__, "segment_base").get_config()
  c.model = vit_model("large", img_size=512, init_values=1e-6, drop_path_rate=0.2, out_indices=(7, 11, 15, 23),
                      channels=1024, aux_channels=256, dropout=0.1, dtype="bfloat16")
  c.optim.update(lr=4e-5, layer_decay=0.9)
  return c
