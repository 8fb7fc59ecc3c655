"""Readers from each public dataset layout to `list[VQARecord]`, and `load_records(spec)` dispatching on `format`.

Every reader takes a `source`: a file or folder path in the layout of the official release, a `datasets.Dataset`
(e.g. from the hub) or a list of row dicts with the same fields. Formats are chosen explicitly (spec["format"]);
within a format only the release's own file types are told apart (VQA-RAD: .json = OSF release, .parquet = HF).
Malformed input is named by file, item index (0-based) and field. A malformed *item* (a missing or empty field, an
unknown answer type, a broken conversation) follows `on_bad_record`: "skip" (default) leaves it out, names it in the
log and lists it in the result's `skipped` (see `Records`), so a run reports it; "stop" raises `DataError`. A malformed
*file* (unreadable, not a list) always raises, and so does a read that gives no records at all. Nothing is unpickled.

Folder layouts and split files (see each reader):
  * split files in a folder follow the Hugging Face naming: ``<split>-00000-of-00001.parquet``, ``<split>.csv`` or
    files under a ``<split>/`` sub-folder ("val"/"valid"/"validation"/"validate" are aliases);
  * images are resolved against `image_root` (default: the release's image folder) into absolute paths; with
    `check_images=True` (default) missing files are reported by name at read time, otherwise at load time.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import prompts
from .records import DataError, Records, SkippedRecord, VQARecord, normalize_answer_type, records_to_dataset

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
    "read_llava_med_eval",
    "read_reports",
    "read_iu_xray",
    "read_generic",
    "DEFAULT_REPORT_INSTRUCTION",
    "BAD_RECORD_POLICIES",
    "strip_image_tokens",
]

log = logging.getLogger(__name__)

DEFAULT_REPORT_INSTRUCTION = "Describe the findings of the chest X-ray."
LLAVA_RAD_INSTRUCTION = "llava_rad"  # instruction=... naming LLaVA-Rad's prompt (prompts.report_question)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation", "dev": "validation"}
_MISSING = object()
BAD_RECORD_POLICIES = ("skip", "stop")


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
            return _json_lines(path, path.read_text(encoding="utf-8"))
        if name.endswith(".json"):
            text = path.read_text(encoding="utf-8")
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                if not _looks_like_json_lines(text):
                    raise
                log.info("%s: JSON Lines content (one object per line) in a .json file; reading it line by line",
                         path)
                return _json_lines(path, text, note=" (read as JSON Lines: the first line is a whole JSON object; "
                                   f"as one JSON document the file fails with: {err})")
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

    def __init__(self, label: str, image_root: str | os.PathLike | None, check_images: bool,
                 on_bad_record: str = "skip", hint: str = "") -> None:
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {list(BAD_RECORD_POLICIES)}, got {on_bad_record!r}")
        self.label = label
        self.image_root = None if image_root is None else Path(image_root)
        self.check_images = check_images
        self.on_bad_record = on_bad_record
        self.hint = hint  # said after "image file(s) not found": where the layout's image names come from
        self.missing: list[tuple[int, str]] = []
        self.skipped: list[SkippedRecord] = []

    def each(self, table: Iterable[Any], one: Callable[[dict, int], VQARecord | list[VQARecord] | None]
             ) -> list[VQARecord]:
        """`one(row, index)` over the table's items -> records (None: filtered out, e.g. another language);
        a DataError from an item goes through the on_bad_record policy."""
        records: list[VQARecord] = []
        for index, raw in enumerate(table):
            missing = len(self.missing)
            try:
                got = one(self.row(raw, index), index)
            except DataError as err:
                del self.missing[missing:]  # a skipped item's image is not looked for
                self.bad(raw, index, err)
                continue
            if got is not None:
                records.extend(got if isinstance(got, list) else [got])
        return records

    def bad(self, raw: Any, index: int, err: DataError) -> None:
        """Apply the policy to a malformed item: raise, or log it by name and keep it in `skipped`."""
        if self.on_bad_record == "stop":
            raise DataError(f"{err} (on_bad_record='stop'; 'skip' leaves such items out and lists them)") from err
        item_id = next((str(raw[k]) for k in ("id", "qid", "question_id", "uid")
                        if isinstance(raw, dict) and raw.get(k) not in (None, "")), None)
        where, message = self.where(index), str(err)
        reason = message.removeprefix(f"{where}: ")
        self.skipped.append(SkippedRecord(where, item_id, reason))
        log.warning("skipping bad record %s%s: %s (on_bad_record='skip')", where,
                    f" (id {item_id})" if item_id else "", reason)

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

    def finish(self, records: list[VQARecord]) -> Records:
        if self.missing:
            shown = "; ".join(f"item {i}: {p}" for i, p in self.missing[:10])
            more = f" (and {len(self.missing) - 10} more)" if len(self.missing) > 10 else ""
            hint = f" {self.hint}." if self.hint else ""
            raise DataError(
                f"{self.label}: {len(self.missing)} image file(s) not found: {shown}{more}.{hint} Check image_root, "
                "or pass check_images=False to report missing files only when they are loaded."
            )
        return Records(records, self.skipped)


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

    def one(row: dict, index: int) -> VQARecord:
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
        question, offsets = strip_image_tokens(question)
        record_id = rows.text(row, index, col["id"], required=False) or f"{stem}/{index}"
        return VQARecord(record_id, image, question, answer, answer_type, choices, meta,
                         image_position=_image_position(question, offsets, rows.where(index)))

    return rows.each(table, one)


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
    on_bad_record: str = "skip",
    hint: str = "",
) -> Records:
    """Shared driver: each file (or the in-memory source) -> parse(rows, ctx, split, stem) -> checked records.

    A read that gives no records is an error (a wrong split, a filter that matches nothing, every item bad)."""
    if not _is_path(source):
        table, name = _rows_of(source, label)
        rows = _Rows(name, image_root, check_images, on_bad_record, hint)
        return _nonempty(rows.finish(parse(table, rows, split, name)), name, split)
    parts = []
    for file, file_split in _table_sources(source, split, suffixes):
        root = image_root if image_root is not None else default_root(file)
        rows = _Rows(label or str(file), root, check_images, on_bad_record, hint)
        parts.append(rows.finish(parse(_read_table(file), rows, file_split, file.name.split(".")[0])))
    return _nonempty(Records.concat(parts), label or str(source), split)


def _nonempty(records: Records, where: str, split: str | None) -> Records:
    if records:
        return records
    which = f" for split {split!r}" if split else ""
    bad = (f"; all {len(records.skipped)} item(s) were bad, the first: {records.skipped[0].where}: "
           f"{records.skipped[0].reason}") if records.skipped else ""
    raise DataError(f"{where}: no records{which}{bad}")


def read_generic(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    columns: dict[str, str] | None = None,
    dataset: str = "generic",
    on_bad_record: str = "skip",
    label: str | None = None,
    require_answer: bool = True,
) -> Records:
    """JSONL/JSON/CSV/TSV/parquet (or a Dataset) with image, question, answer[, answer_type, choices, id].

    Relative image paths resolve against `image_root` (default: the file's folder). `columns` renames source
    columns, e.g. {"image": "img_path"}. Choices in CSV cells are a JSON list or '|'-separated. Unknown columns go
    to meta. Without an id column, ids are "<file stem>/<index>". A LLaVA-style `<image>` token in a question is
    removed and its place kept in `image_position`. JSON Lines content in a .json file is recognised and read.
    `require_answer=False` accepts rows without an answer (answer None), for prediction on unlabeled images.
    """

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset=dataset, split=part, stem=stem, columns=columns,
                                 require_answer=require_answer)

    return _read_tables(source, split, suffixes=TABLE_SUFFIXES, image_root=image_root, check_images=check_images,
                        label=label, parse=parse, on_bad_record=on_bad_record)


def read_pathvqa(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """PathVQA, Hugging Face parquet release (image {bytes, path}, question, answer); closed = yes/no answers.

    The original pickle release is refused with instructions (never unpickled).
    """

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset="pathvqa", split=part, stem=stem, derive_answer_type=True)

    return _read_tables(source, split, suffixes=(".parquet",), image_root=image_root, check_images=check_images,
                        label=label, parse=parse, on_bad_record=on_bad_record)


# ----------------------------------------------------------------------------------------------------------- VQA-RAD
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}  # the MEVF/MUMC `data_RAD/` layout


def _vqa_rad_split(phrase_type: str) -> str:
    """The OSF file has no split column: phrase types test_freeform/test_para form the 451-question test set."""
    return "test" if phrase_type.lower().startswith("test") else "train"


def _file_split(file: Path) -> str | None:
    """The split a file's name states ("trainset.json" -> train, "test.json" -> test), or None (OSF: no split)."""
    match = re.fullmatch(r"(train|test|val|valid|validation|validate|dev)(?:set|_set|-set)?", file.stem.lower())
    return _canonical_split(match.group(1)) if match else None


def _vqa_rad_json(table: Iterable[Any], rows: _Rows, split: str | None, file_split: str | None,
                  frame_questions: bool) -> list[VQARecord]:
    used = ("qid", "image_name", "question", "answer", "answer_type", "question_type", "image_organ", "phrase_type")
    want = None if split is None else _canonical_split(split)
    if file_split is not None and want not in (None, file_split):
        raise DataError(f"{rows.label}: this file holds the {file_split!r} split (from its name), not {split!r}")
    if file_split is None and want not in (None, "train", "test"):
        raise DataError(f"{rows.label}: VQA-RAD (OSF) has splits 'train' and 'test' (from phrase_type), not {split!r}")

    def one(row: dict, index: int) -> VQARecord | None:
        phrase_type = rows.text(row, index, "phrase_type", required=want is not None and file_split is None) or ""
        if phrase_type.lower() == "frame" and not frame_questions:
            return None
        item_split = file_split or (_vqa_rad_split(phrase_type) if phrase_type else None)
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
            **_extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        return VQARecord(qid, image, question, answer, answer_type, None, meta)

    return rows.each(table, one)


def read_vqa_rad(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    frame_questions: bool = False,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
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
    if _is_path(source) and Path(source).is_dir():
        folder = Path(source)
        if (folder / VQA_RAD_JSON).is_file():
            source = folder / VQA_RAD_JSON
        elif any((folder / name).is_file() for name in VQA_RAD_SPLIT_FILES.values()):
            want = list(VQA_RAD_SPLIT_FILES) if split is None else [_canonical_split(split)]
            if any(w not in VQA_RAD_SPLIT_FILES for w in want):
                raise DataError(f"{folder}: the data_RAD layout has splits train (trainset.json) and test "
                                f"(testset.json), not {split!r}")
            return Records.concat(
                read_vqa_rad(folder / VQA_RAD_SPLIT_FILES[w], w, image_root=image_root, check_images=check_images,
                             frame_questions=frame_questions, on_bad_record=on_bad_record, label=label)
                for w in want)
    is_json = (
        Path(source).name.lower().endswith(".json")
        if _is_path(source)
        else "image_name" in (source.column_names if hasattr(source, "column_names") else (source or [{}])[0])
    )
    if is_json:
        file_split = _file_split(Path(source)) if _is_path(source) else None

        def default_root(file: Path) -> Path:
            return file.parent / ("images" if file_split else VQA_RAD_IMAGES)

        return _read_tables(source, split, suffixes=(".json",), image_root=image_root, check_images=check_images,
                            label=label, default_root=default_root, on_bad_record=on_bad_record,
                            parse=lambda table, rows, part, stem: _vqa_rad_json(table, rows, split, file_split,
                                                                                frame_questions))

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        return _image_qa_records(table, rows, dataset="vqa_rad", split=part, stem=stem, derive_answer_type=True)

    return _read_tables(source, split, suffixes=(".parquet",), image_root=image_root, check_images=check_images,
                        label=label, parse=parse, on_bad_record=on_bad_record)


# ------------------------------------------------------------------------------------------------------------- SLAKE
SLAKE_SPLITS = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def _slake(table: Iterable[Any], rows: _Rows, split: str | None, q_lang: str) -> list[VQARecord]:
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
            **_extras(row, used),
        }
        question, answer = rows.text(row, index, "question"), rows.text(row, index, "answer")
        answer_type = rows.answer_type(row.get("answer_type"), index)
        return VQARecord(rows.text(row, index, "qid"), image, question, answer, answer_type, None, meta)

    return rows.each(table, one)


def read_slake(
    source: Any,
    split: str | None = None,
    *,
    q_lang: str = "en",
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """SLAKE 1.0: a folder with train.json/validate.json/test.json and imgs/ (or one of the JSON files).

    q_lang: "en" (default; the English half used by published results), "zh" or "both". A folder with split=None
    reads all three splits. Images resolve against `image_root` (default: imgs/ beside the JSON files). The released
    train.json holds one English item with an empty answer (index 1622, qid 1622): skipped and reported by default.
    """
    if q_lang not in ("en", "zh", "both"):
        raise ValueError(f"q_lang must be 'en', 'zh' or 'both', got {q_lang!r}")
    if _is_path(source) and Path(source).is_dir():
        wanted = list(SLAKE_SPLITS) if split is None else [_canonical_split(split)]
        if any(s not in SLAKE_SPLITS for s in wanted):
            raise DataError(f"{source}: SLAKE splits are train, validate, test; got {split!r}")
        return Records.concat(
            read_slake(Path(source) / SLAKE_SPLITS[part], part, q_lang=q_lang, image_root=image_root,
                       check_images=check_images, on_bad_record=on_bad_record, label=label)
            for part in wanted)
    if _is_path(source) and split is not None:  # a released file names its split: never relabel it silently
        named = _file_split(Path(source))
        if named is not None and named != _canonical_split(split):
            raise DataError(f"{source}: this file holds the {named!r} split (from its name), not {split!r}")
    return _read_tables(source, split, suffixes=(".json",), image_root=image_root, check_images=check_images,
                        label=label, default_root=lambda f: f.parent / "imgs", on_bad_record=on_bad_record,
                        parse=lambda table, rows, part, stem: _slake(table, rows, _canonical_split(part or stem),
                                                                     q_lang))


# ----------------------------------------------------------------------------------------------------------- PMC-VQA
PMC_CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")


def _pmc_choice(text: str, letter: str) -> str:
    """' A:CT ' -> 'CT': drop the option's own letter label and surrounding whitespace."""
    return re.sub(rf"^\s*{letter}\s*:\s*", "", text).strip()


def _pmc_vqa(table: Iterable[Any], rows: _Rows, split: str | None, stem: str) -> list[VQARecord]:
    used = ("Figure_path", "Question", "Answer", "Answer_label", *PMC_CHOICE_COLUMNS)

    def one(row: dict, index: int) -> VQARecord:
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
        return VQARecord(f"{stem}/{index}", image, question, answer, "closed", choices, meta)

    return rows.each(table, one)


def read_pmc_vqa(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
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
                        label=label, default_root=default_root, on_bad_record=on_bad_record,
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


def _image_position(text: str, offsets: list[int], where: str) -> str | None:
    """Where one `<image>` stood in a cleaned question: before it, after it, or None (no token)."""
    if not offsets:
        return None
    if len(offsets) > 1:
        raise DataError(f"{where}: {len(offsets)} '{IMAGE_TOKEN}' tokens in one question; one image per item")
    if offsets[0] == 0:
        return "before_question"
    if offsets[0] == len(text):
        return "after_question"
    raise DataError(f"{where}: '{IMAGE_TOKEN}' in the middle of the question (character {offsets[0]}); the image "
                    "goes before or after a question")


def _conversation(turns: Any, where: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """LLaVA `conversations` -> ([(question, answer), ...], image position in the first question, system text)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    pairs: list[tuple[str, str]] = []
    system = pending = position = None
    for k, turn in enumerate(turns):
        at = f"{where}: conversations[{k}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(f"{at}: expected {{'from': ..., 'value': str}}")
        role = str(turn["from"]).lower()
        if role == "system":
            system = turn["value"]
        elif role in _HUMAN and pending is None:
            pending, offsets = strip_image_tokens(turn["value"])
            if offsets and pairs:
                raise DataError(f"{at}: '{IMAGE_TOKEN}' in a later turn; the image belongs to the first question")
            position = _image_position(pending, offsets, at) if offsets else position
        elif role in _GPT and pending is not None:
            answer = turn["value"].strip()
            if not answer:
                raise DataError(f"{at}: empty answer")
            pairs.append((pending, answer))
            pending = None
        else:
            expected = "a 'human'" if pending is None else "a 'gpt'"
            raise DataError(f"{at}: expected {expected} turn, got {turn['from']!r}")
    if pending is not None:
        raise DataError(f"{where}: conversations end with a 'human' turn that has no answer")
    return pairs, position, system


def _llava(table: Iterable[Any], rows: _Rows, split: str | None, dataset: str, per_turn: bool) -> list[VQARecord]:
    def one(row: dict, index: int) -> list[VQARecord]:
        item_id = rows.text(row, index, "id")
        image, image_meta = rows.images(row.get("image"), index, "image")
        pairs, position, system = _conversation(row.get("conversations"), rows.where(index))
        answer_type = rows.answer_type(row.get("answer_type"), index)
        meta = {"dataset": dataset, "split": split, "source_id": item_id, "n_turns": len(pairs), **image_meta,
                **_extras(row, ("id", "image", "conversations", "answer_type"))}
        if system is not None:
            meta["system"] = system
        ends = range(1, len(pairs) + 1) if per_turn else [len(pairs)]
        return [VQARecord(item_id if len(pairs) == 1 or not per_turn else f"{item_id}#{n - 1}", image,
                          *pairs[n - 1], answer_type, None, {**meta, "turn": n - 1} if per_turn else meta,
                          history=pairs[:n - 1], image_position=position) for n in ends]

    return rows.each(table, one)


def read_llava(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    dataset: str = "llava",
    per_turn: bool = False,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """LLaVA / LLaVA-Med conversation JSON or JSONL: [{id, image, conversations: [{from, value}, ...]}, ...].

    One record per conversation, as LLaVA trains: question/answer are the last exchange, `history` the earlier
    ones, and training supervises every answer. `<image>` is removed from the text; where it stood in the first
    question (before or after it) is kept in `image_position` (a token in the middle of a question, in a later turn,
    or twice is a bad record). per_turn=True gives one record per exchange instead ("<id>#<turn>", with the exchanges
    before it as history), to evaluate every turn. Items without an image are text-only (image None); a list of
    images goes to meta["images"]. VQA splits' answer_type is kept. JSON Lines content in a .json file is read.
    """
    return _read_tables(source, split, suffixes=(".json", ".jsonl"), image_root=image_root,
                        check_images=check_images, label=label, on_bad_record=on_bad_record,
                        parse=lambda table, rows, part, stem: _llava(table, rows, part, dataset, per_turn))


def _llava_med_eval(table: Iterable[Any], rows: _Rows, split: str | None) -> list[VQARecord]:
    used = ("question_id", "image", "text", "gpt4_answer", "type", "domain")

    def one(row: dict, index: int) -> VQARecord:
        question, offsets = strip_image_tokens(rows.text(row, index, "text"))
        if not question:
            raise DataError(f"{rows.where(index)}: field 'text' has no question besides '{IMAGE_TOKEN}'")
        image, name = rows.image(rows.text(row, index, "image"), index, "image")
        domain = row.get("domain") if isinstance(row.get("domain"), dict) else {}
        meta = {"dataset": "llava_med_eval", "split": split, "image_name": name,
                "question_type": rows.text(row, index, "type", required=False),
                "domain": domain or None, "modality": sorted(k for k, v in domain.items() if v) or None,
                **_extras(row, used)}
        return VQARecord(rows.text(row, index, "question_id"), image, question, rows.text(row, index, "gpt4_answer"),
                         None, None, meta, image_position=_image_position(question, offsets, rows.where(index)))

    return rows.each(table, one)


def read_llava_med_eval(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """LLaVA-Med's own evaluation questions (`data/eval/llava_med_eval_qa50_qa.jsonl`): JSON Lines of
    {question_id, image, text, gpt4_answer, type, domain, fig_caption, ...}.

    question = `text` without its `<image>` token (whose place goes to `image_position`), answer = `gpt4_answer`
    (the GPT-4 reference LLaVA-Med scores against), id = question_id. `type` (conversation / detailed_description)
    becomes meta["question_type"]; the true keys of `domain` (chest_xray, mri, ct_scan, histology, gross) become
    meta["modality"], so reports break results down the way the paper does. Images resolve against `image_root`
    (default: the file's folder; upstream keeps them in data/images/).
    """
    return _read_tables(source, split, suffixes=(".jsonl", ".json"), image_root=image_root,
                        check_images=check_images, label=label, on_bad_record=on_bad_record,
                        parse=lambda table, rows, part, stem: _llava_med_eval(table, rows, part))


# ----------------------------------------------------------------------------------------------------------- reports
REPORT_TARGETS = ("findings", "impression", "both")
IU_XRAY_REPORTS = "indiana_reports.csv"
IU_XRAY_PROJECTIONS = "indiana_projections.csv"
IU_XRAY_VIEWS = {"frontal": "Frontal", "lateral": "Lateral"}
_IU_XRAY_COLUMNS = {"uid", "MeSH", "Problems", "image"}


def _report_item(row: dict, index: int, rows: _Rows, split: str | None, stem: str, *, instruction: str, target: str,
                 with_indication: bool, image_field: str, skip_empty: bool, id_field: str = "id",
                 dataset: str = "report", extra_meta: dict | None = None) -> VQARecord | None:
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
        answer = "\n".join(f"{k.upper()}: {v}" for k, v in (("findings", findings), ("impression", impression)) if v)
    if not answer:
        if skip_empty:
            return None
        raise DataError(f"{rows.where(index)}: empty report target '{target}'")
    image, image_meta = rows.images(row[image_field], index, image_field)
    if instruction == LLAVA_RAD_INSTRUCTION:  # LLaVA-Rad's own wording, with the study's indication when given
        question = prompts.report_question(indication)
    else:
        question = f"{instruction} Indication: {indication}" if with_indication and indication else instruction
    meta = {
        "dataset": dataset,
        "split": split,
        "task": "report",
        "findings": findings or None,
        "impression": impression or None,
        "indication": indication or None,
        **image_meta,
        **(extra_meta or {}),
        **_extras(row, (image_field, "findings", "impression", "indication", id_field)),
    }
    record_id = rows.text(row, index, id_field, required=False) or f"{stem}/{index}"
    return VQARecord(record_id, image, question, answer, None, None, meta)


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
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """Report pairs (MIMIC-CXR / IU X-ray style) CSV/JSONL: image, findings[, impression, indication][, id].

    question = `instruction` (+ " Indication: ..." with with_indication=True), or with instruction="llava_rad"
    LLaVA-Rad's "Provide a description of the findings ... indication: ..."; answer = findings, impression or both
    ("FINDINGS: ...\\nIMPRESSION: ..."). Studies whose target section is empty are skipped (skip_empty=True, as
    report-generation work does) — a missing column is an error. JSONL may give a list of images per study.
    IU X-ray's Kaggle `indiana_reports.csv` is refused with a pointer to format "iu_xray": its `image` column
    describes the exam; the image files are listed in `indiana_projections.csv`.
    """
    if target not in REPORT_TARGETS:
        raise ValueError(f"target must be one of {REPORT_TARGETS}, got {target!r}")

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        table = list(table)
        if table and isinstance(table[0], dict) and _IU_XRAY_COLUMNS <= set(table[0]) and image_field == "image":
            raise DataError(f"{rows.label}: this is IU X-ray as released on Kaggle: its 'image' column describes the "
                            f"exam ({table[0]['image']!r}), it names no file. Read it with format 'iu_xray', which "
                            f"takes each study's image files from {IU_XRAY_PROJECTIONS} beside it")
        return rows.each(table, lambda row, index: _report_item(
            row, index, rows, part, stem, instruction=instruction, target=target, with_indication=with_indication,
            image_field=image_field, skip_empty=skip_empty))

    return _read_tables(source, split, suffixes=(".csv", ".tsv", ".jsonl", ".json", ".parquet"),
                        image_root=image_root, check_images=check_images, label=label, parse=parse,
                        on_bad_record=on_bad_record)


def _iu_xray_image_root(folder: Path) -> Path:
    """The Kaggle release unpacks its PNGs into images/images_normalized/; take the first candidate present."""
    candidates = [folder / "images" / "images_normalized", folder / "images_normalized", folder / "images"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def read_iu_xray(
    source: Any,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    view: str = "frontal",
    projections: str | os.PathLike | None = None,
    instruction: str = DEFAULT_REPORT_INSTRUCTION,
    target: str = "findings",
    with_indication: bool = False,
    skip_empty: bool = True,
    on_bad_record: str = "skip",
    label: str | None = None,
) -> Records:
    """IU X-ray (Open-i) as released on Kaggle: `indiana_reports.csv` (uid, MeSH, Problems, image, indication,
    comparison, findings, impression) + `indiana_projections.csv` (uid, filename, projection) + images/.

    `source` is the folder or the reports CSV (`projections` defaults to the CSV beside it). The reports' `image`
    column describes the exam (kept as meta["exam"]); each study's files come from the projections file, joined by
    uid, for the chosen `view` ("frontal" or "lateral"; a study with several such images keeps the first as its image
    and all of them in meta["images"]). Studies without an image of that view are left out (one log line counts
    them), as are studies whose target section is empty (skip_empty). Images resolve
    against `image_root` (default: images/images_normalized/ as the Kaggle archive unpacks). Report options as in
    `read_reports`. The release has no split: split must be None.
    """
    if view not in IU_XRAY_VIEWS:
        raise ValueError(f"view must be one of {list(IU_XRAY_VIEWS)}, got {view!r}")
    if target not in REPORT_TARGETS:
        raise ValueError(f"target must be one of {REPORT_TARGETS}, got {target!r}")
    if not _is_path(source):
        raise TypeError("read_iu_xray reads the released CSV files: give their folder or indiana_reports.csv")
    reports = Path(source) / IU_XRAY_REPORTS if Path(source).is_dir() else Path(source)
    if split is not None:
        raise DataError(f"{reports}: IU X-ray (Kaggle) has no split; read it with split=None and split it yourself")
    proj_file = Path(projections) if projections is not None else reports.parent / IU_XRAY_PROJECTIONS
    by_uid: dict[str, list[str]] = {}
    for index, row in enumerate(_read_table(proj_file)):
        if not isinstance(row, dict) or not {"uid", "filename", "projection"} <= set(row):
            raise DataError(f"{proj_file} item {index}: expected columns uid, filename, projection")
        if str(row["projection"]).strip().lower() == view:
            by_uid.setdefault(str(row["uid"]).strip(), []).append(str(row["filename"]).strip())
    root = Path(image_root) if image_root is not None else _iu_xray_image_root(reports.parent)
    hint = f"Image file names come from {proj_file} (column 'filename'), resolved against image_root={root}"

    def parse(table: Iterable[Any], rows: _Rows, part: str | None, stem: str) -> list[VQARecord]:
        without: list[str] = []

        def one(row: dict, index: int) -> VQARecord | None:
            uid = rows.text(row, index, "uid")
            files = by_uid.get(uid)
            joined = {**{k: v for k, v in row.items() if k != "image"}, "image": (files or [None])[0]}
            if files and len(files) > 1:
                joined["image"] = files
            record = _report_item(joined, index, rows, part, stem, instruction=instruction, target=target,
                                  with_indication=with_indication, image_field="image", skip_empty=skip_empty,
                                  id_field="uid", dataset="iu_xray",
                                  extra_meta={"exam": row.get("image"), "view": view})
            if record is not None and not files:  # the study has no image of this view: not this view's data
                without.append(uid)
                return None
            return record

        records = rows.each(table, one)
        if without:
            log.warning("%s: %d studies (with %s text) have no %s image in %s and are left out (uids %s%s)",
                        rows.label, len(without), target, IU_XRAY_VIEWS[view], proj_file, ", ".join(without[:5]),
                        ", ..." if len(without) > 5 else "")
        return records

    return _read_tables(reports, None, suffixes=(".csv",), image_root=root, check_images=check_images, label=label,
                        parse=parse, on_bad_record=on_bad_record, hint=hint)


# ---------------------------------------------------------------------------------------------------- dispatching
READERS: dict[str, Callable[..., list[VQARecord]]] = {
    "vqa_rad": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "pmc_vqa": read_pmc_vqa,
    "llava": read_llava,
    "llava_med_eval": read_llava_med_eval,
    "report": read_reports,
    "iu_xray": read_iu_xray,
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


def _check_options(fmt: str, reader: Callable[..., Any], keys: set[str]) -> None:
    """Unknown data-spec keys are refused by name (a misspelt option would otherwise be a TypeError traceback)."""
    import inspect

    params = inspect.signature(reader).parameters
    known = {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"label"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    if keys - known:
        raise DataError(f"dataset spec for format {fmt!r}: unknown key(s) {sorted(keys - known)}; expected some of "
                        f"{sorted(known | {'format', 'path', 'hub', 'split', *_HUB_KEYS})}")


def load_records(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> Records:
    """Read records from a spec: {"format": <READERS key>, "path": ... | "hub": ..., [split], reader options}.

    Reader options include `on_bad_record` ("skip" | "stop"); the result's `.skipped` lists the items left out.

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
    _check_options(fmt, reader, set(spec) - (set(_HUB_KEYS) if hub is not None else set()))
    if path is not None:
        return reader(path, split, **spec)
    options = {_HUB_KEYS[k]: spec.pop(k) for k in list(spec) if k in _HUB_KEYS}
    loaded = _load_hub(hub, split, options)
    if split is not None:
        return reader(loaded, split, label=f"{hub}[{split}]", **spec)
    return Records.concat(reader(part, name, label=f"{hub}[{name}]", **spec) for name, part in loaded.items())


def load_vqa_dataset(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> datasets.Dataset:
    """`load_records` as an Arrow-backed `datasets.Dataset` (see records_to_dataset)."""
    return records_to_dataset(load_records(spec, split, **kw))
