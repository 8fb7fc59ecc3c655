"""Answers for records without gold answers (new images), written as JSONL with confidences.

Each record is answered as an evaluation under the given protocol would answer it (`eval.protocols.plan_items`;
with ``closed_mode="score"`` a closed question's choices, or yes/no, are ranked by likelihood), through the same
answering loop (`inference.answer_records`), and below an optional threshold the answer is "uncertain" (the guess is
kept in ``guess``; the rule is `calibration.abstain`'s).

The output file is never one of the run's inputs (same path, or the same file under another name), and an existing
one is replaced only when it is a predictions file prefixvqa wrote (`is_predictions_file`): see `check_output`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .calibration import UNCERTAIN, abstains, abstention_threshold
from .fileio import OverwriteRefused, atomic_write, refuse_foreign

if TYPE_CHECKING:
    from .data.records import VQARecord
    from .eval.protocols import ClosedMode
    from .model import MedVQAAdapter

__all__ = ["predict_records", "write_predictions", "load_unlabeled", "is_predictions_file", "input_paths",
           "check_output"]

# keys every row `predict_records` writes has: the marker that a file is prefixvqa's predictions
ROW_KEYS = frozenset({"id", "question", "answer", "guess", "abstained", "confidence", "confidence_raw", "mode"})
PREDICTIONS = "a predictions file prefixvqa wrote"


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
    the adapter is), raw confidence, how it was answered, candidates and their probabilities when ranked, and how
    unlike the training images its image is (``ood_score``, ``ood``, ``warning``: `prefixvqa.ood`).
    ``abstain_below`` defaults to the adapter calibration's threshold (`calibration.abstention_threshold`); with one
    in force, answers about flagged images are "uncertain" too."""
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
        abstained = abstains(conf, threshold, bool(row.get("ood")))
        image = record.meta.get("image_name") or (str(record.image) if isinstance(record.image, (str, os.PathLike))
                                                  else None)
        out.append({"id": record.id, "image": image, "question": record.question,
                    "answer": UNCERTAIN if abstained else row["prediction"], "guess": row["prediction"],
                    "abstained": abstained, "confidence": conf, "confidence_raw": row["confidence_raw"],
                    "mode": row["mode"], "candidates": row["candidates"], "choice_probs": row["choice_probs"],
                    "ood_score": row.get("ood_score"), "ood": bool(row.get("ood")), "warning": row.get("warning")})
    return out


def is_predictions_file(path: Path) -> bool:
    """The proof that an existing ``--out`` may be replaced: an empty file, or JSON lines each of which is a row
    `predict_records` wrote (its keys). Reading stops at the first line that is not, so a large foreign file costs
    little."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if not line.lstrip().startswith("{") or '"guess"' not in line:
                    return False
                row = json.loads(line)
                if not isinstance(row, dict) or not ROW_KEYS <= row.keys():
                    return False
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return True


def input_paths(spec: Any, records: Sequence["VQARecord"] = ()) -> list[Path]:
    """The files and folders a predict run reads: every existing path named in the dataset spec (a bare path, or a
    spec's values) and every record's image file."""
    named = [spec] if isinstance(spec, (str, os.PathLike)) else \
        [v for k, v in spec.items() if k not in ("format", "split")] if isinstance(spec, dict) else []
    images = [r.image for r in records if isinstance(r.image, (str, os.PathLike))]
    found = []
    for value in (*named, *images):
        if isinstance(value, (str, os.PathLike)) and os.fspath(value) and os.path.exists(value):
            found.append(Path(value))
    return found


def _same_input(out: Path, inputs: Iterable[str | os.PathLike]) -> Path | None:
    """The input ``out`` is (same path, a link to it, a hard link: same device and inode; or a file inside an input
    folder, which a folder reader may read), or None."""
    if not out.exists():  # an input exists; a path that does not is none of them
        return None
    target, resolved = os.stat(out), out.resolve()
    for item in inputs:
        path = Path(item)
        try:
            if path.is_dir():
                if resolved.is_relative_to(path.resolve()):
                    return path
            elif os.path.samestat(target, os.stat(path)):
                return path
        except OSError:
            continue
    return None


def check_output(path: str | Path, inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output path that is one of ``inputs`` (:class:`fileio.OverwriteRefused`, one line
    naming both), or an existing file that is not a predictions file prefixvqa wrote (unless ``overwrite``: the
    caller asked to replace it)."""
    out = Path(path)
    same = _same_input(out, inputs)
    if same is not None:
        what = "is" if same.is_file() else "lies in"
        raise OverwriteRefused(f"--out {out} {what} the input {same}: writing the predictions would replace it; give "
                               f"another --out")
    refuse_foreign(out, overwrite or is_predictions_file, PREDICTIONS, file=True)
    return out


def write_predictions(rows: Sequence[dict[str, Any]], path: str | Path, *, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False) -> Path:
    """JSONL, one row per line, written atomically. ``path`` is refused when it is one of ``inputs`` (the data and
    image files the rows came from, `input_paths`) or an existing file that is not a predictions file prefixvqa
    wrote, unless ``overwrite`` (see `check_output`); a failed write names ``path``."""
    check_output(path, inputs, overwrite=overwrite)
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
