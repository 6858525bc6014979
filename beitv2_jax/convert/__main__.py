"""python -m beitv2_jax.convert: an official / timm file or one of our workdirs -> our checkpoint or a
timm / official-layout file.

  python -m beitv2_jax.convert --src beitv2_base_patch16_224.pth --dst ckpt_dir      # -> our checkpoint
  python -m beitv2_jax.convert --src WORKDIR --dst model.safetensors --format timm   # -> timm / official
A bad file, path or option ends in one `error: ...` line (exit 1; 2 for a bad option).
"""
from __future__ import annotations

import argparse
import os
import sys

from beitv2_jax import api
from beitv2_jax.errors import one_line


# Errors a user's input causes (a bad file, path or option): one line and exit 1, as beitv2_jax.main.
USER_ERRORS = (ValueError, OSError, KeyError, TypeError, ImportError)
FILE_FORMATS = (".safetensors", ".pth", ".pt", ".bin")


class _OneLineParser(argparse.ArgumentParser):
  """argparse, but a bad option is one `error: ...` line (exit 2) instead of usage + error."""

  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")


def check_dst(dst: str, fmt: str) -> None:
  """Refuses a --dst that cannot hold --format's output before the (slow) load."""
  if fmt == "timm" and not dst.endswith(FILE_FORMATS):
    raise ValueError(f"--dst {dst}: --format timm writes a file ending in {' / '.join(FILE_FORMATS)}")
  if fmt == "ours" and (dst.endswith(FILE_FORMATS + (".npz",)) or os.path.isfile(dst)):
    raise ValueError(f"--dst {dst}: --format ours writes a directory (config.json + checkpoints/); "
                     f"use --format timm for a {' / '.join(FILE_FORMATS)} file")


def main(argv=None):
  ap = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="official/timm file, or our workdir / checkpoint dir")
  ap.add_argument("--dst", required=True, help=".safetensors / .pth (for --format timm) or a directory")
  ap.add_argument("--format", choices=("ours", "timm"), default="ours",
                  help="ours: write a checkpoint beitv2_jax.load reads; timm: the official/timm key layout")
  args = ap.parse_args(argv)
  try:
    check_dst(args.dst, args.format)
  except ValueError as e:
    _exit_with(e)
  try:
    model = api.load(args.src)
  except USER_ERRORS as e:
    _exit_with(e, args.src)
  try:
    if args.format == "timm":
      api.export_state_dict(model, args.dst)
    else:
      api.save_model(model, args.dst)
  except USER_ERRORS as e:
    _exit_with(e, args.dst)
  print(f"wrote {args.dst} ({model.kind})")


def _exit_with(e: BaseException, path: str = ""):
  """`error: Type: message` on one line (exit 1); `path` is prefixed when the message does not name it."""
  text = one_line(e)
  if path and path not in text:
    text = f"{path}: {text}"
  sys.exit(f"error: {type(e).__name__}: {text}")


if __name__ == "__main__":
  main()
