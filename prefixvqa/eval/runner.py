"""Run a protocol over a test set and write a self-describing, reproducible result folder.

``evaluate`` answers every record (closed questions by candidate scoring or generation, as the protocol and
``closed_mode`` say), then writes beside each other::

    predictions.jsonl   one row per item: id, question, gold, prediction, answer_type, how it was answered,
                        score/confidence, candidates and their probabilities when scored, meta
    metrics.json        overall metrics plus per-group breakdowns; sorted keys, floats rounded to 6 decimals and no
                        timestamps, so the same predictions give a byte-identical file
    report.md           overall table, breakdown tables (answer type, question/content type, modality, organ), plots
    *.png               per_type_accuracy.png, confusion_closed.png (closed questions), confidence_hist.png,
                        reliability.png (calibration before/after temperature scaling), coverage.png (accuracy
                        against coverage when abstaining below a confidence threshold)
    manifest.json       dataset, split, item ids, content hash, data spec, adapter path and fingerprints, protocol,
                        prefixvqa version

Metrics come only from the rows of predictions.jsonl (:func:`prefixvqa.eval.protocols.compute_metrics`), so a result
folder can be rescored without the model (:func:`rescore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import functools
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..fileio import atomic_write, atomic_write_with
from .protocols import (METRIC_LABELS, TOKEN_ID_METRICS, Protocol, answer_type_of, candidates_for, compute_metrics,
                        get_protocol, item_scores)

__all__ = ["evaluate", "fit_calibration_on", "plan_items", "write_outputs", "rescore", "compare", "load_predictions",
           "BREAKDOWN_FIELDS",
           "DECIMALS"]

DECIMALS = 6  # every float written to metrics.json / predictions.jsonl is rounded to this many decimals
#: Groupings of the breakdown tables: (name, where the value lives). Only those the data has are reported.
BREAKDOWN_FIELDS: tuple[tuple[str, str], ...] = (
    ("answer_type", "answer type"), ("question_type", "question type"), ("content_type", "content type"),
    ("modality", "modality"), ("organ", "organ"), ("location", "location"),
)
PLOTS = ("per_type_accuracy.png", "confusion_closed.png", "confidence_hist.png", "reliability.png", "coverage.png")


# --------------------------------------------------------------------------------------------------------------------
# JSON helpers: one rounding rule for every number written
# --------------------------------------------------------------------------------------------------------------------


def _round(value: Any) -> Any:
    """Round floats recursively (and turn NaN/inf into None) so written numbers never depend on float noise."""
    if isinstance(value, float):
        return round(value, DECIMALS) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _dump(value: Any) -> str:
    return json.dumps(_round(value), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _jsonable(value: Any) -> Any:
    """Data specs may be dataclasses, paths or dicts; manifests store a JSON form of any of them."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# --------------------------------------------------------------------------------------------------------------------
# Answering
# --------------------------------------------------------------------------------------------------------------------


def plan_items(records: Sequence[Any], protocol: Protocol, closed_mode: str | None = None) -> list[list[str] | None]:
    """Per record, the candidates to score, or None to generate: the protocol's answering rule, made explicit."""
    mode = closed_mode or protocol.closed_mode
    if mode not in ("score", "generate"):
        raise ValueError(f"closed_mode must be 'score' or 'generate', got {mode!r}")
    if protocol.score_all and mode == "generate":
        raise ValueError(f"protocol {protocol.name!r} ranks choices by likelihood; closed_mode='generate' would turn "
                         "it into string matching")
    plan: list[list[str] | None] = []
    for record in records:
        scored = protocol.score_all or (mode == "score" and answer_type_of(record) == "closed")
        cands = candidates_for(record, protocol.candidates) if scored else None
        if protocol.score_all and not cands:
            raise ValueError(f"protocol {protocol.name!r}: record {record.id!r} has no choices to score")
        plan.append(cands)
    return plan


