"""One base class for every error prefixvqa raises on purpose.

Bad input, missing files and refused operations derive from `PrefixVQAError`, so a caller (and the CLI, which prints
them as one line) can tell them from bugs, which keep their traceback. Subclasses also derive from the builtin class
that fits (`ValueError`, `RuntimeError`) so code written against those keeps working. Messages embed the values
they name through `shorten`, so a huge value still gives one short line.
"""

from __future__ import annotations

import reprlib
from typing import Any


class PrefixVQAError(Exception):
    """Base of prefixvqa's deliberate errors: the message is one line that names the file, field or value at fault."""


class ConfigError(PrefixVQAError, ValueError):
    """A configuration value or combination is invalid; the message names the field."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 100, 60, 40
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = 6


def shorten(value: Any, limit: int = 160) -> str:
    """``repr(value)`` bounded to about ``limit`` characters: how an error message embeds a value the user gave.

    A message must stay one short line even when the value is huge (a 50 MB string, a YAML alias bomb that expands
    to millions of items): nested containers show their first few items and levels only (``reprlib``), and are never
    walked in full, so formatting the message costs no memory either."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
