"""Data-efficiency sweep: train a recipe on growing, seeded, stratified subsets and evaluate each run.

For every (train size, seed) the training records are subsampled with the answer-type mix of the full set
(:func:`stratified_subset`), the recipe's model is built fresh and trained (``prefixvqa.train.train``), and the result
is evaluated with :func:`prefixvqa.eval.runner.evaluate` into its own result folder. The test set is never used for
checkpoint selection: training gets no eval records and the final weights are evaluated. ``sweep.json`` (every run and
a per-size summary), ``sweep.md`` and ``learning_curve.png`` (metric vs training examples, mean with min-max spread
over seeds) are written to ``out_dir``.

It lives above both `train/` and `eval/` because it uses both (it trains, then evaluates); neither imports it. Every
run is seeded on its own (`prefixvqa.rng.seeded`): the caller's random generators are left as they were.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError
from .eval.protocols import answer_type_of, get_protocol
from .eval.plots import save_png
from .eval.reports import dump_json, md_table
from .eval.runner import evaluate
from .fileio import atomic_write, holds_only, refuse_foreign
from .rng import seeded

__all__ = ["sweep", "stratified_subset", "plot_learning_curve"]

Size = int | str  # a number of examples or "all"


def stratified_subset(records: Sequence[Any], size: Size, seed: int) -> list[Any]:
    """``size`` records whose closed/open mix follows the full set (largest-remainder allocation), drawn with
    ``numpy.random.default_rng(seed)``; returned in their original order. ``"all"`` or a size >= len -> everything.

    Why stratify: at 16 examples an unlucky draw can be all-open or all-closed, which says nothing about data size.
    """
    import numpy as np

    records = list(records)
    if size == "all" or int(size) >= len(records):
        return records
    size = int(size)
    if size < 1:
        raise ConfigError(f"train size must be >= 1 or 'all', got {size}")
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(answer_type_of(record), []).append(i)
    keys = sorted(groups)
    quotas = {k: size * len(groups[k]) / len(records) for k in keys}
    take = {k: int(quotas[k]) for k in keys}
    for k in sorted(keys, key=lambda k: (-(quotas[k] - take[k]), k))[:size - sum(take.values())]:
        take[k] += 1
    rng = np.random.default_rng(seed)
    chosen = [i for k in keys for i in rng.permutation(groups[k])[:take[k]].tolist()]
    return [records[i] for i in sorted(chosen)]


def plot_learning_curve(summary: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike) -> None:
    """Mean metric per training size against the number of examples, shaded between the seeds' min and max.

    Drawn on a ``matplotlib.figure.Figure`` without pyplot, so the caller's matplotlib backend is left alone.
    """
    from matplotlib.figure import Figure

    xs = [row["n_train"] for row in summary]
    mean = [row["mean"] for row in summary]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(xs, mean, marker="o", color="tab:blue", label="mean over seeds")
    ax.fill_between(xs, [row["min"] for row in summary], [row["max"] for row in summary], alpha=0.25,
                    color="tab:blue", label="min-max over seeds")
    ax.errorbar(xs, mean, yerr=[row["std"] for row in summary], fmt="none", ecolor="tab:blue", capsize=3)
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("training examples")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    save_png(fig, Path(path))


def _summary(runs: Sequence[dict[str, Any]], sizes: Sequence[Size], metric: str) -> list[dict[str, Any]]:
    out = []
    for size in sizes:
        values = [r["metrics"][metric] for r in runs if r["size"] == size and metric in r["metrics"]]
        if not values:
            continue
        n_train = [r["n_train"] for r in runs if r["size"] == size]
        out.append({"size": size, "n_train": n_train[0], "seeds": len(values), "values": values,
                    "mean": statistics.fmean(values), "std": statistics.pstdev(values),
                    "min": min(values), "max": max(values)})
    return out


# what a sweep writes into its folder (runs, earlier curriculum stages, a tiny model, results; hidden temporaries)
SWEEP_LAYOUT = ("size-*", "stages", "_tiny", "sweep.json", "sweep.md", "learning_curve.png", ".sweep.*",
                ".learning_curve.png.*")


def sweep(recipe_path: str | os.PathLike, train_sizes: Sequence[Size] = (16, 64, 256, "all"), seeds: int = 3,
          out_dir: str | os.PathLike = "runs/sweep", protocol: str = "llava_med", sets: Sequence[str] = (), *,
          metric: str | None = None, smoke: bool = False, batch_size: int = 8,
          eval_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns (and writes as sweep.json) ``{"protocol", "metric", "runs", "summary"}``.

    ``sets`` are recipe ``--set`` overrides; ``smoke`` applies the recipe's smoke section. Evaluation uses the
    recipe's ``data.test`` split if it has one, else ``data.eval``. ``metric`` (default: the protocol's primary
    per-item metric) is the one summarised and plotted; every run's full metrics stay in sweep.json.

    A curriculum recipe runs its earlier stages once (under ``out_dir/stages``); every run then trains the last stage
    (the downstream task) on a subset of that stage's data, starting from the earlier stages' adapter.

    An existing ``out_dir`` must be empty or an earlier sweep's folder (only the names a sweep writes: `SWEEP_LAYOUT`);
    anything else raises `fileio.OverwriteRefused` naming it before any training.
    """
    import dataclasses

    from .train import TrainConfig, load_recipe, train  # looked up per call: tests spy on prefixvqa.train.train
    from .train.recipe import build_model, load_split, prepare_stage, run_recipe

    recipe = load_recipe(recipe_path, list(sets))
    if smoke:
        recipe = recipe.with_sets(recipe.smoke)
    out = Path(out_dir)
    refuse_foreign(out, holds_only(*SWEEP_LAYOUT), "a sweep folder prefixvqa wrote")
    out.mkdir(parents=True, exist_ok=True)
    last = recipe.stages[-1] if recipe.stages else None
    head = None
    if recipe.stages and len(recipe.stages) > 1:
        head = run_recipe(dataclasses.replace(recipe, stages=recipe.stages[:-1],
                                              train={**recipe.train, "output_dir": str(out / "stages")}))
    data = {**recipe.data, **((last or {}).get("data") or {})}
    test_spec = data.get("test", data.get("eval"))
    if test_spec is None:
        raise ConfigError(f"sweep: recipe {recipe_path} has no data.test or data.eval split to evaluate on")
    prot = get_protocol(protocol)
    metric = metric or prot.primary
    train_records, test_records = load_split(data.get("train")), load_split(test_spec)

    previous = list(head.stages.values())[-1] if head is not None else None

    def fresh_run(run_dir: Path, seed: int) -> tuple[Any, TrainConfig]:
        """The model and TrainConfig of one run: the recipe's model, or the last stage after the earlier ones."""
        with seeded(seed):  # fresh init per seed (mapper, LoRA) where a stage does not load them
            model = build_model(recipe.model, out, seed=seed) if previous is None else None
            if last is None:
                cfg = TrainConfig.from_dict(recipe.train)
            else:
                template = head.template if head is not None else model.config.to_dict()["template"]
                model, cfg, _ = prepare_stage(recipe, last, model, previous, template, run_dir)
        return model, dataclasses.replace(cfg, output_dir=str(run_dir / "train"), seed=seed)

    sizes = list(dict.fromkeys(train_sizes))
    runs: list[dict[str, Any]] = []
    for size in sizes:
        for seed in range(seeds):
            run_dir = out / f"size-{size}" / f"seed-{seed}"
            subset = stratified_subset(train_records, size, seed)
            model, cfg = fresh_run(run_dir, seed)
            train(model, subset, None, cfg)
            metrics = evaluate(model, test_records, prot, run_dir / "eval", batch_size=batch_size,
                               data_spec={"test": test_spec, "recipe": str(recipe_path), "sets": list(sets)},
                               adapter_path=run_dir / "train" / "best", seed=seed, progress=False,
                               **(eval_kwargs or {}))
            runs.append({"size": size, "seed": seed, "n_train": len(subset), "metrics": metrics,
                         "train_ids": [r.id for r in subset], "result_dir": str(run_dir / "eval")})
    summary = _summary(runs, sizes, metric)
    table = {"protocol": prot.name, "metric": metric, "recipe": str(recipe_path), "sets": list(sets),
             "runs": runs, "summary": summary}
    atomic_write(out / "sweep.json", dump_json(table))
    rows = [[str(s["size"]), str(s["n_train"]), str(s["seeds"]), s["mean"], s["std"], s["min"], s["max"]]
            for s in summary]
    atomic_write(out / "sweep.md", f"# Data-efficiency sweep: `{metric}` ({prot.name})\n\nRecipe: `{recipe_path}`\n\n"
                 + md_table(["train size", "examples", "seeds", "mean", "std", "min", "max"], rows)
                 + "\n\n![learning curve](learning_curve.png)\n")
    plot_learning_curve(summary, metric, out / "learning_curve.png")
    return json.loads(dump_json(table))
