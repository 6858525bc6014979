"""User-facing error text: one line, whatever the exception's own formatting; flag parsing that says so."""
from __future__ import annotations


def one_line(e: BaseException | str) -> str:
  """An exception's (or a message's) text on one line: torch's and ml_collections' messages span
  paragraphs, and KeyError / AttributeError quote themselves (with escaped newlines and quotes)."""
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd message
    text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
  return " ".join(text.split()) or type(e).__name__


def parse_flags(argv):
  """absl flag parsing for the command lines (main, aot), but a bad config file, unknown field or mistyped
  value is one line, exit 2 (a usage error; errors of the run itself exit 1)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:  # ml_collections quotes the recipe's whole traceback
      text = f"bad --config: {text.splitlines()[-1].strip()}"
    usage_error(f"error: {one_line(text)}")
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError) as e:
    usage_error(f"error: bad --config: {type(e).__name__}: {one_line(e)}")


def usage_error(line: str):
  """Prints the line to stderr and exits with status 2."""
  import sys
  print(line, file=sys.stderr, flush=True)
  sys.exit(2)
