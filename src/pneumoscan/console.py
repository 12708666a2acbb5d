"""Text bound for a terminal or a log: file names, which anyone may have chosen, made safe.

A name may hold bytes that are not UTF-8 (R\\xf6ntgen.jpeg in Latin-1), which a UTF-8 stdout
refuses to encode, and control characters: a carriage return or newline that forges a row of a
result table, an escape sequence that colours, hides or erases what follows, a bidirectional
override that shows the name reversed. Each is shown escaped instead.
"""

from __future__ import annotations

import codecs
import re

# C0 and C1 controls (newline, carriage return, tab, escape ...), DEL, and the bidirectional
# marks, embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with non-UTF-8 bytes shown as \\xNN and control characters escaped (\\n,
    \\x1b, \\u202e); other text, non-ASCII included, as it is."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte stands for
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


ESCAPE_UNDECODABLE = "pneumoscan-escape-undecodable"  # an error handler name for streams


def _escape_undecodable(error: UnicodeEncodeError) -> tuple[str, int]:
    """A file name's undecodable byte (a surrogate U+DC80..U+DCFF) as \\xNN, the way printable
    shows it; any other character the stream cannot take as Python's backslashreplace does."""
    bad = error.object[error.start : error.end]
    if not all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
        return codecs.backslashreplace_errors(error)
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in bad), error.end


codecs.register_error(ESCAPE_UNDECODABLE, _escape_undecodable)
