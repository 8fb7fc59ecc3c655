"""Readers from each public dataset layout to `list[VQARecord]`, and `load_records(spec)` dispatching on `format`.

Every reader takes a `source`: a file or folder path in the layout of the official release, a `datasets.Dataset`
(e.g. from the hub) or a list of row dicts with the same fields. Formats are chosen explicitly (spec["format"]);
within a format only the release's own file types are told apart (VQA-RAD: .json = OSF release, .parquet = HF).
Malformed input raises `DataError` naming the file, the item index (0-based) and the field. Nothing is unpickled.

Folder layouts and split files (see each reader):
  * split files in a folder follow the Hugging Face naming: ``<split>-00000-of-00001.parquet``, ``<split>.csv`` or
    files under a ``<split>/`` sub-folder ("val"/"valid"/"validation"/"validate" are aliases);
  * images are resolved against `image_root` (default: the release's image folder) into absolute paths; with
    `check_images=True` (default) missing files are reported by name at read time, otherwise at load time.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import DataError, VQARecord, normalize_answer_type, records_to_dataset

if TYPE_CHECKING:
    import datasets

__all__ = [
    "READERS",
    "load_records",
    "load_vqa_dataset",
    "read_vqa_rad",
    "read_slake",
    "read_pathvqa",
    "read_pmc_vqa",
    "read_llava",
    "read_reports",
    "read_generic",
    "DEFAULT_REPORT_INSTRUCTION",
    "strip_image_tokens",
]

DEFAULT_REPORT_INSTRUCTION = "Describe the findings of the chest X-ray."
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation", "dev": "validation"}
_MISSING = object()


# --------------------------------------------------------------------------------------------------- file handling
def _refuse_pickle(path: Path | str) -> DataError:
    return DataError(
        f"{path}: refusing to read a Python pickle: unpickling runs arbitrary code, so prefixvqa never does it. "
        "Use the Hugging Face parquet release instead (e.g. load_records({'format': 'pathvqa', 'hub': "
        "'flaviagiammarino/path-vqa', 'split': 'train'}) or its downloaded parquet files), or convert the pickle "
        "once yourself, in a trusted sandbox, to parquet/JSONL with columns image, question, answer and read that "
        "file with format 'pathvqa' or 'generic'."
    )


def _is_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _read_table(path: Path) -> list[Any]:
    """Rows of a .json (list) / .jsonl / .csv / .tsv / .parquet file; pickles are refused before any parsing."""
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise _refuse_pickle(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:
        head = fh.read(4)
    if _is_pickle(head):
        raise _refuse_pickle(path)
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if name.endswith((".csv", ".tsv")):
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if name.endswith(".tsv") else ","))
        if name.endswith(".jsonl"):
            rows = []
            with path.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path} line {line_no}: invalid JSON: {err}") from err
            return rows
        if name.endswith(".json"):
            with path.open(encoding="utf-8") as fh:
                rows = json.load(fh)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of items, got {type(rows).__name__}")
            return rows
    except DataError:
        raise
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from err
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:  # pyarrow errors subclass these
        raise DataError(f"{path}: cannot read {path.suffix} file: {type(err).__name__}: {err}") from err
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(TABLE_SUFFIXES)})")


def _canonical_split(split: str) -> str:
    return _SPLIT_ALIASES.get(split.lower(), split.lower())


def _split_files(folder: Path, split: str | None, suffixes: tuple[str, ...]) -> list[Path]:
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
            raise _refuse_pickle(folder / pickles[0])
        raise DataError(f"{folder}: no {'/'.join(suffixes)} files found")
    if split is None:
        return files
    want = _canonical_split(split)

    def matches(p: Path) -> bool:
        head = re.match(r"^([^.]+?)(?:-\d.*)?\.", p.name)
        parts = [_canonical_split(part) for part in p.relative_to(folder).parts[:-1]]
        return (head is not None and _canonical_split(head.group(1)) == want) or want in parts

    chosen = [p for p in files if matches(p)]
    if not chosen:
        raise DataError(f"{folder}: no files for split {split!r} among {[p.name for p in files]}")
    return chosen


def _rows_of(source: Any, label: str | None) -> tuple[Iterable[Any], str]:
    """(rows, label) for a Dataset or a list of dicts; images of a Dataset are kept encoded ({bytes, path})."""
    if isinstance(source, list):
        return source, label or "<rows>"
    import datasets

    if isinstance(source, datasets.Dataset):
        for column, feature in source.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                source = source.cast_column(column, datasets.Image(decode=False))
        return source, label or (source.info.dataset_name or "<datasets.Dataset>")
    raise TypeError(f"unsupported source type {type(source).__name__}: give a path, a datasets.Dataset or rows")


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


# --------------------------------------------------------------------------------------------------- row parsing
class _Rows:
    """Field access for the rows of one file, producing errors that name the file, item index and field."""

    def __init__(self, label: str, image_root: str | os.PathLike | None, check_images: bool) -> None:
        self.label = label
        self.image_root = None if image_root is None else Path(image_root)
        self.check_images = check_images
        self.missing: list[tuple[int, str]] = []

    def where(self, index: int) -> str:
        return f"{self.label} item {index}"

    def row(self, row: Any, index: int) -> dict:
        if not isinstance(row, dict):
            raise DataError(f"{self.where(index)}: expected an object with named fields, got {type(row).__name__}")
        return row

    def text(self, row: dict, index: int, key: str, required: bool = True) -> str | None:
        """A string field; JSON numbers (e.g. VQA-RAD numeric answers) become strings; surrounding space trimmed."""
        value = row.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise DataError(f"{self.where(index)}: missing field '{key}'")
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{self.where(index)}: field '{key}' must be a string, got {type(value).__name__}")
        value = value.strip()
        if required and not value:
            raise DataError(f"{self.where(index)}: field '{key}' is empty")
        return value

    def answer_type(self, value: Any, index: int, key: str = "answer_type") -> str | None:
        try:
            return normalize_answer_type(value)
        except DataError as err:
            raise DataError(f"{self.where(index)}: field '{key}': {err}") from err

    def image(self, value: Any, index: int, key: str) -> tuple[str | bytes | None, str | None]:
        """(record image, name as written in the source) from a path string, bytes or an HF {bytes, path} cell."""
        if value is None or value == "":
            return None, None
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"]), value.get("path") or None
            value = value.get("path")
            if not value:
                raise DataError(f"{self.where(index)}: field '{key}' has neither bytes nor path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), None
        if not isinstance(value, (str, os.PathLike)):
            raise DataError(f"{self.where(index)}: field '{key}' must be a path or image bytes, got "
                            f"{type(value).__name__}")
        name = str(value).strip()
        path = os.path.abspath(self.image_root / name if self.image_root is not None else name)
        if self.check_images and not os.path.isfile(path):
            self.missing.append((index, path))
        return path, name

    def images(self, value: Any, index: int, key: str) -> tuple[str | bytes | None, dict]:
        """One image or a list of them (multi-image items): the first is the record image, all go to meta."""
        if isinstance(value, list):
            refs = [self.image(item, index, key) for item in value]
            meta: dict = {"images": [r for r, _ in refs], "image_name": refs[0][1] if refs else None}
            if any(isinstance(r, bytes) for r, _ in refs):
                raise DataError(f"{self.where(index)}: field '{key}': multi-image items must use paths")
            return (refs[0][0] if refs else None), meta
        ref, name = self.image(value, index, key)
        return ref, ({"image_name": name} if name else {})

    def finish(self, records: list[VQARecord]) -> list[VQARecord]:
        if self.missing:
            shown = "; ".join(f"item {i}: {p}" for i, p in self.missing[:10])
            more = f" (and {len(self.missing) - 10} more)" if len(self.missing) > 10 else ""
            raise DataError(
                f"{self.label}: {len(self.missing)} image file(s) not found: {shown}{more}. Check image_root, or "
                "pass check_images=False to report missing files only when they are loaded."
            )
        return records


def _extras(row: dict, used: Iterable[str]) -> dict:
    """Fields a reader does not interpret, kept in meta when JSON-serialisable."""
    skip = set(used)
    out = {}
    for key, value in row.items():
        if key is None or key in skip or isinstance(value, (bytes, bytearray)):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value
    return out


def _derived_answer_type(answer: str) -> str:
    """Releases without an answer type (PathVQA, HF VQA-RAD): yes/no answers are closed, the rest open."""
    return "closed" if answer.strip().lower() in ("yes", "no") else "open"


def _parse_choices(value: Any, rows: _Rows, index: int) -> list[str] | None:
    """A list, a JSON list string, or a '|'-separated string (CSV cells)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{rows.where(index)}: field 'choices': invalid JSON list: {err}") from err
        else:
            value = text.split("|")
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) for c in value):
        raise DataError(f"{rows.where(index)}: field 'choices' must be a list of strings")
    return [str(c).strip() for c in value]


