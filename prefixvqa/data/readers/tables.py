"""Files to rows, shared by every reader: table files (JSON, JSON Lines, CSV/TSV, parquet), split files in a release
folder, in-memory sources (a `datasets.Dataset` or a list of row dicts), and the refusal of Python pickles.

Nothing is unpickled: a pickle is recognised by its suffix or its first bytes and refused with a conversion hint.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..records import DataError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation", "dev": "validation"}


class SourceTypeError(DataError, TypeError):
    """A reader was given a source it cannot read (neither a path, a `datasets.Dataset` nor a list of rows)."""


def refuse_pickle(path: Path | str) -> DataError:
    """The error for a Python pickle: named by file, with the safe ways to read the same data instead."""
    return DataError(
        f"{path}: refusing to read a Python pickle: unpickling runs arbitrary code, so prefixvqa never does it. "
        "Use the Hugging Face parquet release instead (e.g. load_records({'format': 'pathvqa', 'hub': "
        "'flaviagiammarino/path-vqa', 'split': 'train'}) or its downloaded parquet files), or convert the pickle "
        "once yourself, in a trusted sandbox, to parquet/JSONL with columns image, question, answer and read that "
        "file with format 'pathvqa' or 'generic'."
    )


def _is_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_table(path: Path) -> list[Any]:
    """Rows of a .json (list) / .jsonl / .csv / .tsv / .parquet file; pickles are refused before any parsing."""
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise refuse_pickle(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:
        head = fh.read(4)
    if _is_pickle(head):
        raise refuse_pickle(path)
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if name.endswith((".csv", ".tsv")):
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ","))
        if name.endswith(".jsonl"):
            return _json_lines(path, path.read_text(encoding="utf-8"))
        if name.endswith(".json"):
            return _json_list(path, path.read_text(encoding="utf-8"))
    except DataError:
        raise
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from err
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:  # pyarrow errors subclass these
        raise DataError(f"{path}: cannot read {path.suffix} file: {type(err).__name__}: {err}") from err
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(TABLE_SUFFIXES)})")


def _json_list(path: Path, text: str) -> list[Any]:
    """A .json file's list of items; JSON Lines content in a .json file is recognised and read line by line."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        if not _looks_like_json_lines(text):
            raise
        log.info("%s: JSON Lines content (one object per line) in a .json file; reading it line by line", path)
        return _json_lines(path, text, note=" (read as JSON Lines: the first line is a whole JSON object; "
                           f"as one JSON document the file fails with: {err})")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(rows).__name__}")
    return rows


def _json_lines(path: Path, text: str, note: str = "") -> list[Any]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_no}: invalid JSON: {err}{note}") from err
    return rows


def _looks_like_json_lines(text: str) -> bool:
    """True when the first non-empty line is a complete JSON object and more lines follow (JSONL named .json)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def canonical_split(split: str) -> str:
    """One name per split: "val", "valid", "validate" and "dev" all mean "validation"; case is ignored."""
    return SPLIT_ALIASES.get(split.lower(), split.lower())


def file_split(file: Path) -> str | None:
    """The split a file's name states ("trainset.json" -> train, "test.json" -> test), or None (OSF: no split)."""
    match = re.fullmatch(r"(train|test|val|valid|validation|validate|dev)(?:set|_set|-set)?", file.stem.lower())
    return canonical_split(match.group(1)) if match else None


def split_files(folder: Path, split: str | None, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of `split` in `folder` by HF naming (<split>-*, <split>.<ext>, <split>/...); all files for split None.

    Only one file type is read: the first of `suffixes` present (so a hub snapshot's README/JSON metadata beside
    its parquet files is ignored).
    """
    found = [p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)]
    kind = next((suffix for suffix in suffixes if any(p.name.lower().endswith(suffix) for p in found)), None)
    files = sorted(p for p in found if kind and p.name.lower().endswith(kind))
    if not files:
        pickles = sorted(p.name for p in folder.rglob("*") if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise refuse_pickle(folder / pickles[0])
        raise DataError(f"{folder}: no {'/'.join(suffixes)} files found")
    if split is None:
        return files
    want = canonical_split(split)

    def matches(p: Path) -> bool:
        head = re.match(r"^([^.]+?)(?:-\d.*)?\.", p.name)
        parts = [canonical_split(part) for part in p.relative_to(folder).parts[:-1]]
        return (head is not None and canonical_split(head.group(1)) == want) or want in parts

    chosen = [p for p in files if matches(p)]
    if not chosen:
        raise DataError(f"{folder}: no files for split {split!r} among {[p.name for p in files]}")
    return chosen


def table_sources(source: Any, split: str | None, suffixes: tuple[str, ...]) -> list[tuple[Path, str | None]]:
    """(file, split label) pairs for a file or a folder of split files."""
    path = Path(source)
    if path.is_dir():
        return [(f, split) for f in split_files(path, split, suffixes)]
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise refuse_pickle(path)
    return [(path, split)]


def rows_of(source: Any, label: str | None) -> tuple[Iterable[Any], str]:
    """(rows, label) for a Dataset or a list of dicts; images of a Dataset are kept encoded ({bytes, path})."""
    if isinstance(source, list):
        return source, label or "<rows>"
    import datasets

    if isinstance(source, datasets.Dataset):
        for column, feature in source.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                source = source.cast_column(column, datasets.Image(decode=False))
        return source, label or (source.info.dataset_name or "<datasets.Dataset>")
    raise SourceTypeError(f"unsupported source type {type(source).__name__}: give a path, a datasets.Dataset or rows")


def is_path(source: Any) -> bool:
    """Whether a reader's source names a file or folder (rather than holding rows in memory)."""
    return isinstance(source, (str, os.PathLike))
