"""One base class for every error prefixvqa raises on purpose.

Bad input, missing files and refused operations derive from `PrefixVQAError`, so a caller (and the CLI, which prints
them as one line) can tell them from bugs, which keep their traceback. Subclasses also derive from the builtin class
that fits (`ValueError`, `RuntimeError`) so code written against those keeps working.
"""

from __future__ import annotations


class PrefixVQAError(Exception):
    """Base of prefixvqa's deliberate errors: the message is one line that names the file, field or value at fault."""


class ConfigError(PrefixVQAError, ValueError):
    """A configuration value or combination is invalid; the message names the field."""