# -------------------------------------------------------------------------------------------------- table readers
def _image_qa_records(
    table: Iterable[Any],
    rows: _Rows,
    *,
    dataset: str,
    split: str | None,
    stem: str,
    columns: dict[str, str] | None = None,
    derive_answer_type: bool = False,
    require_answer: bool = True,
) -> list[VQARecord]:
    """Rows with image, question, answer[, answer_type, choices, id]: generic tables, PathVQA, HF VQA-RAD.
    With `require_answer=False` (prediction on unlabeled images) a missing or empty answer gives answer None."""
    col = {name: name for name in ("id", "image", "question", "answer", "answer_type", "choices")}
    col.update(columns or {})
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        if col["image"] not in row:
            raise DataError(f"{rows.where(index)}: missing field '{col['image']}'")
        image, image_meta = rows.images(row[col["image"]], index, col["image"])
        question = rows.text(row, index, col["question"])
        answer = rows.text(row, index, col["answer"], required=require_answer) or None
        choices = _parse_choices(row.get(col["choices"]), rows, index)
        if choices is not None and answer is not None and answer not in choices:
            raise DataError(f"{rows.where(index)}: field '{col['answer']}' {answer!r} is not one of the choices")
        answer_type = rows.answer_type(row.get(col["answer_type"]), index, col["answer_type"])
        meta = {"dataset": dataset, "split": split, **image_meta}
        if answer_type is None and derive_answer_type and answer is not None:
            answer_type, meta["answer_type_source"] = _derived_answer_type(answer), "derived: yes/no answers"
        meta.update(_extras(row, col.values()))
        record_id = rows.text(row, index, col["id"], required=False) or f"{stem}/{index}"
        records.append(VQARecord(record_id, image, question, answer, answer_type, choices, meta))
    return records


