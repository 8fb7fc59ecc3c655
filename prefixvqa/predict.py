"""Answers for records without gold answers (new images), written as JSONL with confidences.

Each record is answered as an evaluation under the given protocol would answer it (`eval.protocols.plan_items`;
with ``closed_mode="score"`` a closed question's choices, or yes/no, are ranked by likelihood), through the same
answering loop (`inference.answer_records`), and below an optional threshold the answer is "uncertain" (the guess is
kept in ``guess``; the rule is `calibration.abstain`'s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .calibration import UNCERTAIN, abstains, abstention_threshold
from .fileio import atomic_write

if TYPE_CHECKING:
    from .data.records import VQARecord
    from .eval.protocols import ClosedMode
    from .model import MedVQAAdapter

__all__ = ["predict_records", "write_predictions", "load_unlabeled"]


def load_unlabeled(spec: Any, split: str | None = None) -> list["VQARecord"]:
    """Records of a dataset spec whose answers may be missing (formats whose reader `reads_unlabeled`: generic tables);
    other formats are read as they are (their answers are ignored)."""
    from .data.readers import READERS, load_records

    fmt = spec.get("format", "generic") if isinstance(spec, dict) else "generic"
    optional = fmt in READERS and READERS[fmt].reads_unlabeled
    return load_records(spec, split, **({"require_answer": False} if optional else {}))


def predict_records(model: "MedVQAAdapter", records: Sequence["VQARecord"], *, protocol: str = "llava_med",
                    closed_mode: "ClosedMode | None" = None, batch_size: int = 8, max_new_tokens: int | None = None,
                    abstain_below: float | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One output row per record: id, image, question, answer (or "uncertain"), guess, confidence (calibrated when
    the adapter is), raw confidence, how it was answered, candidates and their probabilities when ranked.
    ``abstain_below`` defaults to the adapter calibration's threshold (`calibration.abstention_threshold`)."""
    from .eval.protocols import get_protocol, plan_items
    from .inference import answer_records

    threshold = abstention_threshold(abstain_below, model.calibration)
    records = list(records)
    plan = plan_items(records, get_protocol(protocol), closed_mode)
    rows = answer_records(model, records, plan, batch_size, {"max_new_tokens": max_new_tokens}, progress)
    out = []
    for record, row in zip(records, rows):
        assert row is not None  # no on_error: a bad image raises
        conf = row["confidence"]
        abstained = abstains(conf, threshold)
        image = record.meta.get("image_name") or (str(record.image) if isinstance(record.image, (str, os.PathLike))
                                                  else None)
        out.append({"id": record.id, "image": image, "question": record.question,
                    "answer": UNCERTAIN if abstained else row["prediction"], "guess": row["prediction"],
                    "abstained": abstained, "confidence": conf, "confidence_raw": row["confidence_raw"],
                    "mode": row["mode"], "candidates": row["candidates"], "choice_probs": row["choice_probs"]})
    return out


def write_predictions(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """JSONL, one row per line, written atomically."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
