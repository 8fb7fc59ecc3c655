"""The figures of an evaluation result folder, as PNGs with stable bytes.

``per_type_accuracy.png`` (the primary metric per answer/question/content type), ``confusion_closed.png`` (closed
questions), ``confidence_hist.png`` (confidence of right and wrong answers), ``reliability.png`` (calibration before
and after temperature scaling) and ``coverage.png`` (accuracy against coverage when abstaining below a confidence
threshold). Figures are made with ``matplotlib.figure.Figure``, never pyplot: a library must not switch the caller's
backend or keep figures alive in pyplot's registry.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..calibration import is_correct, plot_coverage, plot_reliability
from ..fileio import atomic_write_with
from .metrics import normalize_answer
from .protocols import BREAKDOWN_FIELDS, Protocol

__all__ = ["PLOTS", "save_png", "result_plots", "calibration_plots"]

PLOTS = ("per_type_accuracy.png", "confusion_closed.png", "confidence_hist.png", "reliability.png", "coverage.png")
Rated = Sequence[tuple[float, float, bool]]  # per answered item: raw confidence, calibrated confidence, correct


def save_png(fig: Any, path: Path) -> None:
    """Tight layout, then a PNG written atomically, without the matplotlib version in its metadata: the same figure
    gives the same bytes on every machine, and a reader never sees half a file."""
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, metadata={"Software": None}))


def _per_type(protocol: Protocol, breakdown: Mapping[str, Any], save: Callable[[Any, str], None]) -> None:
    from matplotlib.figure import Figure

    groups = [(title, breakdown[f]) for f, title in BREAKDOWN_FIELDS[:3] if breakdown.get(f)]
    if not groups:
        return
    fig = Figure(figsize=(4 + 2 * len(groups), 3.5))
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, (title, table) in zip(axes[0], groups):
        labels = list(table)
        ax.bar(range(len(labels)), [table[k].get(protocol.primary, 0.0) for k in labels], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"by {title}", fontsize=9)
    axes[0][0].set_ylabel(protocol.primary)
    save(fig, "per_type_accuracy.png")


def _confusion(predictions: Sequence[Mapping[str, Any]], save: Callable[[Any, str], None]) -> None:
    from matplotlib.figure import Figure

    closed = [(normalize_answer(p["gold"]), normalize_answer(p["prediction"])) for p in predictions
              if p["answer_type"] == "closed"]
    if not closed:
        return
    common = [k for k, _ in Counter(g for g, _ in closed).most_common(8)]
    labels = common + (["other"] if any(g not in common or p not in common for g, p in closed) else [])
    index = {k: i for i, k in enumerate(common)}
    grid = [[0] * len(labels) for _ in labels]
    for gold, pred in closed:
        grid[index.get(gold, len(common))][index.get(pred, len(common))] += 1
    fig = Figure(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax = fig.subplots()
    ax.imshow(grid, cmap="Blues")
    for r, line in enumerate(grid):
        for c, count in enumerate(line):
            ax.text(c, r, str(count), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("gold")
    ax.set_title("closed questions", fontsize=9)
    save(fig, "confusion_closed.png")


def _confidence_hist(protocol: Protocol, predictions: Sequence[Mapping[str, Any]],
                     rows: Sequence[Mapping[str, float]], save: Callable[[Any, str], None]) -> None:
    from matplotlib.figure import Figure

    conf = [(p["confidence"], is_correct(row.get(protocol.primary))) for p, row in zip(predictions, rows)
            if p.get("confidence") is not None]
    if not conf:
        return
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    bins = [i / 20 for i in range(21)]
    ax.hist([c for c, ok in conf if ok], bins=bins, alpha=0.6, label="correct", color="tab:green")
    ax.hist([c for c, ok in conf if not ok], bins=bins, alpha=0.6, label="wrong", color="tab:red")
    ax.set_xlabel("confidence (choice probability / mean token probability)")
    ax.set_ylabel("items")
    ax.legend(fontsize=8)
    save(fig, "confidence_hist.png")


def result_plots(out: Path, protocol: Protocol, predictions: Sequence[Mapping[str, Any]],
                 rows: Sequence[Mapping[str, float]], breakdown: Mapping[str, Any]) -> list[str]:
    """Write the per-type, closed-confusion and confidence PNGs that apply to this result (each only when the data
    has what it shows); returns their file names relative to ``out``, in that order, for the report to link."""
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        save_png(fig, Path(out) / name)
        written.append(name)

    _per_type(protocol, breakdown, save)
    _confusion(predictions, save)
    _confidence_hist(protocol, predictions, rows, save)
    return written


def calibration_plots(out: Path, rated: Rated, calibrated: bool) -> list[str]:
    """The reliability diagram (raw, and calibrated when ``calibrated``) and the accuracy-coverage curve of the
    answered items; returns their file names (none without rated items)."""
    if not rated:
        return []
    series = {"raw": ([r[0] for r in rated], [r[2] for r in rated])}
    if calibrated:
        series["calibrated"] = ([r[1] for r in rated], [r[2] for r in rated])
    plot_reliability(Path(out) / "reliability.png", series, save_png)
    plot_coverage(Path(out) / "coverage.png", [r[1] for r in rated], [r[2] for r in rated], save_png)
    return ["reliability.png", "coverage.png"]