def _batches(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def predict(model: Any, records: Sequence[Any], plan: Sequence[list[str] | None], batch_size: int,
            generation: Mapping[str, Any], progress: bool = True, *, num_workers: int | None = None,
            cache: Any = None, cache_keys: Sequence[str | None] | None = None,
            on_error: Any = None) -> list[dict[str, Any] | None]:
    """Answer every record through the processor and the DataLoader (images decoded with each record's view in
    workers; questions about one image batched together so its prefix is computed once). Scored and generated items
    go in separate batches; rows come back in record order. A bad image raises, or with `on_error(id, name, err)`
    leaves its row None."""
    from tqdm.auto import tqdm

    from ..data.images import ImageLoadError
    from ..data.loader import BatchList, RecordDataset, make_loader, to_device

    proc = model.processor
    calibration = getattr(model, "calibration", None)
    scored = [i for i, c in enumerate(plan) if c is not None]
    generated = sorted((i for i, c in enumerate(plan) if c is None), key=lambda i: _image_key(records[i]))
    batches = [(True, b) for b in _batches(scored, batch_size)] + [(False, b) for b in _batches(generated, batch_size)]
    dataset = RecordDataset(records, proc, answers=False, cache=cache, cache_keys=cache_keys)
    loader = make_loader(dataset, BatchList([b for _, b in batches]), num_workers=num_workers, padding_side="left")
    rows: list[dict[str, Any] | None] = [None] * len(records)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(records), desc="evaluate", unit="item", disable=not progress) as bar:
            for (is_scored, batch), data in zip(batches, loader):
                for record_id, name, err in data["errors"]:
                    if on_error is None:
                        raise ImageLoadError(f"record {record_id!r}: {err}")
                    on_error(record_id, name, err)
                loaded = set(data["ids"])
                good = [i for i in batch if records[i].id in loaded]
                bar.update(len(batch))
                if not good:
                    continue
                tensors = to_device(data, model.device)
                if is_scored:
                    pairs = [[proc.tokenize_record(records[i], c) for c in plan[i]]
                             for i in good]
                    for i, loglik in zip(good, model.score(tensors, pairs)):
                        rows[i] = scored_row(plan[i], loglik, calibration)
                else:
                    for i, a in zip(good, model.generate(**tensors, **generation)):
                        rows[i] = generated_row(a)
    finally:
        model.train(was_training)
    return rows


def scored_row(candidates: Sequence[str], loglik: Sequence[float], calibration: Any = None) -> dict[str, Any]:
    """A predictions.jsonl row for an answer chosen among candidates by length-normalised log-likelihood.
    ``confidence`` is calibrated when the model has a calibration, ``confidence_raw`` never is."""
    from ..calibration import Calibration

    p = Calibration().scored(loglik)
    best = max(range(len(p)), key=lambda k: (p[k], -k))  # ties -> first candidate
    return {"mode": "score", "prediction": candidates[best], "choice_index": best, "candidates": list(candidates),
            "choice_probs": p, "confidence_raw": p[best], "confidence": (calibration or Calibration()).scored(
                loglik)[best], "score": math.log(max(p[best], 1e-45)), "num_tokens": None}


def generated_row(answer: Any) -> dict[str, Any]:
    """A predictions.jsonl row for a generated answer (its confidence already calibrated by the model)."""
    per_token = answer.score / answer.num_tokens if answer.num_tokens else 0.0
    return {"mode": "generate", "prediction": answer.guess if answer.abstained else answer.text,
            "choice_index": None, "candidates": None, "choice_probs": None, "confidence_raw": math.exp(per_token),
            "confidence": answer.confidence, "score": answer.score, "num_tokens": answer.num_tokens}


def _image_key(record: Any) -> str:
    return str(record.image) if isinstance(record.image, (str, os.PathLike)) else ""


def _predict(model: Any, records: Sequence[Any], plan: Sequence[list[str] | None], batch_size: int,
             generation: Mapping[str, Any], progress: bool, retriever: Any = None, shots: int = 0
             ) -> list[dict[str, Any]]:
    if shots:
        from ..fewshot import predict_with_shots

        rows = predict_with_shots(model, records, plan, retriever, shots, batch_size, generation, progress)
    else:
        rows = predict(model, records, plan, batch_size, generation, progress)
    return [{"id": record.id, "question": record.question, "gold": record.answer,
             "answer_type": answer_type_of(record), "choices": record.choices, "meta": record.meta, **row}
            for record, row in zip(records, rows)]


# --------------------------------------------------------------------------------------------------------------------
# Breakdowns, manifest, report, plots
# --------------------------------------------------------------------------------------------------------------------


