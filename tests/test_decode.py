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
  assert frame[1:3] == (whole.shape[1], height)
  enc = decode.EncodedJpeg(data, *frame)
  for rows in range(1, height + 1):
    top = np.asarray(enc.decode(rows))
    assert top.shape[0] == min(height, rows + enc.margin)  # it really decodes fewer rows
    np.testing.assert_array_equal(top[:rows], whole[:rows], err_msg=f"{variant}: top {rows} rows")


def _scans_cut(data: bytes, keep: int) -> bytes:
  """A progressive JPEG with only its first `keep` scans, then the end-of-image marker: it decodes (blurrier),
  and libjpeg's block smoothing of the incomplete coefficients reads block rows below each block."""
  at = -1
  for _ in range(keep + 1):
    at = data.index(b"\xff\xda", at + 1)
  tables = data.rfind(b"\xff\xc4", 0, at)  # the next scan's Huffman tables come just before it
  return data[:tables if tables > data.index(b"\xff\xda", 0) else at] + b"\xff\xd9"


@pytest.mark.parametrize("subsampling", [2, 0], ids=["4:2:0", "4:4:4"])
@pytest.mark.parametrize("keep", [1, 2, 4])
def test_an_incompletely_coded_progressive_jpeg_decodes_to_the_same_top_rows(subsampling, keep):
  """Progressive files cut after a few scans (a partial download, ending in EOI) decode whole without an error;
  their top rows must not change when fewer rows are decoded (the progressive margin: ROW_MARGIN gave 2-3
  levels of difference on 4:2:0 files)."""
  data = _scans_cut(_jpeg(_photo(120, 90), progressive=True, subsampling=subsampling), keep)
  whole, ok = decode.decode_pil({"image_bytes": data})
  assert ok
  whole = np.asarray(whole)
  enc, _ = decode.open_record({"image_bytes": data}, True)
  assert isinstance(enc, decode.EncodedJpeg) and enc.margin > decode.ROW_MARGIN
  for rows in range(1, whole.shape[0] + 1):
    np.testing.assert_array_equal(np.asarray(enc.decode(rows))[:rows], whole[:rows], err_msg=f"top {rows} rows")


def test_files_a_whole_decode_reads_differently_are_decoded_whole():
  """What the marker walk could misread, or what a whole decode refuses, never takes the rows-only path: a
  fake frame header behind an FF00 byte pair (libjpeg skips FF00 and decodes the real 120x90 image), a frame
  header taller than libjpeg's 65500 rows, a decompression bomb. Each comes back as the whole decode does."""
  data = _jpeg(_photo(120, 90))
  fake = b"\xff\xc0\x00\x11\x08\x10\x00\x10\x00\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"  # 4096 x 4096
  comment = b"\xff\xfe" + (len(fake) + 10).to_bytes(2, "big") + b"xxxx" + fake + b"yyyy"
  behind_ff00 = data[:2] + b"\xff\x00\x00\x0a" + comment + data[2:]
  at = decode.jpeg_frame(data)[0]
  too_tall = data[:at] + b"\xff\xff" + data[at + 2:]
  bomb = data[:at] + (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big") + data[at + 4:]
  for name, bad in (("FF00", behind_ff00), ("65535 rows", too_tall), ("bomb", bomb)):
    im, ok = decode.open_record({"image_bytes": bad}, True)
    assert not isinstance(im, decode.EncodedJpeg), name
    want_im, want_ok = decode.decode_pil({"image_bytes": bad})
    assert ok == want_ok and im.size == want_im.size, name
  assert decode.open_record({"image_bytes": behind_ff00}, True)[0].size == (120, 90)


def test_a_row_count_below_one_decodes_the_first_rows():
  enc, _ = decode.open_record({"image_bytes": _jpeg(_photo(120, 90))}, True)
  whole = np.asarray(enc.decode())
  for rows in (0, -16, -17, -1000):
    top = np.asarray(enc.decode(rows))
    assert top.shape[0] == 1 + enc.margin
    np.testing.assert_array_equal(top, whole[:top.shape[0]])


def test_the_frame_header_is_found_past_an_exif_thumbnail():
  """An EXIF APP1 segment carrying a JPEG thumbnail (with its own frame header) comes before the image's: the
  marker walk skips it whole, so the size is the image's, not the thumbnail's."""
  data = _jpeg(_photo(120, 90))
  thumb = _jpeg(_photo(32, 24))
  app1 = b"Exif\0\0" + thumb  # not a valid TIFF body, but a segment to step over
  data = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
  assert decode.jpeg_frame(data)[1:3] == (120, 90)
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
