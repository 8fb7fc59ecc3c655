"""The one answering loop: every set of records prefixvqa answers goes through :func:`answer_records`.

Evaluation (zero-shot and few-shot), the fitting of a calibration, the trainer's validation, `predict` and the demo
all call it, so a closed question is ranked, an open one generated, a bad image reported and a confidence computed
the same way everywhere. Per record, a *plan* entry says how: a list of candidates to rank by length-normalised
log-likelihood, or None to generate (`eval.protocols.plan_items` makes a protocol's plan).

Prompts come from one of two sources, chosen by ``shots``:

* zero-shot: the records through the processor and the DataLoader (images decoded with each record's view in
  workers, or read from a feature cache; questions about one image batched together so its prefix runs once);
* few-shot: each query after its ``shots`` retrieved (question, answer) shots, every image slot (shots' and the
  query's) filled from the retriever's cached encoder features.

Each answer becomes one row (:func:`scored_row` / :func:`generated_row`), the body of a predictions.jsonl row.
This module sits below `eval/`, `fewshot`, `train/`, `predict` and `demo`; it imports none of them (the retriever is
passed in), so none of them forms an import circle through it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .calibration import Calibration
from .errors import PrefixVQAError

if TYPE_CHECKING:
    from .data.records import VQARecord
    from .fewshot import ShotRetriever
    from .model import Answer, MedVQAAdapter

__all__ = ["Plan", "AnsweringError", "answer_records", "scored_row", "generated_row"]

#: Per record: the candidates to rank, or None to generate.
Plan = Sequence["list[str] | None"]
Row = dict[str, Any]


class AnsweringError(PrefixVQAError, ValueError):
    """Settings the loop cannot answer with (a batch size below one, shots without a retriever)."""


def scored_row(candidates: Sequence[str], loglik: Sequence[float], calibration: Calibration | None = None) -> Row:
    """A predictions.jsonl row for an answer chosen among candidates by length-normalised log-likelihood.
    ``confidence`` is calibrated when the model has a calibration, ``confidence_raw`` never is."""
    p = Calibration().scored(loglik)
    best = max(range(len(p)), key=lambda k: (p[k], -k))  # ties -> first candidate
    return {"mode": "score", "prediction": candidates[best], "choice_index": best, "candidates": list(candidates),
            "choice_probs": p, "confidence_raw": p[best], "confidence": (calibration or Calibration()).scored(
                loglik)[best], "score": math.log(max(p[best], 1e-45)), "num_tokens": None}


def generated_row(answer: "Answer") -> Row:
    """A predictions.jsonl row for a generated answer (its confidence already calibrated by the model). An answer
    that abstained reports its guess: rows always carry what the model said; abstaining is the caller's step."""
    per_token = answer.score / answer.num_tokens if answer.num_tokens else 0.0
    return {"mode": "generate", "prediction": answer.guess if answer.abstained else answer.text,
            "choice_index": None, "candidates": None, "choice_probs": None, "confidence_raw": math.exp(per_token),
            "confidence": answer.confidence, "score": answer.score, "num_tokens": answer.num_tokens}


@dataclass
class _Batch:
    """One batch ready for the model: the record positions it answers, how, and its prompt tensors."""

    indices: list[int]  # records answered here (those whose images loaded)
    size: int  # records this batch accounts for (progress), answered or not
    scored: bool
    tensors: dict[str, Any] = field(default_factory=dict)  # left-padded prompts on the model's device
    features: Any = None  # cached encoder features per image slot (few-shot), else None
    sample: Callable[[int, str], Any] | None = None  # (record position, candidate) -> tokenised (prompt, candidate)
    shot_ids: dict[int, list[str]] | None = None  # record position -> ids of the shots before it (few-shot)


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _image_key(record: "VQARecord") -> str:
    return str(record.image) if isinstance(record.image, (str, os.PathLike)) else ""


def _image_batches(model: "MedVQAAdapter", records: Sequence["VQARecord"], plan: Plan, batch_size: int, *,
                   num_workers: int | None, cache: Any, cache_keys: Sequence[str | None] | None,
                   on_error: Callable[[str, str, Any], None] | None) -> Iterator[_Batch]:
    """Zero-shot batches through the DataLoader: scored items first, then generated ones sorted by image (so one
    image's questions share a batch and its prefix)."""
    from .data.images import ImageLoadError
    from .data.loader import BatchList, RecordDataset, make_loader, to_device

    proc = model.processor
    scored = [i for i, c in enumerate(plan) if c is not None]
    generated = sorted((i for i, c in enumerate(plan) if c is None), key=lambda i: _image_key(records[i]))
    batches = [(True, b) for b in _chunks(scored, batch_size)] + [(False, b) for b in _chunks(generated, batch_size)]
    dataset = RecordDataset(records, proc, answers=False, cache=cache, cache_keys=cache_keys)
    loader = make_loader(dataset, BatchList([b for _, b in batches]), num_workers=num_workers, padding_side="left")
    for (is_scored, batch), data in zip(batches, loader):
        for record_id, name, err in data["errors"]:
            if on_error is None:
                raise ImageLoadError(f"record {record_id!r}: {err}")
            on_error(record_id, name, err)
        loaded = set(data["ids"])
        good = [i for i in batch if records[i].id in loaded]
        yield _Batch(good, len(batch), is_scored, to_device(data, model.device) if good else {},
                     sample=lambda i, c: proc.tokenize_record(records[i], c))