def _group_value(record: Any, field: str) -> str | None:
    value = answer_type_of(record) if field == "answer_type" else record.meta.get(field)
    if value is None or value == "":
        return None
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _breakdowns(protocol: Protocol, records: Sequence[Any], rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """{field: {value: {metric: mean, "n": count}}} for every breakdown field the data has."""
    out: dict[str, Any] = {}
    for field, _ in BREAKDOWN_FIELDS:
        groups: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            value = _group_value(record, field)
            if value is not None:
                groups.setdefault(value, []).append(i)
        if not groups:
            continue
        table = {}
        for value, idx in sorted(groups.items()):
            cell: dict[str, float] = {"n": len(idx)}
            for name in protocol.all_item_metrics:
                vals = [rows[i][name] for i in idx if name in rows[i]]
                if vals:
                    cell[name] = sum(vals) / len(vals)
            table[value] = cell
        out[field] = table
    return out


def _unique(values: Iterable[Any]) -> Any:
    found = sorted({str(v) for v in values if v is not None})
    return found[0] if len(found) == 1 else (found or None)


def _manifest(model: Any, records: Sequence[Any], protocol: Protocol, run: Mapping[str, Any], data_spec: Any,
              adapter_path: str | os.PathLike | None) -> dict[str, Any]:
    from .._version import __version__
    from ..data.records import content_hash

    config = getattr(model, "config", None)
    config_json = config.to_json() if hasattr(config, "to_json") else None
    return {
        "dataset": _unique(r.meta.get("dataset") for r in records),
        "split": _unique(r.meta.get("split") for r in records),
        "num_items": len(records),
        "item_ids": [r.id for r in records],
        "content_hash": content_hash(records),
        "data_spec": _jsonable(data_spec),
        "adapter": {
            "path": str(adapter_path) if adapter_path is not None else None,
            "name": getattr(config, "name", None),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest() if config_json else None,
            "saved_fingerprints": dict(getattr(config, "fingerprints", {}) or {}),
            "base_fingerprints": dict(getattr(model, "base_fingerprints", {}) or {}),
        },
        "protocol": protocol.settings(),
        "run": _jsonable(run),
        "prefixvqa_version": __version__,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _overall_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, value in sorted(metrics.items()):
        if not isinstance(value, (int, float)) or name.endswith(("_ci_low", "_ci_high")) or name.startswith("n_"):
            continue
        ci = (f"[{_fmt(metrics[name + '_ci_low'])}, {_fmt(metrics[name + '_ci_high'])}]"
              if name + "_ci_low" in metrics else "")
        rows.append([f"`{name}`", _label(name), value, ci, metrics.get(f"n_{name}", metrics.get("n"))])
    return rows


def _report(protocol: Protocol, metrics: Mapping[str, Any], manifest: Mapping[str, Any], plots: Sequence[str]) -> str:
    parts = [f"# Evaluation: protocol `{protocol.name}`", "", protocol.description, "",
             f"Dataset: {manifest['dataset'] or '-'}, split: {manifest['split'] or '-'}, {manifest['num_items']} items,"
             f" content hash `{manifest['content_hash'][:16]}`. Adapter: {manifest['adapter']['path'] or '-'}.", "",
             *([f"Bad items the reader left out (on_bad_record='skip'): {metrics['skipped_records']}, listed "
                "in manifest.json.", ""] if metrics.get("skipped_records") else []),
             "Items answered by: " + ", ".join(
                 f"{k} ({v})" for k, v in sorted(metrics.get("answered_by", {}).items())) + ".", "",
             "## Overall", "",
             _md_table(["metric", "meaning", "value", "95% CI", "n"], _overall_rows(metrics["overall"]))]
    if metrics["overall"].get("bleu_signature"):
        parts += ["", f"BLEU signature (sacrebleu): `{metrics['overall']['bleu_signature']}`"]
    for field, title in BREAKDOWN_FIELDS:
        table = metrics["breakdown"].get(field)
        if not table:
            continue
        names = [n for n in protocol.all_item_metrics if any(n in cell for cell in table.values())]
        parts += ["", f"## By {title}", "",
                  _md_table([title, "n", *names], [[v, cell["n"], *(cell.get(n) for n in names)]
                                                   for v, cell in table.items()])]
    parts += _confidence_section(metrics.get("confidence") or {})
    if plots:
        parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def _confidence_section(conf: Mapping[str, Any]) -> list[str]:
    """Calibration (ECE before/after temperature scaling) and accuracy against coverage when abstaining."""
    if not conf:
        return []
    parts = ["", "## Confidence", "",
             f"Correct means {conf.get('correct_if', 'the primary per-item score >= 0.5')}; ECE: expected calibration "
             "error over 10 equal-width bins.", ""]
    rows = [["ECE, raw confidence", conf.get("ece_raw")]]
    if "ece_calibrated" in conf:
        rows += [["ECE, temperature-scaled", conf["ece_calibrated"]],
                 ["temperature (generated answers)", conf["temperature_generate"]],
                 ["temperature (scored answers)", conf["temperature_score"]]]
    else:
        rows.append(["ECE, temperature-scaled", "no calibration (fit one with --calibrate-on)"])
    if conf.get("abstain_below") is not None:
        rows += [["abstain below", conf["abstain_below"]],
                 ["coverage at that threshold", conf["coverage_at_threshold"]],
                 ["accuracy on answered items there", conf["accuracy_answered_at_threshold"]]]
    parts += [_md_table(["", "value"], rows), "", "Accuracy against coverage (answer only the most confident items, "
              "\"uncertain\" for the rest):", ""]
    table = [[f"{float(level):.0%}", cell["threshold"], cell["coverage"], cell["accuracy"]]
             for level, cell in conf.get("accuracy_at_coverage", {}).items()]
    parts.append(_md_table(["target coverage", "confidence threshold", "coverage", "accuracy on answered"], table))
    return parts


def _save_png(fig: Any, path: Path) -> None:
    """Tight layout, then a PNG written atomically, without the matplotlib version in its metadata (stable bytes)."""
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, metadata={"Software": None}))


