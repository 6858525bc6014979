"""Decoding only the rows a crop box needs (data/decode.py): the same pixels as the whole decode, the same
examples through the pipeline, and unreadable files still replaced with the same draws."""
import io
import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from beitv2_jax.data import decode, pipeline, sources, transforms


def _photo(width, height, seed=0):
  """Real photo content (scikit-image's astronaut, cropped and resized) at the given size."""
  import skimage.data
  im = Image.fromarray(skimage.data.astronaut())
  rng = np.random.default_rng(seed)
  left, top = rng.integers(0, 100, 2)
  return im.crop((left, top, left + 400, top + 400)).resize((width, height), Image.BICUBIC)


def _jpeg(im, **kw) -> bytes:
  out = io.BytesIO()
  im.save(out, format="JPEG", quality=90, **kw)
  return out.getvalue()


VARIANTS = {  # chroma subsampling, progressive, grey, CMYK, restart markers, sizes not a multiple of 16
    "4:2:0": lambda: _jpeg(_photo(120, 90), subsampling=2),
    "4:2:2": lambda: _jpeg(_photo(120, 90), subsampling=1),
    "4:4:4": lambda: _jpeg(_photo(120, 90), subsampling=0),
    "progressive": lambda: _jpeg(_photo(120, 90), progressive=True),
    "grey": lambda: _jpeg(_photo(120, 90).convert("L")),
    "cmyk": lambda: _jpeg(_photo(120, 90).convert("CMYK")),
    "restart markers": lambda: _jpeg(_photo(120, 90), restart_marker_blocks=2),
    "odd size, portrait": lambda: _jpeg(_photo(67, 101, seed=1)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_top_rows_decode_to_the_whole_decodes_pixels_at_every_row_count(variant):
  data = VARIANTS[variant]()
  whole = np.asarray(decode.decode_pil({"image_bytes": data})[0])
  height = whole.shape[0]
  frame = decode.jpeg_frame(data)
  assert frame[1:] == (whole.shape[1], height)
  enc = decode.EncodedJpeg(data, *frame)
  for rows in range(1, height + 1):
    top = np.asarray(enc.decode(rows))
    assert top.shape[0] == min(height, rows + decode.ROW_MARGIN)  # it really decodes fewer rows
    np.testing.assert_array_equal(top[:rows], whole[:rows], err_msg=f"{variant}: top {rows} rows")


def test_the_frame_header_is_found_past_an_exif_thumbnail():
  """An EXIF APP1 segment carrying a JPEG thumbnail (with its own frame header) comes before the image's: the
  marker walk skips it whole, so the size is the image's, not the thumbnail's."""
  data = _jpeg(_photo(120, 90))
  thumb = _jpeg(_photo(32, 24))
  app1 = b"Exif\0\0" + thumb  # not a valid TIFF body, but a segment to step over
  data = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
  assert decode.jpeg_frame(data)[1:] == (120, 90)
  assert decode.jpeg_frame(b"\x89PNG\r\n") is None and decode.jpeg_frame(b"\xff\xd8\xff\xe0 not") is None


def _folder(root, n=6):
  os.makedirs(os.path.join(root, "a"), exist_ok=True)
  for i in range(n):
    w, h = (150, 110) if i % 2 else (110, 150)
    with open(os.path.join(root, "a", f"{i}.jpg"), "wb") as f:
      f.write(_jpeg(_photo(w, h, seed=i), subsampling=2 if i % 3 else 0))
  return sources.make_source(f"folder:{root}", "all")


@pytest.mark.parametrize("make", [lambda: transforms.TokenizerTrain(32),
                                  lambda: transforms.FinetuneTrain(32)], ids=["tokenizer", "finetune"])
def test_crop_transforms_give_the_same_examples_from_the_rows_they_decode(tmp_path, make):
  """Through ExampleFn the transform decodes only the rows down to its box; every example equals the same
  transform on the whole decoded image with the same draws, and fewer rows were decoded for most of them."""
  src, transform = _folder(str(tmp_path / "imgs")), make()
  assert transform.decodes_rows
  calls = []
  real = decode.EncodedJpeg.decode

  def spy(self, rows=None):
    calls.append((rows, self.size[1]))
    return real(self, rows)

  fn = pipeline.ExampleFn(src, transform)
  with mock.patch.object(decode.EncodedJpeg, "decode", spy):
    for seed in range(24):
      record = src[seed % len(src)]
      got = fn(record, np.random.default_rng(seed))
      want = transform(decode.decode_pil(record)[0], np.random.default_rng(seed))
      assert got["bad"] == 0 and set(want) <= set(got)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"seed {seed}: {k}")
  assert len(calls) == 24
  assert sum(rows + decode.ROW_MARGIN < h for rows, h in calls) >= 8  # the short decode ran, often


def test_a_jpeg_that_fails_to_decode_in_the_transform_is_replaced_with_the_same_draws(tmp_path):
  """A JPEG cut short (its end-of-image marker missing: it is decoded whole, and fails, however high the box),
  and one whose frame header claims 9 colour components (it opens as an EncodedJpeg and fails when the
  transform decodes it): both are counted bad and replaced by the next record, whose example is what that
  record gives with the same random draws (the failed attempt's draws are rewound)."""
  src = _folder(str(tmp_path / "imgs"))
  good = open(src.files[1], "rb").read()
  cut = good[:len(good) // 3]
  frame = decode.jpeg_frame(good)
  broken = bytearray(good)
  broken[frame[0] + 4] = 9  # the component count, after height and width
  transform = transforms.TokenizerTrain(32)
  fn = pipeline.ExampleFn(src, transform)
  want = transform(decode.decode_pil(src[2])[0], np.random.default_rng(5))
  for data in (cut, bytes(broken)):
    record = dict(src[1], image_bytes=data)
    got = fn(record, np.random.default_rng(5))
    assert got["bad"] == 1
    np.testing.assert_array_equal(got["image"], want["image"])
  assert not isinstance(decode.open_record({"image_bytes": cut}, True)[0], decode.EncodedJpeg)
  with pytest.raises(decode.UnreadableImage):
    decode.open_record({"image_bytes": bytes(broken)}, True)[0].decode(10)
