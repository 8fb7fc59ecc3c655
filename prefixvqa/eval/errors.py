"""Errors of evaluation, in one leaf module that every `eval` module (and the CLI) can import without a circle."""

from __future__ import annotations

from ..errors import PrefixVQAError

__all__ = ["EvaluationError", "UnknownProtocolError", "DataOverlapError"]


class EvaluationError(PrefixVQAError, ValueError):
    """Evaluation input that cannot be scored as asked: a protocol setting, a closed mode, predictions that do not
    line up with their records, a metric given mismatched or empty inputs; the message names the value at fault."""


class UnknownProtocolError(EvaluationError, KeyError):
    """A protocol name that is not registered (also a KeyError, as a registry lookup has always raised)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataOverlapError(EvaluationError):
    """Records that must come from elsewhere share ids with the evaluated data: a shot pool (its answers would leak
    into the prompts) or a calibration set (temperatures fitted on the test items flatter the reported calibration).
    A single-file dataset has no separate split, so its "train" pool is the test data itself."""
