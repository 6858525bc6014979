"""A record's image as the RGB PIL image the transforms take; for the transforms that look only at a crop
box, a JPEG decoded only down to the box's bottom edge.

libjpeg decodes a JPEG top to bottom, one row of 8x8 (or 16x16) blocks after another, and its time grows with
the rows it decodes (0.08 ms + 1.8 us per row for a 500x375 photo here). A RandomResizedCrop box ends, on
average, 14% (landscape, scale 0.08-1) to 22% (portrait) of the rows above the image's bottom edge: those rows
need not be decoded. `EncodedJpeg.decode(rows)` decodes a copy of the file whose frame header (SOF) says the
image is `rows` + ROW_MARGIN rows high. libjpeg then decodes exactly the same pixels in those top rows as from
the whole file (tested pixel for pixel at every row count on 4:2:0, 4:2:2, 4:4:4, grey, CMYK, progressive,
restart-marker and odd-sized JPEGs), stops after them, and skips the rest of the scan data as extraneous bytes.
The margin keeps the rows that chroma upsampling reads below the last needed one inside the shortened image, so
libjpeg's bottom-edge handling never touches a needed row.
"""
from __future__ import annotations

import io
from typing import Optional, Union

import numpy as np
from PIL import Image

ROW_MARGIN = 16  # luma rows decoded below the last needed one: one 16-row iMCU (4:2:0) covers any context read

# Frame-header markers (SOF0-3, 5-7, 9-11, 13-15): their segment holds precision, height, width.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _EOI = 0xDA, 0xD9


class UnreadableImage(Exception):
  """An image file that could not be decoded (raised by `EncodedJpeg.decode`, inside a transform)."""


def jpeg_frame(data: bytes) -> Optional[tuple[int, int, int]]:
  """(offset of the frame header's height field, width, height) of a JPEG, read by walking its marker
  segments (so an EXIF thumbnail's own frame header is skipped with its APP1 segment); None for anything that
  is not a JPEG with a frame header before its first scan."""
  if data[:2] != b"\xff\xd8":
    return None
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker in _SOF_MARKERS:
      if i + 9 > n:
        return None
      return i + 5, int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
    if marker in (_SOS, _EOI):
      return None
    if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
      i += 2
      continue
    i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
  return None


class EncodedJpeg:
  """A JPEG's bytes and the size its frame header gives, not decoded yet: what `pipeline.ExampleFn` hands a
  transform that sets `decodes_rows`, so that the transform draws its crop box from the size first and then
  decodes only the rows above the box's bottom edge (`decoded(im, rows)`). A file that fails to decode raises
  UnreadableImage there, and ExampleFn replaces it as it does a file that fails to open."""

  def __init__(self, data: bytes, height_at: int, width: int, height: int):
    self.data, self.height_at, self.size = data, height_at, (width, height)

  def decode(self, rows: Optional[int] = None) -> Image.Image:
    """The RGB image, whole, or at least its top `rows` rows (the image returned is that many rows high,
    plus ROW_MARGIN where the file has them): the same pixels as the whole image's top rows."""
    data = self.data
    if rows is not None and rows + ROW_MARGIN < self.size[1]:
      shortened = bytearray(data)
      shortened[self.height_at:self.height_at + 2] = (rows + ROW_MARGIN).to_bytes(2, "big")
      data = bytes(shortened)
    try:
      return _decode_rgb(data)
    except Exception as e:
      raise UnreadableImage(f"{type(e).__name__}: {e}") from e


def decoded(im: Union[Image.Image, EncodedJpeg], rows: Optional[int] = None) -> Image.Image:
  """A transform's input as a PIL image with (at least) its top `rows` rows decoded: `im` itself when it is
  one already (ExampleFn decoded it whole, or the record held pixels)."""
  return im.decode(rows) if isinstance(im, EncodedJpeg) else im


def open_record(record: dict, rows_later: bool = False):
  """(image, ok) for a transform. With `rows_later`, a record holding a whole JPEG file comes back undecoded,
  as an EncodedJpeg; everything else is decoded whole (decode_pil).

  "Whole": the file must end with its end-of-image marker (within its last 64 bytes, for padded files), which
  entropy-coded data cannot contain. A file cut short fails a whole decode, and it is decoded whole here too,
  so that it counts as unreadable however high the crop box: decoding only the rows above the cut would
  succeed, and the same file would be good or bad depending on the box."""
  if rows_later and "image_bytes" in record:
    data = record["image_bytes"]
    frame = jpeg_frame(data)
    if frame is not None and min(frame[1:]) > 0 and b"\xff\xd9" in data[-64:]:
      return EncodedJpeg(data, *frame), True
  return decode_pil(record)


def decode_pil(record: dict):
  """Returns (RGB PIL image, ok), what the transforms take: a JPEG decodes straight into it (no numpy round
  trip). A corrupt or unreadable file, or an empty image, gives ok=False."""
  if "image" in record:
    pixels = np.asarray(record["image"])
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[..., 0]
    if pixels.size == 0:
      return Image.new("RGB", (1, 1)), False
    im = Image.fromarray(pixels)
    return (im if im.mode == "RGB" else im.convert("RGB")), True
  try:
    im = _decode_rgb(record["image_bytes"])
    return im, min(im.size) > 0
  except Exception:
    return Image.new("RGB", (1, 1)), False


def _decode_rgb(data: bytes) -> Image.Image:
  """An image file's bytes decoded whole into an RGB PIL image; raises what PIL raises."""
  im = Image.open(io.BytesIO(data))  # not `with`: closing would free the decoded pixels
  im.load()
  return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(record: dict) -> tuple[np.ndarray, bool]:
  """Returns (uint8 HWC RGB image, ok). A corrupt or unreadable file gives ok=False."""
  im, ok = decode_pil(record)
  return np.asarray(im), ok
