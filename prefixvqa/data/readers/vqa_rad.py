"""VQA-RAD in its three layouts: the OSF release, the MEVF/MUMC `data_RAD/` split files and the HF parquet release."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..records import DataError, Records, VQARecord
from .base import Reader, ReaderOptions, Rows, extras, image_qa_records, read_tables
from .tables import canonical_split, file_split, is_path

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}  # the MEVF/MUMC `data_RAD/` layout


@dataclass(frozen=True, kw_only=True)
class VqaRadOptions(ReaderOptions):
    """`frame_questions=True` keeps the 1,267 template "frame" rephrasings of the MEVF trainset (left out by default,
    so every layout gives the published 1,797 + 451 questions)."""

    frame_questions: bool = False


def _vqa_rad_split(phrase_type: str) -> str:
    """The OSF file has no split column: phrase types test_freeform/test_para form the 451-question test set."""
    return "test" if phrase_type.lower().startswith("test") else "train"


def _vqa_rad_json(table: Iterable[Any], rows: Rows, split: str | None, named_split: str | None,
                  frame_questions: bool) -> list[VQARecord]:
    used = ("qid", "image_name", "question", "answer", "answer_type", "question_type", "image_organ", "phrase_type")
    want = None if split is None else canonical_split(split)
    if named_split is not None and want not in (None, named_split):
        raise DataError(f"{rows.label}: this file holds the {named_split!r} split (from its name), not {split!r}")
    if named_split is None and want not in (None, "train", "test"):
        raise DataError(f"{rows.label}: VQA-RAD (OSF) has splits 'train' and 'test' (from phrase_type), not {split!r}")

    def one(row: dict, index: int) -> VQARecord | None:
        phrase_type = rows.text(row, index, "phrase_type", required=want is not None and named_split is None) or ""
        if phrase_type.lower() == "frame" and not frame_questions:
            return None
        item_split = named_split or (_vqa_rad_split(phrase_type) if phrase_type else None)
        if want is not None and item_split != want:
            return None
        qid = rows.text(row, index, "qid")
        image, name = rows.image(rows.text(row, index, "image_name"), index, "image_name")
        meta = {
            "dataset": "vqa_rad",
            "split": item_split,
            "organ": rows.text(row, index, "image_organ", required=False),
            "question_type": rows.text(row, index, "question_type", required=False),
            "phrase_type": phrase_type or None,
            "image_name": name,
            **extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        return VQARecord(qid, image, question, answer, answer_type, None, meta)

    return rows.each(table, one)


def _is_json_source(source: Any) -> bool:
    """OSF/MEVF JSON (image_name column) rather than the HF parquet layout."""
    if is_path(source):
        return Path(source).name.lower().endswith(".json")
    return "image_name" in (source.column_names if hasattr(source, "column_names") else (source or [{}])[0])


def read(source: Any, options: VqaRadOptions) -> Records:
    """VQA-RAD in any of its three layouts:

    * the OSF release, `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`. The file has no split field:
      split="test" keeps phrase_type test_freeform/test_para (the 451-question test set used by MEVF, PubMedCLIP,
      LLaVA-Med), split="train" the rest (1,797 freeform/para); None keeps all, meta["split"] set per item;
    * the MEVF/MUMC layout, `data_RAD/trainset.json` + `testset.json` + `data_RAD/images/`: the split is the file's
      (from its name; asking a file for another split is an error). Its trainset also holds 1,267 template
      "frame" rephrasings (phrase_type frame) that MEVF-based code trains on; they are left out unless
      frame_questions=True, so both layouts give the published 1,797 + 451 questions;
    * the HF parquet release: image {bytes, path}, question, answer in train/test files; closed = yes/no answers
      (derived, as the release has no answer type).

    A folder is recognised by the files it holds. A split that gives no records is an error.
    """
    split = options.split
    if is_path(source) and Path(source).is_dir():
        folder = Path(source)
        if (folder / VQA_RAD_JSON).is_file():
            source = folder / VQA_RAD_JSON
        elif any((folder / name).is_file() for name in VQA_RAD_SPLIT_FILES.values()):
            want = list(VQA_RAD_SPLIT_FILES) if split is None else [canonical_split(split)]
            if any(w not in VQA_RAD_SPLIT_FILES for w in want):
                raise DataError(f"{folder}: the data_RAD layout has splits train (trainset.json) and test "
                                f"(testset.json), not {split!r}")
            return Records.concat(read(folder / VQA_RAD_SPLIT_FILES[w], options.but(split=w)) for w in want)
    if not _is_json_source(source):
        def parse(table: Iterable[Any], rows: Rows, part: str | None, stem: str) -> list[VQARecord]:
            return image_qa_records(table, rows, dataset="vqa_rad", split=part, stem=stem, derive_answer_type=True)

        return read_tables(source, options, suffixes=(".parquet",), parse=parse)
    named = file_split(Path(source)) if is_path(source) else None

    def default_root(file: Path) -> Path:
        return file.parent / ("images" if named else VQA_RAD_IMAGES)

    return read_tables(source, options, suffixes=(".json",), default_root=default_root,
                       parse=lambda table, rows, part, stem: _vqa_rad_json(table, rows, split, named,
                                                                           options.frame_questions))


read_vqa_rad = Reader("vqa_rad", read, VqaRadOptions, "VQA-RAD (OSF JSON, MEVF data_RAD, or HF parquet)")
