"""One record type for every dataset, and its lossless round trip through an Arrow-backed `datasets.Dataset`.

Readers turn each source layout (VQA-RAD, SLAKE, PathVQA, PMC-VQA, LLaVA, reports, generic tables) into
`VQARecord`s so that training, caching and evaluation only ever see one shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `datasets` is heavy to import; only the conversion functions need it
    import datasets

__all__ = [
    "DataError",
    "VQARecord",
    "normalize_answer_type",
    "records_to_dataset",
    "dataset_to_records",
    "content_hash",
    "RECORD_COLUMNS",
]

RECORD_COLUMNS = ("id", "image", "question", "answer", "answer_type", "choices", "meta")

_CLOSED = {"closed", "close", "yes/no", "yesno", "binary", "closed-ended", "closed_ended"}
_OPEN = {"open", "open-ended", "open_ended", "other", "number", "free", "freeform"}


class DataError(ValueError):
    """A dataset file or record is malformed; the message names the file, the item index and the field."""


@dataclass
class VQARecord:
    """One question about (usually) one image.

    `image` is an absolute file path, encoded image bytes (parquet releases) or None (text-only turns).
    `answer` is None only for unlabeled records read for prediction (readers' `require_answer=False`).
    `meta` holds everything dataset-specific (dataset, split, organ, modality, question type, turn index, history,
    extra images, report sections, the image name as written in the source under `image_name`, ...); it must stay
    JSON-serialisable because it is stored as a JSON string column.
    """

    id: str
    image: str | bytes | None
    question: str
    answer: str | None
    answer_type: str | None = None
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.answer_type = normalize_answer_type(self.answer_type)


def normalize_answer_type(value: str | None) -> str | None:
    """Map the many spellings used by releases ("CLOSED", "OPEN ", "yes/no", ...) to "closed" / "open" / None."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if not key:
        return None
    if key in _CLOSED:
        return "closed"
    if key in _OPEN:
        return "open"
    raise DataError(f"unknown answer_type {value!r} (expected closed/open)")


def _features() -> datasets.Features:
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            # struct<bytes: binary, path: string>: the layout of HF's Image feature, so `cast_column("image",
            # Image())` decodes it and hub tooling recognises it; decode=False keeps it raw and Arrow-native.
            "image": datasets.Image(decode=False),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "choices": list_type(datasets.Value("string")),
            "meta": datasets.Value("string"),
        }
    )


def _image_cell(image: str | bytes | None) -> dict | None:
    if image is None:
        return None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(image), "path": None}
    return {"bytes": None, "path": str(image)}


def records_to_dataset(records: Iterable[VQARecord]) -> datasets.Dataset:
    """Build a `datasets.Dataset` (columns: RECORD_COLUMNS; image as {bytes, path}, meta as a JSON string)."""
    import datasets

    columns: dict[str, list[Any]] = {name: [] for name in RECORD_COLUMNS}
    for record in records:
        try:
            meta = json.dumps(record.meta, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise DataError(f"record {record.id!r}: meta is not JSON-serialisable: {err}") from err
        columns["id"].append(record.id)
        columns["image"].append(_image_cell(record.image))
        columns["question"].append(record.question)
        columns["answer"].append(record.answer)
        columns["answer_type"].append(record.answer_type)
        columns["choices"].append(None if record.choices is None else list(record.choices))
        columns["meta"].append(meta)
    return datasets.Dataset.from_dict(columns, features=_features())


def _image_from_cell(cell: Any) -> str | bytes | None:
    if cell is None or isinstance(cell, (str, bytes)):
        return cell
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path")
    raise TypeError(f"unsupported image cell of type {type(cell).__name__} (cast the column to Image(decode=False))")


def dataset_to_records(ds: datasets.Dataset) -> list[VQARecord]:
    """Inverse of `records_to_dataset`; also accepts any dataset with at least id, question and answer columns."""
    import datasets

    missing = [name for name in ("id", "question", "answer") if name not in ds.column_names]
    if missing:
        raise DataError(f"dataset is missing column(s) {missing}; has {ds.column_names}")
    if isinstance(ds.features.get("image"), datasets.Image) and ds.features["image"].decode:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    records = []
    for index, row in enumerate(ds):
        try:
            meta_cell = row.get("meta")
            meta = json.loads(meta_cell) if isinstance(meta_cell, str) else dict(meta_cell or {})
            image = _image_from_cell(row.get("image"))
        except (TypeError, ValueError) as err:
            raise DataError(f"dataset row {index}: {err}") from err
        records.append(
            VQARecord(
                id=str(row["id"]),
                image=image,
                question=row["question"],
                answer=row["answer"],
                answer_type=row.get("answer_type"),
                choices=row.get("choices"),
                meta=meta,
            )
        )
    return records


def _image_key(record: VQARecord) -> str:
    """Machine-independent image reference: a digest of embedded bytes, else the source's own name, else the path."""
    if isinstance(record.image, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(record.image).hexdigest()
    name = record.meta.get("image_name")
    if name:
        return f"name:{name}"
    return "" if record.image is None else f"path:{record.image}"


def content_hash(records: Sequence[VQARecord] | Iterable[VQARecord]) -> str:
    """sha256 over (id, question, answer, image ref) of each record, in order: the fingerprint of a split manifest.

    Embedded image bytes are hashed by content; paths through meta["image_name"] (the name as written in the source)
    when present, so the same split gives the same hash on machines whose image roots differ.
    """
    digest = hashlib.sha256()
    for record in records:
        line = json.dumps([record.id, record.question, record.answer, _image_key(record)], ensure_ascii=False)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()
