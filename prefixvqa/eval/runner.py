"""Run a protocol over a test set and write a self-describing, reproducible result folder.

:func:`evaluate` answers every record through the one answering loop (`inference.answer_records`; closed questions
by candidate scoring or generation, as the protocol and ``closed_mode`` say, optionally after retrieved few-shot
examples), then writes the result folder (`eval.reports`: predictions.jsonl, metrics.json, report.md, manifest.json;
`eval.plots`: the PNGs). :func:`fit_calibration_on` answers validation records exactly as `evaluate` would and fits
temperature scaling on them.

Rules that hold for every caller, the CLI included: a shot pool and a calibration set must not share records with
the evaluated data (:class:`~prefixvqa.eval.errors.DataOverlapError`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

from ..inference import answer_records
from .errors import DataOverlapError, EvaluationError
from .hooks import prompted
from .protocols import BREAKDOWN_FIELDS, Protocol, answer_type_of, get_protocol, item_scores, plan_items
from .reports import (DECIMALS, build_manifest, check_results_folder, compare, load_predictions, rescore, round_floats,
                      write_outputs)

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..data.records import VQARecord

__all__ = ["evaluate", "fit_calibration_on", "plan_items", "write_outputs", "rescore", "compare", "load_predictions",
           "refuse_overlap", "BREAKDOWN_FIELDS", "DECIMALS"]


_CALIBRATION_LEAK = ("a temperature fitted on the test items flatters the reported calibration: fit it on a "
                     "validation set of its own (--calibrate-on DATA or --calibrate-split SPLIT)")


def refuse_overlap(what: str, ids: Collection[str], evaluated: Sequence["VQARecord"], why: str) -> None:
    """Raise DataOverlapError when any of ``ids`` (of a shot pool, a calibration set) is an evaluated record's id.
    Shots and calibration must come from other records than the ones evaluated."""
    shared = set(map(str, ids)) & {str(r.id) for r in evaluated}
    if shared:
        raise DataOverlapError(f"{what} shares {len(shared)} record(s) with the evaluated data (e.g. "
                               f"{sorted(shared)[0]!r}); {why}")


def _prediction_rows(records: Sequence["VQARecord"], rows: Sequence[dict[str, Any] | None],
                     asked: Sequence["VQARecord"]) -> list[dict[str, Any]]:
    """predictions.jsonl rows: what was asked and the gold beside each answer row (``asked``: the question text
    the protocol's prompt sent, where it is not the record's)."""
    return [{"id": record.id, "question": record.question, "gold": record.answer,
             "answer_type": answer_type_of(record), "choices": record.choices, "meta": record.meta,
             **({"asked": ask.question} if ask.question != record.question else {}), **(row or {})}
            for record, row, ask in zip(records, rows, asked)]


def _answer_records(model: Any, records: Sequence[Any], protocol: Protocol, *, batch_size: int,
                    closed_mode: str | None, generation: Mapping[str, Any], seed: int, progress: bool, shots: int,
                    shot_pool: Sequence[Any] | None, feature_cache: str | os.PathLike | None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predictions for ``records`` (zero-shot, or after ``shots`` shots retrieved from ``shot_pool``) and the run
    settings that produced them."""
    from ..rng import seeded

    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_items(records, protocol, closed_mode)
    asked = prompted(records, protocol.prompt)  # the question text as the protocol asks it
    retriever = None
    run: dict[str, Any] = {"closed_mode": closed_mode or protocol.closed_mode, "batch_size": batch_size,
                           "generation": dict(generation), "seed": seed, "prompt": protocol.prompt}
    if shots:
        from ..data.records import content_hash
        from ..fewshot import ShotRetriever

        if shot_pool is None:
            raise EvaluationError("shots > 0 needs a shot_pool (e.g. the training split): shots come with their "
                                  "answers")
        retriever = ShotRetriever(model, list(shot_pool), cache_dir=feature_cache)
        run["shots"] = {"k": shots, "retrieval": "cosine of mean-pooled encoder features, query image excluded",
                        "pool_items": len(retriever.pool), "pool_content_hash": content_hash(retriever.pool)}
    with seeded(seed):
        rows = answer_records(model, asked, plan, batch_size, generation, progress, retriever=retriever,
                              shots=shots)
    return _prediction_rows(records, rows, asked), run


