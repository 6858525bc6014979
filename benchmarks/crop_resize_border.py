"""How much PIL's one-pass `resize(size, box=crop)` (ours) differs from torchvision's crop-then-resize (the
official RandomResizedCrop) on real photos: the filter of the one-pass form may read pixels just outside
the crop, so the difference sits at the border of the output.

  python benchmarks/crop_resize_border.py [--crops=200] [--size=224]
"""
import argparse

import numpy as np
import skimage.data
from PIL import Image


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--crops", type=int, default=200)
  ap.add_argument("--size", type=int, default=224)
  a = ap.parse_args()
  photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee",
                                                                                  "rocket")]
  rng = np.random.default_rng(0)
  frame_diff, inner_diff, off = [], [], []
  frame = np.zeros((a.size, a.size), bool)
  frame[:4] = frame[-4:] = True
  frame[:, :4] = frame[:, -4:] = True
  for k in range(a.crops):  # RandomResizedCrop boxes: scale 0.08-1, ratio 3/4-4/3
    im = photos[k % len(photos)]
    width, height = im.size
    area = rng.uniform(0.08, 1.0) * width * height
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = int(min(width, round(np.sqrt(area * ratio)))), int(min(height, round(np.sqrt(area / ratio))))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    box = (x0, y0, x0 + w, y0 + h)
    ours = np.asarray(im.resize((a.size, a.size), Image.BICUBIC, box=box), np.float64)
    official = np.asarray(im.crop(box).resize((a.size, a.size), Image.BICUBIC), np.float64)
    d = np.abs(ours - official)
    frame_diff.append(d[frame].mean())
    inner_diff.append(d[~frame].mean())
    off.append((d.max(-1) > 0.5).mean())
  print(f"{a.crops} crops to {a.size} px, bicubic: mean |difference| {np.mean(frame_diff):.2f} grey levels (of 255) "
        f"in the outer 4-pixel frame, {np.mean(inner_diff):.4f} inside; pixels off by > 0.5: {np.mean(off):.2%}")


if __name__ == "__main__":
  main()
