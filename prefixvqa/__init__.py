"""prefixvqa: parameter-efficient vision-language adapters for medical VQA and report generation.

Importing the package is cheap: the model and its heavy dependencies load on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
__all__ = ["MedVQAAdapter", "MedVQAProcessor", "AdapterConfig", "Answer", "__version__"]

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .model import Answer, MedVQAAdapter
    from .data.processor import MedVQAProcessor

_LAZY = {"MedVQAAdapter": "model", "Answer": "model", "AdapterConfig": "config", "MedVQAProcessor": "data.processor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prefixvqa' has no attribute {name!r}")
