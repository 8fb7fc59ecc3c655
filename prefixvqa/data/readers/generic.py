"""Generic tables: JSONL/JSON/CSV/TSV/parquet (or a `datasets.Dataset`) with image, question, answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..records import Records, VQARecord
from .base import Reader, ReaderOptions, Rows, image_qa_records, read_tables
from .tables import TABLE_SUFFIXES


@dataclass(frozen=True, kw_only=True)
class GenericOptions(ReaderOptions):
    """`columns` renames source columns (e.g. {"image": "img_path"}); `dataset` is the name put in meta;
    `require_answer=False` accepts rows without an answer (answer None), for prediction on unlabeled images."""

    columns: Mapping[str, str] | None = None
    dataset: str = "generic"
    require_answer: bool = True


def read(source: Any, options: GenericOptions) -> Records:
    """JSONL/JSON/CSV/TSV/parquet (or a Dataset) with image, question, answer[, answer_type, choices, id].

    Relative image paths resolve against `image_root` (default: the file's folder). Choices in CSV cells are a JSON
    list or '|'-separated. Unknown columns go to meta. Without an id column, ids are "<file stem>/<index>". A
    LLaVA-style `<image>` token in a question is removed and its place kept in `image_position`. JSON Lines content
    in a .json file is recognised and read.
    """

    def parse(table: Iterable[Any], rows: Rows, part: str | None, stem: str) -> list[VQARecord]:
        return image_qa_records(table, rows, dataset=options.dataset, split=part, stem=stem, columns=options.columns,
                                require_answer=options.require_answer)

    return read_tables(source, options, suffixes=TABLE_SUFFIXES, parse=parse)


read_generic = Reader("generic", read, GenericOptions, "image/question/answer tables (JSONL, JSON, CSV, TSV, parquet)")