def _shot_batches(model: "MedVQAAdapter", records: Sequence["VQARecord"], plan: Plan, batch_size: int,
                  retriever: "ShotRetriever", k: int) -> Iterator[_Batch]:
    """Few-shot batches: each query's k retrieved shots rendered before it (the template's few-shot format), every
    image slot filled from the retriever's cached features. A query image that cannot be loaded raises."""
    from .data.loader import to_device

    query_keys = retriever.query_keys(records)
    shots = retriever.retrieve(records, k, query_keys)
    key_of = dict(zip((id(r) for r in retriever.pool), retriever.keys))
    proc = model.processor

    def sample(i: int, answer: str | None) -> Any:
        r = records[i]
        return proc.tokenize(r.question, answer, [(s.question, s.answer) for s in shots[i]], r.id, r.choices or (),
                             history=r.history, position=r.image_position)

    for is_scored in (True, False):
        for batch in _chunks([i for i, c in enumerate(plan) if (c is not None) == is_scored], batch_size):
            slots = [key for i in batch for key in [key_of[id(s)] for s in shots[i]] + [query_keys[i]]]
            features = retriever.features(slots).to(model.device)  # one row per image slot, in order
            tensors = to_device(proc.pad([sample(i, None) for i in batch], "left", labels=False), model.device)
            yield _Batch(batch, len(batch), is_scored, tensors, features, sample,
                         {i: [s.id for s in shots[i]] for i in batch})


def _answer_batch(model: "MedVQAAdapter", batch: _Batch, plan: Plan, generation: Mapping[str, Any],
                  rows: list[Row | None]) -> None:
    """Fill ``rows`` at the batch's positions: rank the candidates of a scored batch, generate for the others."""
    from .ood import report, row_scores

    tensors, features, ood = row_scores(model, batch.tensors, batch.features)  # per row: its image's distance
    extra = {} if features is None else {"features": features}
    if batch.scored:
        assert batch.sample is not None
        pairs = [[batch.sample(i, c) for c in plan[i]] for i in batch.indices]  # type: ignore[union-attr]
        for i, loglik in zip(batch.indices, model.score(tensors, pairs, **extra)):
            rows[i] = scored_row(plan[i], loglik, getattr(model, "calibration", None))  # type: ignore[arg-type]
    else:
        for i, answer in zip(batch.indices, model.generate(**tensors, **extra, **generation)):
            rows[i] = generated_row(answer)
    if ood is not None:
        for k, i in enumerate(batch.indices):
            rows[i].update(report(getattr(model, "image_summary", None), ood[k]))  # type: ignore[union-attr]
    for i in batch.indices if batch.shot_ids is not None else ():
        rows[i]["shot_ids"] = batch.shot_ids[i]  # type: ignore[index]


def answer_records(model: "MedVQAAdapter", records: Sequence["VQARecord"], plan: Plan, batch_size: int,
                   generation: Mapping[str, Any], progress: bool = True, *, num_workers: int | None = None,
                   cache: Any = None, cache_keys: Sequence[str | None] | None = None,
                   on_error: Callable[[str, str, Any], None] | None = None,
                   retriever: "ShotRetriever | None" = None, shots: int = 0) -> list[Row | None]:
    """Answer every record as ``plan`` says (candidates ranked, or None: generated with ``generation``), in batches
    of ``batch_size``; one row per record, in record order (:func:`scored_row` / :func:`generated_row`).

    Zero-shot (``shots=0``) reads images through the DataLoader (``num_workers``; ``cache``/``cache_keys``: encoder
    features cached per record). A bad image raises, or with ``on_error(id, name, err)`` leaves its row None (what
    the trainer's validation wants). ``shots=k`` answers each query after k shots from ``retriever``
    (`fewshot.ShotRetriever`) and adds ``shot_ids`` to its row. The model runs in eval mode and gets its training
    mode back afterwards; random state is the caller's to seed.
    """
    from tqdm.auto import tqdm

    from .generation import evaluating

    if batch_size < 1:
        raise AnsweringError(f"batch_size must be >= 1, got {batch_size}")
    if shots and retriever is None:
        raise AnsweringError("shots > 0 needs a retriever (fewshot.ShotRetriever over a shot pool)")
    rows: list[Row | None] = [None] * len(records)
    with evaluating(model):
        if shots:
            batches = _shot_batches(model, records, plan, batch_size, retriever, shots)  # type: ignore[arg-type]
        else:
            batches = _image_batches(model, records, plan, batch_size, num_workers=num_workers, cache=cache,
                                     cache_keys=cache_keys, on_error=on_error)
        desc = f"evaluate ({shots}-shot)" if shots else "evaluate"
        with tqdm(total=len(records), desc=desc, unit="item", disable=not progress) as bar:
            for batch in batches:
                if batch.indices:
                    _answer_batch(model, batch, plan, generation, rows)
                bar.update(batch.size)
    return rows
