"""Training: the accelerate-based loop (`train`, `TrainConfig`) and YAML recipes with curricula (`run_recipe`)."""

from __future__ import annotations

from .config import DEFAULT_LR, TrainConfig
from .trainer import TrainResult, epoch_batches, train

__all__ = ["DEFAULT_LR", "TrainConfig", "TrainResult", "epoch_batches", "train", "load_recipe", "run_recipe",
           "Recipe"]


def __getattr__(name: str):
    if name in ("load_recipe", "run_recipe", "Recipe"):  # recipes pull in yaml and the data readers: load lazily
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'prefixvqa.train' has no attribute {name!r}")