def _plots(out: Path, protocol: Protocol, predictions: Sequence[Mapping[str, Any]],
           rows: Sequence[Mapping[str, float]], breakdown: Mapping[str, Any]) -> list[str]:
    """Write the PNGs that apply to this result; returns their file names (relative to ``out``).

    Figures are made with ``matplotlib.figure.Figure``, not pyplot: a library must not switch the caller's backend
    or keep figures alive in pyplot's registry.
    """
    from matplotlib.figure import Figure

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        _save_png(fig, out / name)
        written.append(name)

    groups = [(title, breakdown[f]) for f, title in BREAKDOWN_FIELDS[:3] if breakdown.get(f)]
    if groups:
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

    from .metrics import normalize_answer

    closed = [(normalize_answer(p["gold"]), normalize_answer(p["prediction"])) for p in predictions
              if p["answer_type"] == "closed"]
    if closed:
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

    from ..calibration import is_correct

    conf = [(p["confidence"], is_correct(row.get(protocol.primary))) for p, row in zip(predictions, rows)
            if p.get("confidence") is not None]
    if conf:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        bins = [i / 20 for i in range(21)]
        ax.hist([c for c, ok in conf if ok], bins=bins, alpha=0.6, label="correct", color="tab:green")
        ax.hist([c for c, ok in conf if not ok], bins=bins, alpha=0.6, label="wrong", color="tab:red")
        ax.set_xlabel("confidence (choice probability / mean token probability)")
        ax.set_ylabel("items")
        ax.legend(fontsize=8)
        save(fig, "confidence_hist.png")
    return written


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------


def write_outputs(out_dir: str | os.PathLike, protocol: Protocol, records: Sequence[Any],
                  predictions: Sequence[dict[str, Any]], manifest: Mapping[str, Any], *, plots: bool = True,
                  calibration: Any = None) -> dict[str, Any]:
    """Score ``predictions`` and write predictions.jsonl, metrics.json, plots, report.md and manifest.json.

    Each file is written atomically (temporary sibling, then renamed), so a reader or a crash never sees half a file.
    Every row's ``confidence`` is recomputed from its raw scores under ``calibration`` (raw without one), so the
    written confidences and the calibration figures always agree.
    """
    from ..calibration import confidence_summary, is_correct, row_confidence

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = [dict(p) for p in predictions]
    for p in predictions:
        if row_confidence(p, None) is not None:
            p["confidence_raw"], p["confidence"] = row_confidence(p, None), row_confidence(p, calibration)
    predictions = [_round(p) for p in predictions]  # metrics see exactly what is written
    rows = item_scores(protocol, records, predictions)
    overall = compute_metrics(protocol, records, predictions, rows=rows)
    for p, row in zip(predictions, rows):
        p["scores"] = _round(row)
    rated = [(p["confidence_raw"], p["confidence"], is_correct(row.get(protocol.primary)))
             for p, row in zip(predictions, rows) if p.get("confidence_raw") is not None]
    confidence = confidence_summary([r[0] for r in rated], [r[1] for r in rated], [r[2] for r in rated], calibration)
    if confidence:
        confidence["correct_if"] = f"per-item {protocol.primary} >= 0.5"
    metrics = _round({"protocol": protocol.name, "overall": overall,
                      "breakdown": _breakdowns(protocol, records, rows),
                      "answered_by": dict(Counter(p["mode"] for p in predictions)), "confidence": confidence,
                      "skipped_records": len(manifest.get("skipped_records") or [])})
    atomic_write(out / "predictions.jsonl",
                 "".join(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions))
    atomic_write(out / "metrics.json", _dump(metrics))
    atomic_write(out / "manifest.json", _dump(manifest))
    written = _plots(out, protocol, predictions, rows, metrics["breakdown"]) if plots else []
    if plots and rated:
        from ..calibration import plot_coverage, plot_reliability

        series = {"raw": ([r[0] for r in rated], [r[2] for r in rated])}
        if calibration is not None:
            series["calibrated"] = ([r[1] for r in rated], [r[2] for r in rated])
        plot_reliability(out / "reliability.png", series, _save_png)
        plot_coverage(out / "coverage.png", [r[1] for r in rated], [r[2] for r in rated], _save_png)
        written += ["reliability.png", "coverage.png"]
    atomic_write(out / "report.md", _report(protocol, metrics, manifest, written))
    return metrics


