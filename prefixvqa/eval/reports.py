"""The files of an evaluation result folder, and reading them back.

:func:`write_outputs` writes beside each other::

    predictions.jsonl   one row per item: id, question, gold, prediction, answer_type, how it was answered,
                        score/confidence, candidates and their probabilities when scored, meta
    metrics.json        overall metrics plus per-group breakdowns; sorted keys, floats rounded to 6 decimals and no
                        timestamps, so the same predictions give a byte-identical file
    report.md           overall table, breakdown tables (answer type, question/content type, modality, organ), plots
    *.png               see `eval.plots`
    manifest.json       dataset, split, item ids, content hash, data spec, adapter path and fingerprints, protocol,
                        prefixvqa version (:func:`build_manifest`)

Metrics come only from the rows of predictions.jsonl (`protocols.compute_metrics`), so a result folder can be
rescored without the model (:func:`rescore`) and compared with others (:func:`compare`).

The folder is written only when it is new, empty or an earlier result folder (its manifest.json is one
:func:`build_manifest` wrote): :func:`check_results_folder`. Other files in an earlier result folder are left alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..fileio import atomic_write, refuse_foreign
from ..ood import flagged_summary, report_section
from .errors import EvaluationError
from .plots import calibration_plots, result_plots
from .protocols import (BREAKDOWN_FIELDS, METRIC_LABELS, Protocol, breakdowns, compute_metrics, get_protocol,
                        item_scores)

__all__ = ["DECIMALS", "round_floats", "dump_json", "jsonable", "build_manifest", "md_table", "report_markdown",
           "write_outputs", "load_predictions", "rescore", "compare", "is_results_folder", "check_results_folder"]

DECIMALS = 6  # every float written to metrics.json / predictions.jsonl is rounded to this many decimals


# --------------------------------------------------------------------------------------------------------------------
# JSON: one rounding rule for every number written
# --------------------------------------------------------------------------------------------------------------------


def round_floats(value: Any) -> Any:
    """Round floats recursively to ``DECIMALS`` (NaN/inf become None), so written numbers never depend on float
    noise and metrics computed from rows see exactly what is written."""
    if isinstance(value, float):
        return round(value, DECIMALS) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): round_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v) for v in value]
    return value


def dump_json(value: Any) -> str:
    """The text of a result JSON file: rounded floats, sorted keys, indented; the same value, the same bytes."""
    return json.dumps(round_floats(value), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def jsonable(value: Any) -> Any:
    """A JSON form of a data spec or run setting (dataclasses, paths, dicts, lists): manifests store any of them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _unique(values: Iterable[Any]) -> Any:
    found = sorted({str(v) for v in values if v is not None})
    return found[0] if len(found) == 1 else (found or None)


def build_manifest(model: Any, records: Sequence[Any], protocol: Protocol, run: Mapping[str, Any], data_spec: Any,
                   adapter_path: str | os.PathLike | None) -> dict[str, Any]:
    """manifest.json: which data (ids, content hash, spec), which adapter (path, config hash, fingerprints), which
    protocol and run settings, which prefixvqa: enough to reproduce or audit a result."""
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
        "data_spec": jsonable(data_spec),
        "adapter": {
            "path": str(adapter_path) if adapter_path is not None else None,
            "name": getattr(config, "name", None),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest() if config_json else None,
            "saved_fingerprints": dict(getattr(config, "fingerprints", {}) or {}),
            "base_fingerprints": dict(getattr(model, "base_fingerprints", {}) or {}),
        },
        "protocol": protocol.settings(),
        "run": jsonable(run),
        "prefixvqa_version": __version__,
    }


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats to 4 decimals, None as "-" (the one table format of reports and comparisons)."""
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
        rows.append([f"`{name}`", METRIC_LABELS.get(name, name), value, ci, metrics.get(f"n_{name}", metrics.get("n"))])
    return rows


def report_markdown(protocol: Protocol, metrics: Mapping[str, Any], manifest: Mapping[str, Any],
                    plots: Sequence[str]) -> str:
    """report.md: what was evaluated, the overall table, one table per breakdown, confidence, and the plots."""
    parts = [f"# Evaluation: protocol `{protocol.name}`", "", protocol.description, "",
             f"Dataset: {manifest['dataset'] or '-'}, split: {manifest['split'] or '-'}, {manifest['num_items']} items,"
             f" content hash `{manifest['content_hash'][:16]}`. Adapter: {manifest['adapter']['path'] or '-'}.", "",
             *([f"Bad items the reader left out (on_bad_record='skip'): {metrics['skipped_records']}, listed "
                "in manifest.json.", ""] if metrics.get("skipped_records") else []),
             "Items answered by: " + ", ".join(
                 f"{k} ({v})" for k, v in sorted(metrics.get("answered_by", {}).items())) + ".", "",
             "## Overall", "",
             md_table(["metric", "meaning", "value", "95% CI", "n"], _overall_rows(metrics["overall"]))]
    if metrics["overall"].get("bleu_signature"):
        parts += ["", f"BLEU signature (sacrebleu): `{metrics['overall']['bleu_signature']}`"]
    for field, title in BREAKDOWN_FIELDS:
        table = metrics["breakdown"].get(field)
        if not table:
            continue
        names = [n for n in protocol.all_item_metrics if any(n in cell for cell in table.values())]
        parts += ["", f"## By {title}", "",
                  md_table([title, "n", *names], [[v, cell["n"], *(cell.get(n) for n in names)]
                                                  for v, cell in table.items()])]
    parts += _confidence_section(metrics.get("confidence") or {})
    parts += report_section(metrics.get("ood") or {}, md_table)
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
    parts += [md_table(["", "value"], rows), "", "Accuracy against coverage (answer only the most confident items, "
              "\"uncertain\" for the rest):", ""]
    table = [[f"{float(level):.0%}", cell["threshold"], cell["coverage"], cell["accuracy"]]
             for level, cell in conf.get("accuracy_at_coverage", {}).items()]
    parts.append(md_table(["target coverage", "confidence threshold", "coverage", "accuracy on answered"], table))
    return parts


# --------------------------------------------------------------------------------------------------------------------
# The result folder
# --------------------------------------------------------------------------------------------------------------------


def _recalibrated(predictions: Sequence[Mapping[str, Any]], calibration: Any) -> list[dict[str, Any]]:
    """Rows with ``confidence_raw``/``confidence`` recomputed from their raw scores, then rounded as written."""
    from ..calibration import row_confidence

    out = [dict(p) for p in predictions]
    for p in out:
        if row_confidence(p, None) is not None:
            p["confidence_raw"], p["confidence"] = row_confidence(p, None), row_confidence(p, calibration)
    return [round_floats(p) for p in out]


MANIFEST_MARKER = frozenset({"prefixvqa_version", "item_ids", "protocol", "content_hash"})  # keys build_manifest writes


def is_results_folder(folder: Path) -> bool:
    """Empty, or a folder `write_outputs` wrote: its manifest.json holds what `build_manifest` records (the marker)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and MANIFEST_MARKER <= manifest.keys()


