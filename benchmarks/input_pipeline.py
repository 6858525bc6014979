"""Input-pipeline throughput: images/s per worker process for each task's transform on ImageNet-sized
JPEGs (made from the photos that ship in scikit-image), side by side with the official recipe's
torchvision transforms on the same files when torchvision is installed (the VQ-KD, MIM and fine-tune transforms
also as they run with data.resize="device": the host's part, the last resize (and for fine-tuning the
RandAugment colour ops) moved into the step, whose FLOPs and time on this machine's jax backend are printed);
where the host time goes, per op (`--profile`); then the whole grain pipeline (decode + transform + batch +
worker transport) with N worker processes, for the MIM and fine-tune transforms.

  python benchmarks/input_pipeline.py [--images 200] [--workers 0,1,2] [--seconds 5] [--profile]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from beitv2_jax.data import canvas as canvas_lib, decode, masking, pipeline, pixel_ops, sources, transforms  # noqa: E402


def make_jpegs(folder: str, n: int) -> list[str]:
  """n JPEGs of ImageNet's typical size (~500x375, quality 90) cut from the scikit-image photos."""
  photos = sources.photos("all").images
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "x"), exist_ok=True)
  paths = []
  for i in range(n):
    p = Image.fromarray(photos[i % len(photos)])
    w, h = p.size
    s = rng.uniform(0.6, 1.0)
    box = (0, 0, int(w * s), int(h * s))
    im = p.crop(box).resize((500, 375), Image.BICUBIC)
    path = os.path.join(folder, "x", f"{i:05d}.jpg")
    im.save(path, quality=90)
    paths.append(path)
  return paths


ON_DEVICE = ", resized on the device"  # the host's part of a transform whose last resize runs in the step


