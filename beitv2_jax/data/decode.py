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
libjpeg's bottom-edge handling never touches a needed row; a progressive file's margin is larger, because
libjpeg smooths the blocks of an incompletely coded progressive image with the two block rows below each one.

Only what a whole decode would read the same way is decoded by rows: a file whose markers are not the plain
JPEG segment layout, or that is larger than libjpeg (65500 px) or PIL's decompression-bomb limit allows, is
decoded whole, so that it fails (or decodes) as it would without this module.
"""
from __future__ import annotations

import io
from typing import Optional, Union

import numpy as np
from PIL import Image

ROW_MARGIN = 16  # luma rows decoded below the last needed one: one 16-row iMCU (4:2:0) covers any context read
MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: a larger frame header fails a whole decode

# Frame-header markers (SOF0-3, 5-7, 9-11, 13-15): their segment holds precision, height, width.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_SOS, _EOI = 0xDA, 0xD9
# Markers with a length field that libjpeg reads (or skips) before the first scan: DHT, DAC, DQT, DRI, DNL, EXP,
# APP0-15, COM. Anything else (FF00, reserved codes) is decoded whole, as libjpeg treats it.
_SEGMENT_MARKERS = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDF, 0xFE} | set(range(0xE0, 0xF0)))


class UnreadableImage(Exception):
  """An image file that could not be decoded (raised by `EncodedJpeg.decode`, inside a transform)."""


def jpeg_frame(data: bytes) -> Optional[tuple[int, int, int, int]]:
  """(offset of the frame header's height field, width, height, row margin) of a JPEG, read by walking its
  marker segments (so an EXIF thumbnail's own frame header is skipped with its APP1 segment); None for anything
  that is not a JPEG with a frame header after only known segments."""
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
      if i + 10 > n:
        return None
      height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
      return i + 5, width, height, _row_margin(marker, data[i + 10:i + 10 + 3 * data[i + 9]])
    if marker not in _SEGMENT_MARKERS:
      return None
    i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
  return None


def _row_margin(marker: int, components: bytes) -> int:
  """Rows decoded below the last needed one. Progressive: block smoothing reads two block rows below a block,
  16 luma rows per vertical sampling step (the margin below which incomplete progressive files change, found
  by trying every margin, is 16 v + 1; 16 more for headroom)."""
  if marker not in _PROGRESSIVE_SOF:
    return ROW_MARGIN
  vmax = max([c & 0x0F for c in components[1::3]] or [1])
  return 16 * max(vmax, 1) + 16


class EncodedJpeg:
  """A JPEG's bytes and the size its frame header gives, not decoded yet: what `pipeline.ExampleFn` hands a
  transform that sets `decodes_rows`, so that the transform draws its crop box from the size first and then
  decodes only the rows above the box's bottom edge (`decoded(im, rows)`). A file that fails to decode raises
  UnreadableImage there, and ExampleFn replaces it as it does a file that fails to open."""

  def __init__(self, data: bytes, height_at: int, width: int, height: int, margin: int = ROW_MARGIN):
    self.data, self.height_at, self.size, self.margin = data, height_at, (width, height), margin

  def decode(self, rows: Optional[int] = None) -> Image.Image:
    """The RGB image, whole, or at least its top `rows` rows (the image returned is that many rows high,
    plus the margin where the file has them): the same pixels as the whole image's top rows."""
    data = self.data
    if rows is not None and max(int(rows), 1) + self.margin < self.size[1]:
      shortened = bytearray(data)
      shortened[self.height_at:self.height_at + 2] = (max(int(rows), 1) + self.margin).to_bytes(2, "big")
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
    if frame is not None and _decodable_size(*frame[1:3]) and b"\xff\xd9" in data[-64:]:
      return EncodedJpeg(data, *frame), True
  return decode_pil(record)


def _decodable_size(width: int, height: int) -> bool:
  """A size a whole decode accepts without PIL's decompression-bomb warning or error: others are decoded whole,
  so that they warn or fail as they would."""
  limit = Image.MAX_IMAGE_PIXELS
  return 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and (not limit or width * height <= limit)


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