def _table_sources(source: Any, split: str | None, suffixes: tuple[str, ...]) -> list[tuple[Path, str | None]]:
    """(file, split label) pairs for a file or a folder of split files."""
    path = Path(source)
    if path.is_dir():
        files = _split_files(path, split, suffixes)
        return [(f, split) for f in files]
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise _refuse_pickle(path)
    return [(path, split)]


def _read_tables(
    source: Any,
    split: str | None,
    *,
    suffixes: tuple[str, ...],
    image_root: str | os.PathLike | None,
    check_images: bool,
    label: str | None,
    parse: Callable[[Iterable[Any], _Rows, str | None, str], list[VQARecord]],
    default_root: Callable[[Path], Path | None] = lambda f: f.parent,
) -> list[VQARecord]:
    """Shared driver: each file (or the in-memory source) -> parse(rows, ctx, split, stem) -> checked records."""
    if not _is_path(source):
        table, name = _rows_of(source, label)
        rows = _Rows(name, image_root, check_images)
        return rows.finish(parse(table, rows, split, name))
    records: list[VQARecord] = []
    for file, file_split in _table_sources(source, split, suffixes):
        root = image_root if image_root is not None else default_root(file)
        rows = _Rows(label or str(file), root, check_images)
        records.extend(rows.finish(parse(_read_table(file), rows, file_split, file.name.split(".")[0])))
    return records


def read_generic(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    columns: dict[str, str] | None = None,
    dataset: str = "generic",
    label: str | None = None,
    require_answer: bool = True,
) -> list[VQARecord]:
    """JSONL/JSON/CSV/TSV/parquet (or a Dataset) with image, question, answer[, answer_type, choices, id].

    Relative image paths resolve against `image_root` (default: the file's folder). `columns` renames source
    columns, e.g. {"image": "img_path"}. Choices in CSV cells are a JSON list or '|'-separated. Unknown columns go
    to meta. Without an id column, ids are "<file stem>/<index>". `require_answer=False` accepts rows without an
    answer (answer None), for prediction on unlabeled images.
    """

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset=dataset, split=part, stem=stem, columns=columns,
                                 require_answer=require_answer)

    return _read_tables(source, split, suffixes=TABLE_SUFFIXES, image_root=image_root, check_images=check_images,
                        label=label, parse=parse)