def ours(size: int) -> dict:
  mg = masking.MaskingGenerator((size // 16, size // 16), 75 if size == 224 else int(0.4 * (size // 16) ** 2))
  board = 2 * size  # data.resize_canvas's default
  return {"tokenizer": transforms.TokenizerTrain(size),
          "tokenizer" + ON_DEVICE: transforms.TokenizerTrain(size, canvas=board),
          "pretrain (MIM, 2 views + mask)": transforms.MIMTrain(size, mg),
          "pretrain (MIM, 2 views + mask)" + ON_DEVICE: transforms.MIMTrain(size, mg, canvas=board),
          "finetune": transforms.FinetuneTrain(size),
          "finetune" + ON_DEVICE: transforms.FinetuneTrain(size, canvas=board), "eval": transforms.EvalTransform(size)}


def device_resize_cost(size: int, batch: int = 64) -> tuple[float, float]:
  """(XLA's FLOP count per image, ms per image on this machine's jax backend) of the step's resize of
  `batch` canvases of 2 x size px (data/canvas.py) to size px."""
  rng = np.random.default_rng(0)
  examples = [canvas_lib.pack(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8), size, 2 * size)
              for h, w in rng.integers(size // 2, 2 * size + 1, (batch, 2))]
  args = [np.stack([e[k] for e in examples]) for k in ("canvas", "canvas_rows", "canvas_cols", "canvas_transposed")]
  return _device_cost(canvas_lib.resize, args, batch)


def _device_cost(fn, args, batch: int, reps: int = 5) -> tuple[float, float]:
  """(XLA's FLOP count, ms on this machine's jax backend) per image of `fn(*args)` over `batch` images, timed
  with the executable whose cost was read."""
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  jax.block_until_ready(compiled(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(compiled(*args))
  return flops / batch, 1e3 * (time.perf_counter() - t0) / reps / batch


def device_ops_cost(size: int, batch: int = 64) -> tuple[float, float]:
  """(XLA's FLOP count per image, ms per image on this machine's jax backend) of the step's RandAugment
  colour ops (data/pixel_ops.py), 2 layers, on `batch` images of size px, each layer's kind drawn at random."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  kinds = rng.integers(0, max(pixel_ops.DEVICE_KINDS.values()) + 1, (batch, 2)).astype(np.int32)
  luts = rng.integers(0, 256, (batch, 2, 256)).astype(np.uint8)
  factors = rng.uniform(0.1, 1.9, (batch, 2)).astype(np.float32)
  return _device_cost(pixel_ops.rand_augment, (images, kinds, luts, factors), batch)


def official(size: int) -> dict:
  """The official recipes in torchvision / timm terms (docs/method.md §2, §3.4, §4.1)."""
  try:
    from torchvision import transforms as T
  except Exception:
    return {}
  bicubic = T.InterpolationMode.BICUBIC
  out = {
      "tokenizer": T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
                              T.RandomHorizontalFlip(), T.ToTensor()]),
      "pretrain (MIM, 2 views + mask)": _official_mim(T, size),
      "eval": T.Compose([T.Resize(int(size / 0.875), interpolation=bicubic), T.CenterCrop(size), T.ToTensor()]),
  }
  try:
    from timm.data import create_transform
    out["finetune"] = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                       interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
  except Exception:
    pass
  return out


def _official_mim(T, size: int):
  """DataAugmentationForBEiT: jitter, flip, one RandomResizedCrop box resized twice (bicubic), ToTensor +
  Normalize for view 1, ToTensor for view 2, plus the block mask."""
  import torchvision.transforms.functional as F
  jitter, flip = T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()
  rrc = T.RandomResizedCrop(size, scale=(0.2, 1.0))
  norm = T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  mg = masking.MaskingGenerator((size // 16, size // 16), 75 if size == 224 else int(0.4 * (size // 16) ** 2))
  rng = np.random.default_rng(0)

  def fn(im):
    im = flip(jitter(im))
    i, j, h, w = rrc.get_params(im, rrc.scale, rrc.ratio)
    v1 = F.resized_crop(im, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC)
    v2 = F.resized_crop(im, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC)
    return norm(F.to_tensor(v1)), F.to_tensor(v2), mg(rng)
  return fn


def _tolerant(t, im):
  """timm's RandAugment calls ImageOps.posterize(img, 0) at the top magnitudes, which Pillow >= 10 rejects
  (our RandAugment returns the black image older Pillow gave); such a draw is simply counted."""
  try:
    return t(im)
  except ValueError:
    return None


def decode_ours(data: bytes) -> Image.Image:
  """The whole image, as `pipeline.ExampleFn` decodes it for a transform that needs all of it."""
  return decode.decode_pil({"image_bytes": data})[0]


def decoder_for(fn):
  """What ExampleFn hands `fn`: for a crop-box transform (`decodes_rows`) the JPEG undecoded, so that the
  transform decodes only the rows down to its box (decode.py); else the whole image."""
  if getattr(fn, "decodes_rows", False):
    return lambda data: decode.open_record({"image_bytes": data}, rows_later=True)[0]
  return decode_ours


def decode_official(data: bytes) -> Image.Image:
  """torchvision's pil_loader."""
  return Image.open(io.BytesIO(data)).convert("RGB")


def per_process_rate(fn, files: list[str], seconds: float) -> float:
  """Read + decode + transform, one process, images/s."""
  return side_by_side([(fn, decoder_for(fn))], files, seconds)[0]


def side_by_side(sides, files: list[str], seconds: float, rounds: int = 8) -> list[float]:
  """images/s of each (transform, decode) side, measured in alternating short rounds so that a shared
  machine's slow spells hit every side alike."""
  rngs = [np.random.default_rng(0) for _ in sides]
  counts, spent, i = [0] * len(sides), [0.0] * len(sides), 0
  for _ in range(rounds):
    for k, (fn, decode) in enumerate(sides):
      t0 = time.perf_counter()
      while time.perf_counter() - t0 < seconds / rounds:
        with open(files[i % len(files)], "rb") as f:
          fn(decode(f.read()), rngs[k])
        counts[k], i = counts[k] + 1, i + 1
      spent[k] += time.perf_counter() - t0
  return [c / t for c, t in zip(counts, spent)]


class OpTimer:
  """Host time per op while the real transform runs: the named functions are wrapped, and each op's time
  excludes the wrapped ops it calls (the jitter's own crop counts as crop)."""

  def __init__(self):
    self.seconds, self._stack = collections.defaultdict(float), []

  def wrap(self, name, fn):
    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      self._stack.append(0.0)
      try:
        return fn(*args, **kwargs)
      finally:
        inner, dt = self._stack.pop(), time.perf_counter() - t0
        self.seconds[name] += dt - inner
        if self._stack:
          self._stack[-1] += dt
    return timed

  @contextlib.contextmanager
  def patched(self, targets):
    with contextlib.ExitStack() as stack:
      for owner, attr, name in targets:
        stack.enter_context(mock.patch.object(owner, attr, self.wrap(name, getattr(owner, attr))))
      yield


def op_targets() -> list:
  """(object, attribute, op name) for every op the transforms of both sides spend time in."""
  targets = [(decode.EncodedJpeg, "decode", "decode"), (transforms, "color_jitter_crop", "colour jitter"),
             (Image.Image, "crop", "crop"),
             (Image.Image, "resize", "resize"), (Image.Image, "transpose", "flip"),
             (transforms, "apply_op", "RandAugment"), (transforms, "device_fields", "RandAugment tables"),
             (transforms, "random_erasing_mask", "erasing"),
             (masking.MaskingGenerator, "__call__", "block mask"), (transforms, "as_uint8", "to array"),
             (canvas_lib, "pack", "into the canvas"), (canvas_lib, "pack_resized", "into the canvas")]
  try:
    import torchvision.transforms.functional as F
    from timm.data import auto_augment, random_erasing
    targets += [(F, "adjust_brightness", "colour jitter"), (F, "adjust_contrast", "colour jitter"),
                (F, "adjust_saturation", "colour jitter"), (F, "to_tensor", "to array"),
                (F, "normalize", "normalise"), (auto_augment.RandAugment, "__call__", "RandAugment"),
                (random_erasing.RandomErasing, "__call__", "erasing")]
  except Exception:
    pass
  return targets


def profile(fn, files: list[str], n: int, decode) -> dict:
  """ms per image in each op (decode, the transform's ops, the rest) over n images."""
  timer, rng = OpTimer(), np.random.default_rng(0)
  timed_decode = timer.wrap("decode", decode)
  t0 = time.perf_counter()
  with timer.patched(op_targets()):
    for i in range(n):
      with open(files[i % len(files)], "rb") as f:
        fn(timed_decode(f.read()), rng)
  total = time.perf_counter() - t0
  ms = {k: 1e3 * v / n for k, v in timer.seconds.items()}
  ms["other"] = 1e3 * total / n - sum(ms.values())
  ms["total"] = 1e3 * total / n
  return ms


def rows_decode_ms(files: list[str], reps: int = 8) -> dict:
  """ms per image of the whole JPEG decode vs the decode down to a VQ-KD / fine-tune crop box's bottom row
  (decode.py), interleaved image by image, on the files as they are (landscape) and turned to portrait."""
  out = {}
  for shape, turn in (("500x375", False), ("375x500", True)):
    blobs = []
    for path in files[:100]:
      if turn:
        buf = io.BytesIO()
        Image.open(path).transpose(Image.TRANSPOSE).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
      else:
        with open(path, "rb") as f:
          blobs.append(f.read())
    rng = np.random.default_rng(0)
    size = (375, 500) if turn else (500, 375)
    boxes = [transforms.random_resized_crop_box(rng, *size) for _ in blobs]
    whole = rows = 0.0
    for _ in range(reps):
      for data, (_, top, _, h) in zip(blobs, boxes):
        t0 = time.perf_counter()
        decode.decode_pil({"image_bytes": data})
        t1 = time.perf_counter()
        decode.open_record({"image_bytes": data}, rows_later=True)[0].decode(top + h)
        whole, rows = whole + t1 - t0, rows + time.perf_counter() - t1
    n = reps * len(blobs)
    out[shape] = (1e3 * whole / n, 1e3 * rows / n)
  return out


def batch_cost_ms(transform, files: list[str], batch: int = 64) -> float:
  """Stacking one batch of examples into arrays (grain's batch), ms per image."""
  rng = np.random.default_rng(0)
  examples = []
  for i in range(batch):
    with open(files[i % len(files)], "rb") as f:
      examples.append(transform(decode_ours(f.read()), rng))
  t0, reps = time.perf_counter(), 20
  for _ in range(reps):
    {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  return 1e3 * (time.perf_counter() - t0) / reps / batch


def grain_rate(folder: str, transform, workers: int, seconds: float, batch: int = 64) -> float:
  src = sources.folder(folder, "all")
  it = iter(pipeline.train_dataset(src, transform, batch, seed=0, num_workers=workers,
                                   read_threads=0 if workers else 4))
  next(it)  # start-up
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - t0)


def main():
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--images", type=int, default=200)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--seconds", type=float, default=4.0)
  ap.add_argument("--workers", default="0,1,2")
  ap.add_argument("--profile", action="store_true", help="also the per-op table (ms per image)")
  a = ap.parse_args()
  folder = tempfile.mkdtemp()
  files = make_jpegs(folder, a.images)
  print(f"{len(files)} JPEGs of 500x375 in {folder}; {os.cpu_count()} CPUs", flush=True)
  print("| transform | ours (img/s/process) | official torchvision/timm (img/s/process) | ours / official "
        "| ours, whole JPEG decoded |")
  print("|---|---|---|---|---|")
  theirs = official(a.size)
  for name, fn in ours(a.size).items():
    t = theirs.get(name.replace(ON_DEVICE, ""))
    rows = getattr(fn, "decodes_rows", False)
    sides = [(fn, decoder_for(fn))]
    if t is not None:
      sides.append((lambda im, rng, t=t: _tolerant(t, im), decode_official))
    if rows:  # the same transform on the whole decoded image: what decoding only the rows saves
      sides.append((fn, decode_ours))
    rates = side_by_side(sides, files, a.seconds * len(sides))
    r, tr = rates[0], (rates[1] if t is not None else None)
    whole = f"{rates[-1]:.0f}" if rows else "-"
    print(f"| {name} | {r:.0f} | {f'{tr:.0f}' if tr else 'n/a'} | {f'{r / tr:.2f}x' if tr else ''} | {whole} |",
          flush=True)
  if a.profile:
    print_profile(a, files, theirs)
  flops, ms = device_resize_cost(a.size)
  print(f"the step's resize of {2 * a.size} px canvases to {a.size} px: {flops / 1e9:.2f} GFLOP per image "
        f"(XLA's count), {ms:.2f} ms per image on this machine's jax backend", flush=True)
  flops, ms = device_ops_cost(a.size)
  print(f"the step's RandAugment colour ops (2 layers, data/pixel_ops.py) at {a.size} px: {flops / 1e9:.3f} GFLOP "
        f"per image (XLA's count), {ms:.2f} ms per image on this machine's jax backend", flush=True)
  mims = {k: v for k, v in ours(a.size).items() if k.startswith(("pretrain", "finetune"))}
  for name, mim in mims.items():
    print(f"stacking a batch of 64 examples, {name}: {batch_cost_ms(mim, files):.3f} ms per image")
  for w in [int(x) for x in a.workers.split(",")]:
    for name, mim in mims.items():
      print(f"grain pipeline, {name}, {w} worker processes: {grain_rate(folder, mim, w, a.seconds):.0f} img/s",
            flush=True)


def print_profile(a, files, theirs):
  n = max(50, int(a.seconds * 60))
  for name, fn in ours(a.size).items():
    mine = profile(fn, files, n, decoder_for(fn))
    t = theirs.get(name.replace(ON_DEVICE, ""))
    ref = profile(lambda im, rng: _tolerant(t, im), files, n, decode_official) if t is not None else {}
    print(f"\n{name}, ms per image ({n} images)\n| op | ours | official |\n|---|---|---|")
    ops = sorted(set(mine) | set(ref), key=lambda k: (k in ("other", "total"), k == "total", -ref.get(k, mine.get(k))))
    for op in ops:
      print(f"| {op} | {mine.get(op, 0):.2f} | {f'{ref[op]:.2f}' if op in ref else 'n/a'} |")
  for shape, (whole, rows) in rows_decode_ms(files).items():
    print(f"JPEG decode {shape}, ms per image: whole {whole:.3f}, down to the RandomResizedCrop box's bottom "
          f"row {rows:.3f} ({whole / rows:.2f}x)")
  print(flush=True)


if __name__ == "__main__":
  main()
