"""PathVQA, as released on the Hugging Face hub (parquet); the original pickle release is refused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..records import Records, VQARecord
from .base import Reader, ReaderOptions, Rows, image_qa_records, read_tables


def read(source: Any, options: ReaderOptions) -> Records:
    """PathVQA, Hugging Face parquet release (image {bytes, path}, question, answer); closed = yes/no answers.

    The original pickle release is refused with instructions (never unpickled).
    """

    def parse(table: Iterable[Any], rows: Rows, part: str | None, stem: str) -> list[VQARecord]:
        return image_qa_records(table, rows, dataset="pathvqa", split=part, stem=stem, derive_answer_type=True)

    return read_tables(source, options, suffixes=(".parquet",), parse=parse)


read_pathvqa = Reader("pathvqa", read, ReaderOptions, "PathVQA (Hugging Face parquet release)")
