"""User-facing error text: one line, whatever the exception's own formatting."""
from __future__ import annotations


def one_line(e: BaseException | str) -> str:
  """An exception's (or a message's) text on one line: torch's and ml_collections' messages span
  paragraphs, and KeyError / AttributeError quote themselves (with escaped newlines and quotes)."""
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd message
    text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
  return " ".join(text.split()) or type(e).__name__