def read_pathvqa(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    label: str | None = None,
) -> list[VQARecord]:
    """PathVQA, Hugging Face parquet release (image {bytes, path}, question, answer); closed = yes/no answers.

    The original pickle release is refused with instructions (never unpickled).
    """

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset="pathvqa", split=part, stem=stem, derive_answer_type=True)

    return _read_tables(source, split, suffixes=(".parquet",), image_root=image_root, check_images=check_images,
                        label=label, parse=parse)


# ----------------------------------------------------------------------------------------------------------- VQA-RAD
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"


def _vqa_rad_split(phrase_type: str) -> str:
    """The OSF file has no split column: phrase types test_freeform/test_para form the 451-question test set."""
    return "test" if phrase_type.lower().startswith("test") else "train"


def _vqa_rad_osf(table: Iterable[Any], rows: _Rows, split: str | None) -> list[VQARecord]:
    used = ("qid", "image_name", "question", "answer", "answer_type", "question_type", "image_organ", "phrase_type")
    want = None if split is None else _canonical_split(split)
    if want not in (None, "train", "test"):
        raise DataError(f"{rows.label}: VQA-RAD (OSF) has splits 'train' and 'test' (from phrase_type), not {split!r}")
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        phrase_type = rows.text(row, index, "phrase_type", required=want is not None) or ""
        item_split = _vqa_rad_split(phrase_type) if phrase_type else None
        if want is not None and item_split != want:
            continue
        qid = rows.text(row, index, "qid")
        image, name = rows.image(rows.text(row, index, "image_name"), index, "image_name")
        meta = {
            "dataset": "vqa_rad",
            "split": item_split,
            "organ": rows.text(row, index, "image_organ", required=False),
            "question_type": rows.text(row, index, "question_type", required=False),
            "phrase_type": phrase_type or None,
            "image_name": name,
            **_extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        records.append(VQARecord(qid, image, question, answer, answer_type, None, meta))
    return records


def read_vqa_rad(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    label: str | None = None,
) -> list[VQARecord]:
    """VQA-RAD: the OSF release (`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`) or the HF parquet release.

    OSF split rule (the file has no split field): split="test" keeps phrase_type test_freeform/test_para (the
    451-question test set used by MEVF, PubMedCLIP, LLaVA-Med), split="train" the rest (freeform, para); None keeps
    all, with meta["split"] set per item. HF release: image {bytes, path}, question, answer in train/test files;
    closed = yes/no answers (derived, as the release has no answer type).
    """
    if _is_path(source) and Path(source).is_dir() and (Path(source) / VQA_RAD_JSON).is_file():
        source = Path(source) / VQA_RAD_JSON
    is_osf = (
        Path(source).name.lower().endswith(".json")
        if _is_path(source)
        else "image_name" in (source.column_names if hasattr(source, "column_names") else (source or [{}])[0])
    )
    if is_osf:
        return _read_tables(source, split, suffixes=(".json",), image_root=image_root, check_images=check_images,
                            label=label, default_root=lambda f: f.parent / VQA_RAD_IMAGES,
                            parse=lambda table, rows, part, stem: _vqa_rad_osf(table, rows, split))

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset="vqa_rad", split=part, stem=stem, derive_answer_type=True)

    return _read_tables(source, split, suffixes=(".parquet",), image_root=image_root, check_images=check_images,
                        label=label, parse=parse)


# ------------------------------------------------------------------------------------------------------------- SLAKE
SLAKE_SPLITS = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def _slake(table: Iterable[Any], rows: _Rows, split: str | None, q_lang: str) -> list[VQARecord]:
    used = ("qid", "img_name", "question", "answer", "answer_type", "q_lang", "location", "modality",
            "content_type", "base_type", "img_id", "triple")
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        lang = rows.text(row, index, "q_lang", required=q_lang != "both")
        if q_lang != "both" and lang != q_lang:
            continue
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
            **_extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        records.append(VQARecord(rows.text(row, index, "qid"), image, question, answer, answer_type, None, meta))
    return records


