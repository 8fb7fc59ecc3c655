"""What a training run reports while it runs: `log.jsonl`, accelerate's trackers (TensorBoard, W&B) and the loss plot.

Kept apart from the loop so the loop reads as training only; every row goes through one :class:`RunLog` call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

from .config import TrainConfig

__all__ = ["RunLog", "trackers", "plot_history"]


def trackers(cfg: TrainConfig) -> list[str]:
    """accelerate trackers: TensorBoard when installed (and asked), W&B when installed and configured."""
    found = []
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
        found.append("tensorboard")
    elif cfg.tensorboard:
        warnings.warn("tensorboard is not installed: skipping TensorBoard logs (pip install tensorboard)",
                      stacklevel=3)
    if importlib.util.find_spec("wandb") is not None and (os.environ.get("WANDB_API_KEY") or
                                                          os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


class RunLog:
    """log.jsonl always, plus accelerate's trackers; only the main process writes. Call it with one row (a dict
    with a "kind": data, train, eval, stop) per event; `close` ends the trackers."""

    def __init__(self, out: Path, acc: Any, cfg: TrainConfig):
        self.enabled, self.acc, self.file = acc.is_main_process, acc, out / "log.jsonl"
        if acc.log_with:
            flat = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("tb", config=flat)

    def __call__(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.file.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        prefix = row.get("kind", "train")
        values = {f"{prefix}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if self.acc.log_with and values:
            self.acc.log(values, step=row.get("step", 0))

    def close(self) -> None:
        """End the trackers (flushes TensorBoard/W&B); log.jsonl is closed after every row already."""
        if self.acc.log_with:
            self.acc.end_training()


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Train loss per logged step and eval metric per epoch, as a PNG (matplotlib imported lazily).

    Drawn on a ``matplotlib.figure.Figure`` without pyplot, so the caller's matplotlib backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png", stacklevel=2)
        return
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    evals = [(r["step"], r["value"]) for r in history if r.get("kind") == "eval"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label=f"eval {history[-1].get('metric', '') if history else ''}".strip())
    ax.set_xlabel("optimizer step")
    ax.legend()
    from ..eval.plots import save_png  # atomic: a stop mid-write never leaves half a loss.png

    save_png(fig, path)