def check_results_folder(out_dir: str | os.PathLike) -> Path:
    """Refuse (`fileio.OverwriteRefused`, one line naming it) an existing ``out_dir`` that is not an evaluation result
    folder prefixvqa wrote: its predictions.jsonl, metrics.json, report.md and plots would replace a user's files of
    those names. Callers check before answering, so a refusal costs nothing."""
    out = Path(out_dir)
    refuse_foreign(out, is_results_folder, "an evaluation result folder prefixvqa wrote")
    return out


def write_outputs(out_dir: str | os.PathLike, protocol: Protocol, records: Sequence[Any],
                  predictions: Sequence[dict[str, Any]], manifest: Mapping[str, Any], *, plots: bool = True,
                  calibration: Any = None) -> dict[str, Any]:
    """Score ``predictions`` and write predictions.jsonl, metrics.json, plots, report.md and manifest.json.

    Each file is written atomically (temporary sibling, then renamed), so a reader or a crash never sees half a file.
    An existing ``out_dir`` that is not a result folder prefixvqa wrote is refused (:func:`check_results_folder`).
    Every row's ``confidence`` is recomputed from its raw scores under ``calibration`` (raw without one), so the
    written confidences and the calibration figures always agree.
    """
    from ..calibration import confidence_summary, is_correct

    out = check_results_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = _recalibrated(predictions, calibration)  # metrics see exactly what is written
    rows = item_scores(protocol, records, predictions)
    overall = compute_metrics(protocol, records, predictions, rows=rows)
    for p, row in zip(predictions, rows):
        p["scores"] = round_floats(row)
    rated = [(p["confidence_raw"], p["confidence"], is_correct(row.get(protocol.primary)))
             for p, row in zip(predictions, rows) if p.get("confidence_raw") is not None]
    confidence = confidence_summary([r[0] for r in rated], [r[1] for r in rated], [r[2] for r in rated], calibration)
    if confidence:
        confidence["correct_if"] = f"per-item {protocol.primary} >= 0.5"
    from .sources import metric_sources

    metrics = round_floats({"protocol": protocol.name, **({"source": protocol.source} if protocol.source else {}),
                            "overall": overall, "sources": metric_sources(protocol),
                            "breakdown": breakdowns(protocol, records, rows),
                            "answered_by": dict(Counter(p["mode"] for p in predictions)), "confidence": confidence,
                            "skipped_records": len(manifest.get("skipped_records") or []),
                            "ood": flagged_summary(predictions, [is_correct(r.get(protocol.primary)) for r in rows])})
    atomic_write(out / "predictions.jsonl",
                 "".join(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions))
    atomic_write(out / "metrics.json", dump_json(metrics))
    atomic_write(out / "manifest.json", dump_json(manifest))
    written = result_plots(out, protocol, predictions, rows, metrics["breakdown"]) if plots else []
    if plots:
        written += calibration_plots(out, rated, calibration is not None)
    atomic_write(out / "report.md", report_markdown(protocol, metrics, manifest, written))
    return metrics


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
        raise EvaluationError(f"{file} is not a metrics JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{file} is not a metrics JSON file: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{file} is not a metrics JSON file: expected an object, got {type(data).__name__}")
    return data


def compare(paths: Sequence[str | os.PathLike], metrics: Sequence[str] | None = None) -> str:
    """Markdown table of overall metrics side by side, one column per metrics.json (or result folder).

    Rows are the union of scalar metrics (or ``metrics``); a run without a metric shows "-". Columns are named by
    the result folder, made unique with parent folders where needed.
    """
    files = [Path(p) / "metrics.json" if Path(p).is_dir() else Path(p) for p in paths]
    if not files:
        raise EvaluationError("nothing to compare")
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
    return md_table(["metric", *names], rows)
