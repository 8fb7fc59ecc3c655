"""One answer set, every protocol: answer once per distinct prompt, score under each protocol, one comparison table.

:func:`evaluate_protocols` groups the protocols by how they ask (prompt builder and answering plan: which items are
ranked among which candidates, which generated), answers each group once through `runner.evaluate` (the first
protocol's result folder), writes every other protocol's result folder from those same answers, and writes
``comparison.md`` and ``comparison.json`` beside them: per protocol, the answer set (prompt) its answers came from, its
numbers, its source code and the published tables that scored this way. :func:`rescore_protocols` does the same from a
saved predictions.jsonl without the model, and says where a protocol's prompt differs from the one the answers were
generated with.

Layout of ``out_dir``: ``<protocol>/`` (a full result folder each), ``comparison.md``, ``comparison.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..fileio import atomic_write, refuse_foreign
from .errors import EvaluationError
from .protocols import METRIC_LABELS, Protocol, compute_metrics, get_protocol, list_protocols, plan_items
from .reports import check_results_folder, dump_json, load_predictions, md_table, write_outputs

__all__ = ["ALL", "PUBLISHED_TABLES", "AnswerSet", "resolve_protocols", "answer_sets", "evaluate_protocols",
           "rescore_protocols", "records_from_predictions", "comparison_markdown", "is_comparison_folder"]

ALL = "all"  # every registered protocol that applies to the data
KIND = "prefixvqa protocol comparison"  # comparison.json's "kind": marks a folder this module wrote

#: which published tables report numbers computed the way each protocol computes them
PUBLISHED_TABLES: dict[str, str] = {
    "llava_med": "LLaVA-Med (Li et al. 2023) VQA-RAD / SLAKE / PathVQA closed accuracy and open recall, and tables "
                 "copying them",
    "prefix_vqa": "van Sonsbeek et al. (MICCAI 2023): BLEU-1, BERTScore, F1, accuracy",
    "med_flamingo": "Med-Flamingo (Moor et al. 2023): exact match, BERT-sim",
    "pmc_vqa": "PMC-VQA / MedVInT (Zhang et al. 2023): multiple-choice accuracy",
    "report": "LLaVA-Rad (Chaves et al.): report BLEU / ROUGE-L",
    **{f"medevalkit_{d}": "Lingshu, Hulu-Med, MedMO tables (MedEvalKit)" for d in ("vqa_rad", "slake", "pathvqa",
                                                                                 "pmc_vqa")},
    "lmms_eval_slake": "lmms-eval SLAKE results",
}


@dataclass
class AnswerSet:
    """Protocols that ask the same question text and answer the same way, so one set of answers serves them all."""

    index: int
    prompt: str | None
    protocols: list[Protocol] = field(default_factory=list)
    scored_items: int = 0  # items ranked among candidates (the rest generated)


def _datasets(records: Sequence[Any]) -> set[str]:
    return {str(r.meta.get("dataset")) for r in records if r.meta.get("dataset")}


def resolve_protocols(names: str | Sequence[str | Protocol], records: Sequence[Any], *, closed_mode: str | None = None,
                      upstream_metrics: bool = False, **options: Any) -> tuple[list[Protocol], dict[str, str]]:
    """(the protocols to run, {name: why it was left out}). ``"all"`` (or ["all"]) takes every registered protocol
    that applies: defined for the data's datasets (``Protocol.datasets``) and able to answer every item (e.g.
    ``pmc_vqa`` needs choices). Named protocols always run; one that cannot answer the data raises."""
    every = names == ALL or list(names) == [ALL]
    chosen = list_protocols() if every else list(names)
    protocols, skipped = [], {}
    data = _datasets(records)
    for name in chosen:
        protocol = get_protocol(name, **({"upstream_metrics": True} if upstream_metrics else {}), **options)
        if every and protocol.datasets and not (data and data <= set(protocol.datasets)):
            skipped[protocol.name] = (f"defined for {', '.join(protocol.datasets)}; the data is "
                                      f"{', '.join(sorted(data)) or 'of no named dataset'}")
            continue
        try:
            plan_items(records, protocol, closed_mode)
        except EvaluationError as exc:
            if not every:
                raise
            skipped[protocol.name] = str(exc)
            continue
        protocols.append(protocol)
    if not protocols:
        raise EvaluationError(f"no protocol applies to this data (left out: {skipped})")
    return protocols, skipped


def answer_sets(protocols: Sequence[Protocol], records: Sequence[Any], closed_mode: str | None = None
                ) -> list[AnswerSet]:
    """Group protocols by (prompt, answering plan), in order of first appearance: one answering run per group."""
    groups: dict[Any, AnswerSet] = {}
    for protocol in protocols:
        plan = plan_items(records, protocol, closed_mode)
        key = (protocol.prompt, tuple(tuple(c) if c is not None else None for c in plan))
        if key not in groups:
            groups[key] = AnswerSet(len(groups), protocol.prompt, scored_items=sum(c is not None for c in plan))
        groups[key].protocols.append(protocol)
    return list(groups.values())


def is_comparison_folder(folder: Path) -> bool:
    """Empty, or a folder :func:`evaluate_protocols` wrote (its comparison.json says so)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        return json.loads((folder / "comparison.json").read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _entry(protocol: Protocol, answer_set: AnswerSet | None, metrics: Mapping[str, Any], **extra: Any
           ) -> dict[str, Any]:
    return {"answer_set": answer_set.index if answer_set else None, "prompt": protocol.prompt,
            "source": protocol.source, "published_in": PUBLISHED_TABLES.get(protocol.name, ""),
            "metrics": dict(metrics), **extra}


def evaluate_protocols(model: Any, records: Sequence[Any], protocols: str | Sequence[str | Protocol],
                       out_dir: str | os.PathLike, *, upstream_metrics: bool = False, closed_mode: str | None = None,
                       plots: bool = True, calibration: Any = None, protocol_options: Mapping[str, Any] | None = None,
                       **evaluate_kwargs: Any) -> dict[str, Any]:
    """Answer ``records`` once per answer set (:func:`answer_sets`) and score them under every protocol (``"all"``:
    every applicable one); writes ``out_dir/<protocol>/`` result folders and ``comparison.md``/``.json``. Other
    keyword arguments go to `runner.evaluate` (batch size, generation, shots, data spec, adapter path, seed).
    ``protocol_options`` set fields of every protocol (e.g. ``bertscore_model``, as `get_protocol` takes them).
    Returns the comparison (as comparison.json), its markdown under ``"markdown"``."""
    from .runner import evaluate

    records = list(records)
    out = Path(out_dir)
    refuse_foreign(out, is_comparison_folder, "a protocol comparison folder prefixvqa wrote")
    chosen, skipped = resolve_protocols(protocols, records, closed_mode=closed_mode,
                                        upstream_metrics=upstream_metrics, **(protocol_options or {}))
    for protocol in chosen:  # every folder checked before anything is answered
        check_results_folder(out / protocol.name)
    calibration = calibration if calibration is not None else getattr(model, "calibration", None)
    entries: dict[str, Any] = {}
    sets = answer_sets(chosen, records, closed_mode)
    for answer_set in sets:
        first, *others = answer_set.protocols
        folder = out / first.name
        evaluate(model, records, first, folder, closed_mode=closed_mode, plots=plots, calibration=calibration,
                 **evaluate_kwargs)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        rows = [{k: v for k, v in r.items() if k != "scores"} for r in load_predictions(folder)]
        entries[first.name] = _entry(first, answer_set, _overall(folder), answered_here=True)
        for protocol in others:
            written = write_outputs(out / protocol.name, protocol, records, rows,
                                    {**manifest, "protocol": protocol.settings(), "answers_from": first.name},
                                    plots=plots, calibration=calibration)
            entries[protocol.name] = _entry(protocol, answer_set, written["overall"], answers_from=first.name)
    comparison = _comparison(records, sets, entries, skipped)
    _write_comparison(out, comparison)
    return {**comparison, "markdown": comparison_markdown(comparison)}


def _overall(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["overall"]


def _comparison(records: Sequence[Any], sets: Sequence[AnswerSet], entries: Mapping[str, Any],
                skipped: Mapping[str, str], answered: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from ..data.records import content_hash

    return {"kind": KIND, "num_items": len(records), "content_hash": content_hash(records),
            "datasets": sorted(_datasets(records)),
            "answer_sets": [{"index": s.index, "prompt": s.prompt, "scored_items": s.scored_items,
                             "protocols": [p.name for p in s.protocols]} for s in sets],
            "answered": dict(answered) if answered else None,
            "protocols": dict(entries), "skipped": dict(skipped)}


def _write_comparison(out: Path, comparison: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.json", dump_json(comparison))
    atomic_write(out / "comparison.md", comparison_markdown(comparison))


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """comparison.md: the answer sets (which prompt each protocol's answers came from), every protocol's numbers in
    one table, and which published tables each protocol's numbers line up with."""
    parts = ["# Protocol comparison", "",
             f"{comparison['num_items']} items ({', '.join(comparison['datasets']) or 'no named dataset'}), content "
             f"hash `{comparison['content_hash'][:16]}`.", ""]
    if comparison.get("answered"):
        ans = comparison["answered"]
        asked = (f"with prompt `{ans['prompt'] or 'record question'}` (protocol `{ans['protocol'] or '-'}`)"
                 if ans.get("known") else "with a prompt not recorded (no manifest.json beside them)")
        parts += [f"Rescored from {ans['path']}: answers generated {asked}, no model run.", ""]
    else:
        parts += ["## Answer sets (one answering run each)", "",
                  md_table(["set", "prompt (question text asked)", "items ranked among candidates", "protocols"],
                           [[s["index"], s["prompt"] or "record question", s["scored_items"],
                             ", ".join(s["protocols"])] for s in comparison["answer_sets"]]), ""]
    rows = []
    for name, entry in comparison["protocols"].items():
        for metric, value in sorted(entry["metrics"].items()):
            if isinstance(value, (int, float)) and not metric.startswith("n_") and not metric.endswith(
                    ("_ci_low", "_ci_high")) and metric != "n":
                rows.append([f"`{name}`", _set_label(entry), f"`{metric}`", METRIC_LABELS.get(metric, metric), value,
                             entry["metrics"].get(f"n_{metric}", entry["metrics"].get("n"))])
    parts += ["## Numbers", "", md_table(["protocol", "answers", "metric", "meaning", "value", "n"], rows), "",
              "## Sources and published tables", "",
              md_table(["protocol", "published numbers computed this way", "source (repository @ commit: files)"],
                       [[f"`{n}`", e["published_in"] or "-", e["source"] or "-"]
                        for n, e in comparison["protocols"].items()])]
    if comparison["skipped"]:
        parts += ["", "Left out (do not apply to this data): " + "; ".join(
            f"`{n}`: {why}" for n, why in comparison["skipped"].items()) + "."]
    return "\n".join(parts) + "\n"


def _set_label(entry: Mapping[str, Any]) -> str:
    if entry.get("answer_set") is not None:
        return f"set {entry['answer_set']}"
    matches = entry.get("prompt_matches")
    return "prompt unknown" if matches is None else "as generated" if matches else "**other prompt**"


def records_from_predictions(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The records a predictions.jsonl was answered on, rebuilt from its rows (id, question, gold, answer type,
    choices, meta; no image): what scoring needs, so rescoring needs neither the model nor the dataset."""
    from ..data.records import VQARecord

    return [VQARecord(str(r["id"]), None, r["question"], r["gold"], r.get("answer_type"), r.get("choices"),
                      dict(r.get("meta") or {})) for r in rows]


def rescore_protocols(result: str | os.PathLike, protocols: str | Sequence[str | Protocol],
                      records: Sequence[Any] | None = None, out_dir: str | os.PathLike | None = None, *,
                      upstream_metrics: bool = False, **options: Any) -> dict[str, Any]:
    """Score a saved predictions.jsonl (or result folder) under several protocols without the model; each number
    equals ``compute_metrics(protocol, records, rows)``. ``records`` default to those rebuilt from the rows. A
    protocol whose prompt is not the one the answers were generated with is marked (``prompt_matches`` False):
    its numbers are not that protocol's published ones. Writes comparison.md/.json into ``out_dir`` if given."""
    path = Path(result)
    rows = load_predictions(path)
    records = list(records) if records is not None else records_from_predictions(rows)
    manifest_file = (path if path.is_dir() else path.parent) / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    answered = {"path": str(path), "prompt": (manifest.get("run") or {}).get("prompt"),
                "protocol": (manifest.get("protocol") or {}).get("name"), "known": bool(manifest)}
    if out_dir is not None:
        refuse_foreign(Path(out_dir), is_comparison_folder, "a protocol comparison folder prefixvqa wrote")
    chosen, skipped = resolve_protocols(protocols, records, upstream_metrics=upstream_metrics, **options)
    entries = {p.name: _entry(p, None, compute_metrics(p, records, rows),
                              prompt_matches=p.prompt == answered["prompt"] if manifest else None) for p in chosen}
    comparison = _comparison(records, [], entries, skipped, answered)
    if out_dir is not None:
        _write_comparison(Path(out_dir), comparison)
    return {**comparison, "markdown": comparison_markdown(comparison)}


def check_out(out_dir: str | os.PathLike, several: bool) -> Path:
    """Refuse, before any model is loaded, an ``out_dir`` of the user's: a comparison folder for several protocols
    (:func:`is_comparison_folder`), a result folder for one (`reports.check_results_folder`)."""
    if not several:
        return check_results_folder(out_dir)
    refuse_foreign(Path(out_dir), is_comparison_folder, "a protocol comparison folder prefixvqa wrote")
    return Path(out_dir)


def rescore_cli(args: Any, records: Sequence[Any] | None) -> str:
    """`prefixvqa eval --rescore RESULT [OUT_DIR] --protocol A,B|all [--data D]`: the comparison table's markdown
    (written with comparison.json into OUT_DIR as well, when given)."""
    from ..cli_options import metric_model_overrides

    result, *out = args.rescore
    return rescore_protocols(result, args.protocols or [args.protocol], records, out[0] if out else None,
                             upstream_metrics=args.upstream_metrics, **metric_model_overrides(args))["markdown"]
