"""SLAKE 1.0: train.json / validate.json / test.json beside imgs/."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..records import DataError, Records, VQARecord
from .base import Reader, ReaderOptions, Rows, extras, read_tables
from .tables import canonical_split, file_split, is_path

SLAKE_SPLITS = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


@dataclass(frozen=True, kw_only=True)
class SlakeOptions(ReaderOptions):
    """`q_lang`: "en" (default; the English half used by published results), "zh" or "both"."""

    q_lang: Literal["en", "zh", "both"] = "en"


def _slake(table: Iterable[Any], rows: Rows, split: str | None, q_lang: str) -> list[VQARecord]:
    used = ("qid", "img_name", "question", "answer", "answer_type", "q_lang", "location", "modality",
            "content_type", "base_type", "img_id", "triple")

    def one(row: dict, index: int) -> VQARecord | None:
        lang = rows.text(row, index, "q_lang", required=q_lang != "both")
        if q_lang != "both" and lang != q_lang:
            return None
        image, name = rows.image(rows.text(row, index, "img_name"), index, "img_name")
        meta = {
            "dataset": "slake",
            "split": split,
            "organ": row.get("location"),
            "location": row.get("location"),
            "modality": row.get("modality"),
            "content_type": row.get("content_type"),
            "base_type": row.get("base_type"),
            "q_lang": lang,
            "img_id": row.get("img_id"),
            "triple": row.get("triple"),
            "image_name": name,
            **extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        return VQARecord(rows.text(row, index, "qid"), image, question, answer, answer_type, None, meta)

    return rows.each(table, one)


def read(source: Any, options: SlakeOptions) -> Records:
    """SLAKE 1.0: a folder with train.json/validate.json/test.json and imgs/ (or one of the JSON files).

    A folder with split=None reads all three splits. Images resolve against `image_root` (default: imgs/ beside the
    JSON files). The released train.json holds one English item with an empty answer (index 1622, qid 1622): skipped
    and reported by default.
    """
    split = options.split
    if is_path(source) and Path(source).is_dir():
        wanted = list(SLAKE_SPLITS) if split is None else [canonical_split(split)]
        if any(s not in SLAKE_SPLITS for s in wanted):
            raise DataError(f"{source}: SLAKE splits are train, validate, test; got {split!r}")
        return Records.concat(read(Path(source) / SLAKE_SPLITS[part], options.but(split=part)) for part in wanted)
    if is_path(source) and split is not None:  # a released file names its split: never relabel it silently
        named = file_split(Path(source))
        if named is not None and named != canonical_split(split):
            raise DataError(f"{source}: this file holds the {named!r} split (from its name), not {split!r}")
    return read_tables(source, options, suffixes=(".json",), default_root=lambda f: f.parent / "imgs",
                       parse=lambda table, rows, part, stem: _slake(table, rows, canonical_split(part or stem),
                                                                    options.q_lang))


read_slake = Reader("slake", read, SlakeOptions, "SLAKE 1.0 (train/validate/test JSON + imgs/)")