def _answer_records(model: Any, records: Sequence[Any], protocol: Protocol, *, batch_size: int,
                    closed_mode: str | None, generation: Mapping[str, Any], seed: int, progress: bool, shots: int,
                    shot_pool: Sequence[Any] | None, feature_cache: str | os.PathLike | None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predictions for ``records`` (zero-shot, or after ``shots`` shots retrieved from ``shot_pool``) and the run
    settings that produced them."""
    from ..rng import seeded

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_items(records, protocol, closed_mode)
    retriever = None
    run: dict[str, Any] = {"closed_mode": closed_mode or protocol.closed_mode, "batch_size": batch_size,
                           "generation": dict(generation), "seed": seed}
    if shots:
        from ..data.records import content_hash
        from ..fewshot import ShotRetriever

        if shot_pool is None:
            raise ValueError("shots > 0 needs a shot_pool (e.g. the training split): shots come with their answers")
        pool = list(shot_pool)
        retriever = ShotRetriever(model, pool, cache_dir=feature_cache)
        run["shots"] = {"k": shots, "retrieval": "cosine of mean-pooled encoder features, query image excluded",
                        "pool_items": len(retriever.pool), "pool_content_hash": content_hash(retriever.pool)}
    with seeded(seed):
        predictions = _predict(model, records, plan, batch_size, generation, progress, retriever, shots)
    return predictions, run


def evaluate(model: Any, records: Sequence[Any], protocol: str | Protocol, out_dir: str | os.PathLike, *,
             batch_size: int = 8, closed_mode: str | None = None, max_new_tokens: int | None = None,
             num_beams: int | None = None,
             do_sample: bool = False, generation_kwargs: Mapping[str, Any] | None = None, data_spec: Any = None,
             adapter_path: str | os.PathLike | None = None, seed: int = 0, progress: bool = True,
             plots: bool = True, shots: int = 0, shot_pool: Sequence[Any] | None = None,
             feature_cache: str | os.PathLike | None = None, calibration: Any = None) -> dict[str, float]:
    """Answer ``records`` with ``model`` under ``protocol``, write the result folder, return the overall metrics.

    ``closed_mode`` overrides the protocol's way of answering closed questions ("score": rank candidates with
    ``model.score_choices``; "generate": free generation). Generation settings are recorded in the manifest; answering
    runs under torch seed ``seed`` (so a rerun with ``do_sample`` reproduces it), and the caller's torch random state
    is restored afterwards. ``shots=k`` answers each query after k shots retrieved from ``shot_pool`` (never the query
    or its image) in the template's few-shot format. Confidences are
    calibrated with ``calibration`` (default: the adapter's own, if it has one); the report shows ECE before and
    after, a reliability diagram and accuracy against coverage.
    """
    from ..data.records import skipped_of

    protocol = get_protocol(protocol)
    skipped = skipped_of(records)  # items the reader left out as bad: reported beside the metrics
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generation = _generation(model, max_new_tokens, num_beams, do_sample, generation_kwargs)
    predictions, run = _answer_records(model, records, protocol, batch_size=batch_size, closed_mode=closed_mode,
                                       generation=generation, seed=seed, progress=progress, shots=shots,
                                       shot_pool=shot_pool, feature_cache=feature_cache)
    if any(m in protocol.all_item_metrics for m in TOKEN_ID_METRICS):  # stored, so rescoring needs no model
        encode = functools.partial(model.tokenizer.encode, add_special_tokens=False)
        for row in predictions:
            row["token_ids"] = [encode(row["prediction"]), encode(row["gold"])]
    calibration = calibration if calibration is not None else getattr(model, "calibration", None)
    manifest = {**_manifest(model, records, protocol, run, data_spec, adapter_path),
                "skipped_records": [dataclasses.asdict(item) for item in skipped]}
    return write_outputs(out_dir, protocol, records, predictions, manifest, plots=plots,
                         calibration=calibration)["overall"]


def _generation(model: Any, max_new_tokens: int | None, num_beams: int | None, do_sample: bool,
                generation_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Generation settings: the given ones, else the adapter's own decoding (its source paper's)."""
    defaults = model.config.generation
    return {"max_new_tokens": defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "num_beams": defaults.num_beams if num_beams is None else num_beams, "do_sample": do_sample,
            **(generation_kwargs or {})}


def fit_calibration_on(model: Any, records: Sequence[Any], protocol: str | Protocol, *, batch_size: int = 8,
                       closed_mode: str | None = None, max_new_tokens: int | None = None, seed: int = 0,
                       progress: bool = True, shots: int = 0, shot_pool: Sequence[Any] | None = None,
                       feature_cache: str | os.PathLike | None = None, threshold: float | None = None) -> Any:
    """Temperature scaling fitted on validation ``records``, answered exactly as `evaluate` would answer them
    (same protocol, closed mode and shots, greedy); correctness is the protocol's primary per-item score."""
    from ..calibration import fit_calibration, is_correct
    from ..data.records import content_hash

    protocol = get_protocol(protocol)
    records = list(records)
    if not records:
        raise ValueError("no validation records to calibrate on")
    generation = _generation(model, max_new_tokens, 1, False, None)
    predictions, _ = _answer_records(model, records, protocol, batch_size=batch_size, closed_mode=closed_mode,
                                     generation=generation, seed=seed, progress=progress, shots=shots,
                                     shot_pool=shot_pool, feature_cache=feature_cache)
    predictions = [_round(p) for p in predictions]
    rows = item_scores(protocol, records, predictions)
    correct = [is_correct(row.get(protocol.primary)) for row in rows]
    return fit_calibration(predictions, correct, threshold=threshold,
                           provenance={"protocol": protocol.name, "content_hash": content_hash(records),
                                       "shots": shots})


def load_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a predictions.jsonl file (or of the one inside a result folder)."""
    path = Path(path)
    path = path / "predictions.jsonl" if path.is_dir() else path
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rescore(result_dir: str | os.PathLike, protocol: str | Protocol, records: Sequence[Any]) -> dict[str, float]:
    """Overall metrics of a saved result under (possibly another) protocol, without the model."""
    return compute_metrics(get_protocol(protocol), list(records), load_predictions(result_dir))


def _metrics_file(file: Path) -> dict[str, Any]:
    """A metrics.json as a dict; anything else is refused naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a metrics JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not a metrics JSON file: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a metrics JSON file: expected an object, got {type(data).__name__}")
    return data


def compare(paths: Sequence[str | os.PathLike], metrics: Sequence[str] | None = None) -> str:
    """Markdown table of overall metrics side by side, one column per metrics.json (or result folder).

    Rows are the union of scalar metrics (or ``metrics``); a run without a metric shows "-". Columns are named by
    the result folder, made unique with parent folders where needed.
    """
    files = [Path(p) / "metrics.json" if Path(p).is_dir() else Path(p) for p in paths]
    if not files:
        raise ValueError("nothing to compare")
    raw = [_metrics_file(file) for file in files]
    loaded = [data.get("overall", data) for data in raw]
    names = [f.parent.name or str(f) for f in files]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(f.parent.parts[-depth:]) for f in files]
    if len(set(names)) < len(names):
        names = [f"{n} [{i}]" for i, n in enumerate(names)]
    keys = list(metrics) if metrics is not None else sorted(
        {k for m in loaded for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith("n_")})
    protocols = [str(data.get("protocol", "-")) for data in raw]
    rows = [["protocol", *protocols]] + [[k, *(m.get(k) for m in loaded)] for k in keys]
    return _md_table(["metric", *names], rows)
