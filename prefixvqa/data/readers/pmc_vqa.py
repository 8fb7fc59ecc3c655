"""PMC-VQA: multiple-choice CSV files (train.csv, test.csv, test_clean.csv) beside images/."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...errors import shorten
from ..records import DataError, Records, VQARecord
from .base import Reader, ReaderOptions, Rows, extras, read_tables
from .tables import is_path

PMC_CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")


def _pmc_choice(text: str, letter: str) -> str:
    """' A:CT ' -> 'CT': drop the option's own letter label and surrounding whitespace."""
    return re.sub(rf"^\s*{letter}\s*:\s*", "", text).strip()


def _pmc_vqa(table: Iterable[Any], rows: Rows, split: str | None, stem: str) -> list[VQARecord]:
    used = ("Figure_path", "Question", "Answer", "Answer_label", *PMC_CHOICE_COLUMNS)

    def one(row: dict, index: int) -> VQARecord:
        image, name = rows.image(rows.text(row, index, "Figure_path"), index, "Figure_path")
        choices = [_pmc_choice(rows.text(row, index, c), c[-1]) for c in PMC_CHOICE_COLUMNS]
        label = rows.text(row, index, "Answer_label").upper()
        if label not in ("A", "B", "C", "D"):
            raise DataError(f"{rows.where(index)}: field 'Answer_label' must be A, B, C or D, got {shorten(label)}")
        meta = {
            "dataset": "pmc_vqa",
            "split": split,
            "answer_label": label,
            "answer_raw": rows.text(row, index, "Answer", required=False),
            "image_name": name,
            **extras(row, used),
        }
        question = rows.text(row, index, "Question")
        answer = choices["ABCD".index(label)]
        return VQARecord(f"{stem}/{index}", image, question, answer, "closed", choices, meta)

    return rows.each(table, one)


def read(source: Any, options: ReaderOptions) -> Records:
    """PMC-VQA CSV (train.csv, test.csv, test_clean.csv = the 2,000-item test set); multiple choice, closed.

    answer = text of the choice named by Answer_label (the CSV's own Answer is kept in meta["answer_raw"]); choices
    have their "A:" labels stripped. A folder needs `split` (the CSV stem). Images resolve against `image_root`
    (default: images/ beside the CSV if it exists, else the CSV's folder). Ids are "<csv stem>/<row index>".
    """
    if is_path(source) and Path(source).is_dir():
        if options.split is None:
            names = sorted(p.name for p in Path(source).glob("*.csv"))
            raise DataError(f"{source}: give split= (one of the CSV stems: {names})")
        source = Path(source) / f"{options.split}.csv"

    def default_root(file: Path) -> Path:
        return file.parent / "images" if (file.parent / "images").is_dir() else file.parent

    return read_tables(source, options, suffixes=(".csv",), default_root=default_root,
                       parse=lambda table, rows, part, stem: _pmc_vqa(table, rows, part or stem, stem))


read_pmc_vqa = Reader("pmc_vqa", read, ReaderOptions, "PMC-VQA multiple-choice CSV files")
