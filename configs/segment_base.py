"""ADE20K semantic segmentation, UperNet on BEiT v2 ViT-B/16 at 512 px: the official recipe
(semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k.py).

Run:  python -m beitv2_jax.main --config=configs/segment_base.py --workdir=runs/seg \
        --config.init_from=runs/pt --config.data.name=folder:/data/ADEChallengeData2016
Data: ADEChallengeData2016 as released (images/{training,validation}/*.jpg, annotations/{...}/*.png; tfds'
scene_parse150 serves instance maps, not these). Hardware: 8 GPUs (2 images each) or a v4-8.
Expected (paper): 53.1 mIoU from the 1600-epoch pretraining, 53.5 with ImageNet-21k intermediate fine-tuning.
The backbone: blocks 4, 6, 8, 12 (out_indices 3, 5, 7, 11), drop path 0.15, the pretrained rel-pos table
resized from 14x14 to 32x32 in every block; UperNet 768 channels, auxiliary FCN 256 (loss weight 0.4); AdamW
lr 5e-5, wd 0.05, layer decay 0.75, poly schedule with 1500 warm-up iterations, 160k iterations of batch 16;
sliding-window evaluation (512, stride 341) every 16k iterations.
"""
from beitv2_jax.config_defaults import base, recipe_args, vit_model


def get_config(arg: str = ""):
  recipe_args(arg, {}, "configs/segment_base.py")
  c = base("segment")
  c.data.update(name="folder:ADEChallengeData2016", train_split="train", eval_split="val", num_workers=8)
  c.num_classes = 150
  c.batch_size = 16
  c.total_steps = 160_000
  c.warmup_steps = 1500
  c.log_every_steps = 50
  c.eval_every_steps = 16_000
  c.checkpoint_every_steps = 4000
  c.model = vit_model("base", img_size=512, init_values=0.1, drop_path_rate=0.15, out_indices=(3, 5, 7, 11),
                      channels=768, aux_channels=256, dropout=0.1, dtype="bfloat16")
  c.optim.update(lr=5e-5, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.75)
  return c