def read_slake(
    source: Any,
    split: str | None = None,
    *,
    q_lang: str = "en",
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    label: str | None = None,
) -> list[VQARecord]:
    """SLAKE 1.0: a folder with train.json/validate.json/test.json and imgs/ (or one of the JSON files).

    q_lang: "en" (default; the English half used by published results), "zh" or "both". A folder with split=None
    reads all three splits. Images resolve against `image_root` (default: imgs/ beside the JSON files).
    """
    if q_lang not in ("en", "zh", "both"):
        raise ValueError(f"q_lang must be 'en', 'zh' or 'both', got {q_lang!r}")
    if _is_path(source) and Path(source).is_dir():
        wanted = list(SLAKE_SPLITS) if split is None else [_canonical_split(split)]
        if any(s not in SLAKE_SPLITS for s in wanted):
            raise DataError(f"{source}: SLAKE splits are train, validate, test; got {split!r}")
        return [
            record
            for part in wanted
            for record in read_slake(Path(source) / SLAKE_SPLITS[part], part, q_lang=q_lang, image_root=image_root,
                                     check_images=check_images, label=label)
        ]
    return _read_tables(source, split, suffixes=(".json",), image_root=image_root, check_images=check_images,
                        label=label, default_root=lambda f: f.parent / "imgs",
                        parse=lambda table, rows, part, stem: _slake(table, rows, _canonical_split(part or stem),
                                                                     q_lang))


# ----------------------------------------------------------------------------------------------------------- PMC-VQA
PMC_CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")


def _pmc_choice(text: str, letter: str) -> str:
    """' A:CT ' -> 'CT': drop the option's own letter label and surrounding whitespace."""
    return re.sub(rf"^\s*{letter}\s*:\s*", "", text).strip()


def _pmc_vqa(table: Iterable[Any], rows: _Rows, split: str | None, stem: str) -> list[VQARecord]:
    used = ("Figure_path", "Question", "Answer", "Answer_label", *PMC_CHOICE_COLUMNS)
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        image, name = rows.image(rows.text(row, index, "Figure_path"), index, "Figure_path")
        choices = [_pmc_choice(rows.text(row, index, c), c[-1]) for c in PMC_CHOICE_COLUMNS]
        label = rows.text(row, index, "Answer_label").upper()
        if label not in ("A", "B", "C", "D"):
            raise DataError(f"{rows.where(index)}: field 'Answer_label' must be A, B, C or D, got {label!r}")
        meta = {
            "dataset": "pmc_vqa",
            "split": split,
            "answer_label": label,
            "answer_raw": rows.text(row, index, "Answer", required=False),
            "image_name": name,
            **_extras(row, used),
        }
        question = rows.text(row, index, "Question")
        answer = choices["ABCD".index(label)]
        records.append(VQARecord(f"{stem}/{index}", image, question, answer, "closed", choices, meta))
    return records


def read_pmc_vqa(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    label: str | None = None,
) -> list[VQARecord]:
    """PMC-VQA CSV (train.csv, test.csv, test_clean.csv = the 2,000-item test set); multiple choice, closed.

    answer = text of the choice named by Answer_label (the CSV's own Answer is kept in meta["answer_raw"]); choices
    have their "A:" labels stripped. A folder needs `split` (the CSV stem). Images resolve against `image_root`
    (default: images/ beside the CSV if it exists, else the CSV's folder). Ids are "<csv stem>/<row index>".
    """
    if _is_path(source) and Path(source).is_dir():
        if split is None:
            names = sorted(p.name for p in Path(source).glob("*.csv"))
            raise DataError(f"{source}: give split= (one of the CSV stems: {names})")
        source = Path(source) / f"{split}.csv"

    def default_root(file: Path) -> Path:
        return file.parent / "images" if (file.parent / "images").is_dir() else file.parent

    return _read_tables(source, split, suffixes=(".csv",), image_root=image_root, check_images=check_images,
                        label=label, default_root=default_root,
                        parse=lambda table, rows, part, stem: _pmc_vqa(table, rows, part or stem, stem))


# ------------------------------------------------------------------------------------------------------------- LLaVA
IMAGE_TOKEN = "<image>"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


def strip_image_tokens(text: str) -> tuple[str, list[int]]:
    """Remove `<image>` tokens (and the newline LLaVA puts beside them); return the text and the token offsets.

    An offset is the character position in the cleaned text where the image stood (0 = before the question).
    """
    pieces = text.split(IMAGE_TOKEN)
    out, offsets = "", []
    for j, piece in enumerate(pieces):
        if j > 0:
            offsets.append(len(out))
            piece = piece.removeprefix("\n")
        if j < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        out += piece
    lead = len(out) - len(out.lstrip())
    cleaned = out.strip()
    return cleaned, [min(max(o - lead, 0), len(cleaned)) for o in offsets]