def _generation(model: Any, max_new_tokens: int | None, num_beams: int | None, do_sample: bool,
                generation_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Generation settings: the given ones, else the adapter's own decoding (its source paper's)."""
    defaults = model.config.generation
    return {"max_new_tokens": defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "num_beams": defaults.num_beams if num_beams is None else num_beams, "do_sample": do_sample,
            **(generation_kwargs or {})}


def _check_sources(records: Sequence["VQARecord"], shots: int, shot_pool: Sequence[Any] | None,
                   calibration: "Calibration | None") -> None:
    """The library's rules on where shots and calibration come from, checked before anything is answered."""
    if shots and shot_pool is not None:
        refuse_overlap("the shot pool", [r.id for r in shot_pool], records,
                       "its answers would leak into the prompts: draw shots from another split (--shot-pool DATA)")
    if calibration is not None and calibration.fitted_ids:
        refuse_overlap("the calibration set", calibration.fitted_ids, records, _CALIBRATION_LEAK)


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
    after, a reliability diagram and accuracy against coverage. A shot pool, or a calibration fitted in this session
    (`fit_calibration_on`), that shares records with ``records`` raises DataOverlapError before anything runs.
    """
    from ..data.records import skipped_of

    protocol = get_protocol(protocol)
    skipped = skipped_of(records)  # items the reader left out as bad: reported beside the metrics
    records = list(records)
    if not records:
        raise EvaluationError("no records to evaluate")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    calibration = calibration if calibration is not None else getattr(model, "calibration", None)
    _check_sources(records, shots, shot_pool, calibration)
    check_results_folder(out_dir)  # a folder that is not an earlier result is refused before any answering
    generation = _generation(model, max_new_tokens, num_beams, do_sample, generation_kwargs)
    predictions, run = _answer_records(model, records, protocol, batch_size=batch_size, closed_mode=closed_mode,
                                       generation=generation, seed=seed, progress=progress, shots=shots,
                                       shot_pool=shot_pool, feature_cache=feature_cache)
    manifest = {**build_manifest(model, records, protocol, run, data_spec, adapter_path),
                "skipped_records": [dataclasses.asdict(item) for item in skipped]}
    return write_outputs(out_dir, protocol, records, predictions, manifest, plots=plots,
                         calibration=calibration)["overall"]


def fit_calibration_on(model: Any, records: Sequence[Any], protocol: str | Protocol, *, batch_size: int = 8,
                       closed_mode: str | None = None, max_new_tokens: int | None = None, seed: int = 0,
                       progress: bool = True, shots: int = 0, shot_pool: Sequence[Any] | None = None,
                       feature_cache: str | os.PathLike | None = None, threshold: float | None = None,
                       evaluated: Sequence[Any] | None = None) -> Any:
    """Temperature scaling fitted on validation ``records``, answered exactly as `evaluate` would answer them
    (same protocol, closed mode and shots, greedy); correctness is the protocol's primary per-item score.

    The calibration remembers the records' ids, so `evaluate` refuses to report it on any of them; pass the records
    it will be ``evaluated`` on to have that (and a shot pool overlapping them) refused before anything is answered.
    An adapter with an image summary (`prefixvqa.ood`) gets its out-of-distribution threshold refitted on the
    records' images too (held-out in-distribution images), kept on ``model.image_summary``.
    """
    from ..calibration import fit_calibration, is_correct
    from ..data.records import content_hash
    from ..ood import refit_threshold

    protocol = get_protocol(protocol)
    records = list(records)
    if not records:
        raise EvaluationError("no validation records to calibrate on")
    if evaluated is not None:
        refuse_overlap("the calibration set", [r.id for r in records], evaluated, _CALIBRATION_LEAK)
        _check_sources(evaluated, shots, shot_pool, None)
    generation = _generation(model, max_new_tokens, 1, False, None)
    predictions, _ = _answer_records(model, records, protocol, batch_size=batch_size, closed_mode=closed_mode,
                                     generation=generation, seed=seed, progress=progress, shots=shots,
                                     shot_pool=shot_pool, feature_cache=feature_cache)
    predictions = [round_floats(p) for p in predictions]
    rows = item_scores(protocol, records, predictions)
    correct = [is_correct(row.get(protocol.primary)) for row in rows]
    refit_threshold(model, records, predictions)  # held-out in-distribution images: the model's OOD threshold
    return fit_calibration(predictions, correct, threshold=threshold,
                           provenance={"protocol": protocol.name, "content_hash": content_hash(records),
                                       "shots": shots})
