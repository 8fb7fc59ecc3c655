"""One record type for every dataset, and its lossless round trip through an Arrow-backed `datasets.Dataset`.

Readers turn each source layout (VQA-RAD, SLAKE, PathVQA, PMC-VQA, LLaVA, reports, generic tables) into
`VQARecord`s so that training, caching and evaluation only ever see one shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import PrefixVQAError, shorten
from ..config import IMAGE_POSITIONS

if TYPE_CHECKING:  # `datasets` is heavy to import; only the conversion functions need it
    import datasets

__all__ = [
    "DataError",
    "Records",
    "SkippedRecord",
    "Turn",
    "VQARecord",
    "normalize_answer_type",
    "records_to_dataset",
    "dataset_to_records",
    "content_hash",
    "skipped_of",
    "RECORD_COLUMNS",
]

RECORD_COLUMNS = ("id", "image", "question", "answer", "answer_type", "choices", "meta", "history",
                  "image_position")

_CLOSED = {"closed", "close", "yes/no", "yesno", "binary", "closed-ended", "closed_ended"}
_OPEN = {"open", "open-ended", "open_ended", "other", "number", "free", "freeform"}


class DataError(PrefixVQAError, ValueError):
    """A dataset file or record is malformed; the message names the file, the item index and the field."""


class Turn(NamedTuple):
    """One exchange of a conversation: the user's question and the assistant's answer."""

    question: str
    answer: str


@dataclass
class VQARecord:
    """One question about (usually) one image, or a whole conversation about it.

    `image` is an absolute file path, encoded image bytes (parquet releases) or None (text-only items).
    `answer` is None only for unlabeled records read for prediction (readers' `require_answer=False`).
    `question`/`answer` are the last exchange; `history` holds the earlier exchanges of a conversation (LLaVA-style
    multi-turn data), oldest first. Training supervises every answer of the conversation; evaluation asks the last
    question with the earlier exchanges as context. The image belongs to the first exchange (LLaVA's convention).
    `image_position` ("before_question" / "after_question") is where the source put the image in that exchange
    (LLaVA's `<image>` token); None leaves it to the template.
    `meta` holds everything dataset-specific (dataset, split, organ, modality, question type, extra images, report
    sections, the image name as written in the source under `image_name`, ...); it must stay JSON-serialisable
    because it is stored as a JSON string column.
    """

    id: str
    image: str | bytes | None
    question: str
    answer: str | None
    answer_type: str | None = None
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)
    history: list[Turn] = field(default_factory=list)
    image_position: str | None = None

    def __post_init__(self) -> None:
        self.answer_type = normalize_answer_type(self.answer_type)
        self.history = [Turn(*turn) if not isinstance(turn, dict) else Turn(turn["question"], turn["answer"])
                        for turn in self.history or ()]
        if self.image_position not in (None, *IMAGE_POSITIONS):
            raise DataError(f"record {shorten(self.id)}: image_position={shorten(self.image_position)} is not one of "
                            f"{list(IMAGE_POSITIONS)}")

    @property
    def turns(self) -> list[Turn]:
        """Every exchange, the last one being (question, answer)."""
        return [*self.history, Turn(self.question, self.answer)]


@dataclass(frozen=True)
class SkippedRecord:
    """An item a reader left out under `on_bad_record="skip"`: where it was, its id when it had one, and why."""

    where: str
    id: str | None
    reason: str


class Records(list):
    """The records of a read, plus the items that were skipped as bad (`skipped`), so a run can report them.

    A plain list in every other respect; slicing or copying gives a plain list without `skipped`.
    """

    def __init__(self, records: Iterable[VQARecord] = (), skipped: Iterable[SkippedRecord] = ()):
        super().__init__(records)
        self.skipped: list[SkippedRecord] = list(skipped)

    @classmethod
    def concat(cls, parts: Iterable[Sequence[VQARecord]]) -> "Records":
        """Join reads (several split files, hub splits) keeping every part's skipped items, so none goes unreported."""
        out = cls()
        for part in parts:
            out.extend(part)
            out.skipped.extend(getattr(part, "skipped", ()))
        return out


def skipped_of(records: Any) -> list[SkippedRecord]:
    """The skipped items of a read (empty for plain lists)."""
    return list(getattr(records, "skipped", None) or ())


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
    raise DataError(f"unknown answer_type {shorten(value)} (expected closed/open)")


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
            "history": list_type({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
            "image_position": datasets.Value("string"),
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
            raise DataError(f"record {shorten(record.id)}: meta is not JSON-serialisable: {err}") from err
        columns["id"].append(record.id)
        columns["image"].append(_image_cell(record.image))
        columns["question"].append(record.question)
        columns["answer"].append(record.answer)
        columns["answer_type"].append(record.answer_type)
        columns["choices"].append(None if record.choices is None else list(record.choices))
        columns["meta"].append(meta)
        columns["history"].append([turn._asdict() for turn in record.history])
        columns["image_position"].append(record.image_position)
    return datasets.Dataset.from_dict(columns, features=_features())


def _image_from_cell(cell: Any) -> str | bytes | None:
    if cell is None or isinstance(cell, (str, bytes)):
        return cell
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path")
    raise DataError(f"unsupported image cell of type {type(cell).__name__} (cast the column to Image(decode=False))")


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
                history=row.get("history") or [],
                image_position=row.get("image_position"),
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
    """sha256 over (id, question, answer, image ref[, history]) of each record, in order: the fingerprint of a split.

    Embedded image bytes are hashed by content; paths through meta["image_name"] (the name as written in the source)
    when present, so the same split gives the same hash on machines whose image roots differ.
    """
    digest = hashlib.sha256()
    for record in records:
        fields = [record.id, record.question, record.answer, _image_key(record)]
        if record.history:  # single-turn records keep the hash they always had
            fields.append([list(turn) for turn in record.history])
        line = json.dumps(fields, ensure_ascii=False)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()