def _llava(table: Iterable[Any], rows: _Rows, split: str | None, dataset: str) -> list[VQARecord]:
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        item_id = rows.text(row, index, "id")
        image, image_meta = rows.images(row.get("image"), index, "image")
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{rows.where(index)}: field 'conversations' must be a non-empty list")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        pairs: list[tuple[str, list[int], str]] = []
        system, pending = None, None
        for k, turn in enumerate(turns):
            where = f"{rows.where(index)}: conversations[{k}]"
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
                raise DataError(f"{where}: expected {{'from': ..., 'value': str}}")
            role = str(turn["from"]).lower()
            if role == "system":
                system = turn["value"]
            elif role in _HUMAN and pending is None:
                pending = strip_image_tokens(turn["value"])
            elif role in _GPT and pending is not None:
                pairs.append((pending[0], pending[1], turn["value"].strip()))
                pending = None
            else:
                expected = "a 'human'" if pending is None else "a 'gpt'"
                raise DataError(f"{where}: expected {expected} turn, got {turn['from']!r}")
        if pending is not None:
            raise DataError(f"{rows.where(index)}: conversations end with a 'human' turn that has no answer")
        base = {"dataset": dataset, "split": split, "source_id": item_id, **image_meta,
                **_extras(row, ("id", "image", "conversations", "answer_type"))}
        if system is not None:
            base["system"] = system
        history: list[dict] = []
        for t, (question, offsets, answer) in enumerate(pairs):
            meta = {**base, "turn": t, "n_turns": len(pairs), "history": list(history)}
            if offsets:
                meta["image_token_offsets"] = offsets
            record_id = item_id if len(pairs) == 1 else f"{item_id}#{t}"
            records.append(VQARecord(record_id, image, question, answer, answer_type, None, meta))
            history.append({"question": question, "answer": answer})
    return records


def read_llava(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    dataset: str = "llava",
    label: str | None = None,
) -> list[VQARecord]:
    """LLaVA / LLaVA-Med conversation JSON or JSONL: [{id, image, conversations: [{from, value}, ...]}, ...].

    One record per human/gpt pair (alignment captions give one); earlier pairs go to meta["history"] as
    [{question, answer}], the pair index to meta["turn"]. `<image>` is removed from the text and its position kept in
    meta["image_token_offsets"]. Multi-turn ids are "<id>#<turn>"; single-turn items keep their id. Items without
    an image are text-only (image None); a list of images goes to meta["images"]. VQA splits' answer_type is kept.
    """
    return _read_tables(source, split, suffixes=(".json", ".jsonl"), image_root=image_root,
                        check_images=check_images, label=label,
                        parse=lambda table, rows, part, stem: _llava(table, rows, part, dataset))


# ----------------------------------------------------------------------------------------------------------- reports
REPORT_TARGETS = ("findings", "impression", "both")


def _reports(
    table: Iterable[Any],
    rows: _Rows,
    split: str | None,
    stem: str,
    *,
    instruction: str,
    target: str,
    with_indication: bool,
    image_field: str,
    skip_empty: bool,
) -> list[VQARecord]:
    records = []
    for index, raw in enumerate(table):
        row = rows.row(raw, index)
        needed = (image_field, "findings") if target == "both" and "impression" not in row else (image_field,)
        for key in (*needed, *(() if target == "both" else (target,))):
            if key not in row:
                raise DataError(f"{rows.where(index)}: missing field '{key}'")
        findings = rows.text(row, index, "findings", required=False) or ""
        impression = rows.text(row, index, "impression", required=False) or ""
        indication = rows.text(row, index, "indication", required=False) or ""
        if target == "findings":
            answer = findings
        elif target == "impression":
            answer = impression
        else:
            answer = "\n".join(f"{k.upper()}: {v}" for k, v in (("findings", findings), ("impression", impression))
                               if v)
        if not answer:
            if skip_empty:
                continue
            raise DataError(f"{rows.where(index)}: empty report target '{target}'")
        image, image_meta = rows.images(row[image_field], index, image_field)
        question = f"{instruction} Indication: {indication}" if with_indication and indication else instruction
        meta = {
            "dataset": "report",
            "split": split,
            "task": "report",
            "findings": findings or None,
            "impression": impression or None,
            "indication": indication or None,
            **image_meta,
            **_extras(row, (image_field, "findings", "impression", "indication", "id")),
        }
        record_id = rows.text(row, index, "id", required=False) or f"{stem}/{index}"
        records.append(VQARecord(record_id, image, question, answer, None, None, meta))
    return records


def read_reports(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    instruction: str = DEFAULT_REPORT_INSTRUCTION,
    target: str = "findings",
    with_indication: bool = False,
    image_field: str = "image",
    skip_empty: bool = True,
    label: str | None = None,
) -> list[VQARecord]:
    """Report pairs (MIMIC-CXR / IU X-ray style) CSV/JSONL: image, findings[, impression, indication][, id].

    question = `instruction` (+ " Indication: ..." with with_indication=True); answer = findings, impression or both
    ("FINDINGS: ...\\nIMPRESSION: ..."). Studies whose target section is empty are skipped (skip_empty=True, as
    report-generation work does) — a missing column is an error. JSONL may give a list of images per study.
    """
    if target not in REPORT_TARGETS:
        raise ValueError(f"target must be one of {REPORT_TARGETS}, got {target!r}")

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _reports(table, rows, part, stem, instruction=instruction, target=target,
                        with_indication=with_indication, image_field=image_field, skip_empty=skip_empty)

    return _read_tables(source, split, suffixes=(".csv", ".tsv", ".jsonl", ".json", ".parquet"),
                        image_root=image_root, check_images=check_images, label=label, parse=parse)


# ---------------------------------------------------------------------------------------------------- dispatching
READERS: dict[str, Callable[..., list[VQARecord]]] = {
    "vqa_rad": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "pmc_vqa": read_pmc_vqa,
    "llava": read_llava,
    "report": read_reports,
    "generic": read_generic,
}
_HUB_KEYS = {"config": "name", "revision": "revision", "data_files": "data_files", "data_dir": "data_dir",
             "cache_dir": "cache_dir"}


def _load_hub(hub: str, split: str | None, options: dict) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_dataset` with the spec's hub options; also takes local folders and packaged builders."""
    import datasets

    try:
        return datasets.load_dataset(hub, split=split, **options)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DataError(f"{hub}: cannot load dataset (split={split!r}): {type(err).__name__}: {err}") from err


def load_records(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> list[VQARecord]:
    """Read records from a spec: {"format": <READERS key>, "path": ... | "hub": ..., [split], reader options}.

    A bare path means {"format": "generic", "path": path} (JSONL/JSON/CSV/TSV/parquet by suffix). With "hub", the
    data comes from `datasets.load_dataset(hub, split=..., name=config, revision=..., data_files=..., data_dir=...,
    cache_dir=...)` — a hub id, a local folder, or a packaged builder such as "parquet" with data_files — and is
    read by the format's reader; split=None reads every split. Keyword arguments override spec entries.
    """
    spec = {"format": "generic", "path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
    spec.update(kw)
    fmt = spec.pop("format", None)
    if fmt not in READERS:
        raise DataError(f"dataset spec needs 'format', one of {sorted(READERS)}; got {fmt!r}")
    split = split if split is not None else spec.pop("split", None)
    spec.pop("split", None)
    hub, path = spec.pop("hub", None), spec.pop("path", None)
    if (hub is None) == (path is None):
        raise DataError(f"dataset spec for format {fmt!r} needs exactly one of 'path' or 'hub'")
    reader = READERS[fmt]
    if path is not None:
        return reader(path, split, **spec)
    options = {_HUB_KEYS[k]: spec.pop(k) for k in list(spec) if k in _HUB_KEYS}
    loaded = _load_hub(hub, split, options)
    if split is not None:
        return reader(loaded, split, label=f"{hub}[{split}]", **spec)
    return [record for name, part in loaded.items() for record in reader(part, name, label=f"{hub}[{name}]", **spec)]


def load_vqa_dataset(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> datasets.Dataset:
    """`load_records` as an Arrow-backed `datasets.Dataset` (see records_to_dataset)."""
    return records_to_dataset(load_records(spec, split, **kw))
