"""What every reader shares: the options object (`ReaderOptions`, one subclass per format that takes more), the
registry entry (`Reader`), field access that names file, item and field (`Rows`), the bad-record policy, the
image/question/answer table parser, the `<image>` token rule and the driver from files to checked `Records`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ...errors import shorten
from ..records import DataError, Records, SkippedRecord, VQARecord, normalize_answer_type
from .tables import is_path, read_table, rows_of, table_sources

log = logging.getLogger(__name__)

BadRecordPolicy = Literal["skip", "stop"]
BAD_RECORD_POLICIES: tuple[str, ...] = get_args(BadRecordPolicy)
SPEC_KEYS = ("format", "path", "hub", "split")  # a data spec's own keys; everything else is a reader option
HUB_KEYS = {"config": "name", "revision": "revision", "data_files": "data_files", "data_dir": "data_dir",
            "cache_dir": "cache_dir"}  # spec key -> datasets.load_dataset argument
IMAGE_TOKEN = "<image>"
_MISSING = object()


# -------------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class ReaderOptions:
    """The settings every reader takes; a format with more subclasses it (its fields are what a data spec may give).

    `split`: which split to read (None: all the source holds); `image_root`: where relative image names resolve
    (None: the release's image folder); `check_images`: report missing image files at read time (else at load time);
    `on_bad_record`: "skip" a malformed item (logged, listed in `Records.skipped`) or "stop" at it; `label`: the name
    errors give an in-memory source. Values limited to a `Literal` are checked on construction."""

    split: str | None = None
    image_root: str | os.PathLike | None = None
    check_images: bool = True
    on_bad_record: BadRecordPolicy = "skip"
    label: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in _literal_fields(type(self)):
            value = getattr(self, name)
            if value not in allowed:
                raise DataError(f"{name} must be one of {list(allowed)}, got {shorten(value)}")

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Keys a data spec may give this format besides `SPEC_KEYS` (`label` is set by the loader, not a spec)."""
        return frozenset(f.name for f in fields(cls)) - {"split", "label"}

    def but(self, **changes: Any) -> ReaderOptions:
        """A copy with some settings changed (a folder reader reading each split file with split= that file's)."""
        return replace(self, **changes)


@functools.cache
def _literal_fields(cls: type[ReaderOptions]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """(field, allowed values) for the options fields typed as a `Literal`: the one spelling of what is allowed."""
    return tuple((name, get_args(hint)) for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal)


@dataclass(frozen=True)
class Reader:
    """One dataset format in the registry (`READERS`): its name (a spec's `format`, the CLI's `--format`), the options
    it takes and the function that reads a source with them. Callers ask the entry what a format accepts
    (`accepts`, `reads_unlabeled`) instead of inspecting signatures. Calling it reads:
    `READERS["slake"](path, "train", q_lang="zh")`."""

    name: str
    read: Callable[[Any, Any], Records]
    options: type[ReaderOptions] = ReaderOptions
    summary: str = ""

    @property
    def accepts(self) -> frozenset[str]:
        """The option keys a data spec may give this format (besides format, path, hub and split)."""
        return self.options.option_names()

    @property
    def reads_unlabeled(self) -> bool:
        """Whether it can read items without answers (`require_answer=False`), for prediction on new images."""
        return "require_answer" in self.accepts

    def check_keys(self, keys: Iterable[str], allowed: Iterable[str] = ()) -> None:
        """Refuse unknown spec keys by name (a misspelt option would otherwise be silently ignored or a traceback)."""
        unknown = set(keys) - self.accepts - set(allowed)
        if unknown:
            raise DataError(f"dataset spec for format {self.name!r}: unknown key(s) {sorted(unknown)}; expected some "
                            f"of {sorted(self.accepts | {*SPEC_KEYS, *HUB_KEYS})}")

    def __call__(self, source: Any, split: str | None = None, **options: Any) -> Records:
        """Read `source` (a path, a `datasets.Dataset` or a list of row dicts) with these options."""
        self.check_keys(options, allowed=("label",))
        return self.read(source, self.options(split=split, **options))


# ------------------------------------------------------------------------------------------------------ row access
class Rows:
    """Field access for the rows of one file, producing errors that name the file, item index and field, and the
    bad-record policy: a malformed item is skipped (logged, kept in `skipped`) or stops the read."""

    def __init__(self, label: str, image_root: str | os.PathLike | None, check_images: bool,
                 on_bad_record: str = "skip", hint: str = "") -> None:
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
        """How errors name an item: "<file> item <index>" (0-based)."""
        return f"{self.label} item {index}"

    def row(self, row: Any, index: int) -> dict:
        """The item as a dict of named fields; anything else is a bad record."""
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
        """The release's answer type as "open"/"closed" (None when absent); an unknown spelling names the field."""
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
        """The file's records with its skipped items; image files found missing are one error naming them."""
        if self.missing:
            shown = "; ".join(f"item {i}: {p}" for i, p in self.missing[:10])
            more = f" (and {len(self.missing) - 10} more)" if len(self.missing) > 10 else ""
            hint = f" {self.hint}." if self.hint else ""
            raise DataError(
                f"{self.label}: {len(self.missing)} image file(s) not found: {shown}{more}.{hint} Check image_root, "
                "or pass check_images=False to report missing files only when they are loaded."
            )
        return Records(records, self.skipped)


# --------------------------------------------------------------------------------------------------- shared parsing
def extras(row: dict, used: Iterable[str]) -> dict:
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


def derived_answer_type(answer: str) -> str:
    """Releases without an answer type (PathVQA, HF VQA-RAD): yes/no answers are closed, the rest open."""
    return "closed" if answer.strip().lower() in ("yes", "no") else "open"


def parse_choices(value: Any, rows: Rows, index: int) -> list[str] | None:
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


def image_position(text: str, offsets: list[int], where: str) -> str | None:
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


def image_qa_records(table: Iterable[Any], rows: Rows, *, dataset: str, split: str | None, stem: str,
                     columns: Mapping[str, str] | None = None, derive_answer_type: bool = False,
                     require_answer: bool = True) -> list[VQARecord]:
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
        choices = parse_choices(row.get(col["choices"]), rows, index)
        if choices is not None and answer is not None and answer not in choices:
            raise DataError(f"{rows.where(index)}: field '{col['answer']}' {shorten(answer)} is not one of the choices")
        answer_type = rows.answer_type(row.get(col["answer_type"]), index, col["answer_type"])
        meta = {"dataset": dataset, "split": split, **image_meta}
        if answer_type is None and derive_answer_type and answer is not None:
            answer_type, meta["answer_type_source"] = derived_answer_type(answer), "derived: yes/no answers"
        meta.update(extras(row, col.values()))
        question, offsets = strip_image_tokens(question)
        record_id = rows.text(row, index, col["id"], required=False) or f"{stem}/{index}"
        return VQARecord(record_id, image, question, answer, answer_type, choices, meta,
                         image_position=image_position(question, offsets, rows.where(index)))

    return rows.each(table, one)


# ---------------------------------------------------------------------------------------------------------- driver
Parse = Callable[[Iterable[Any], Rows, "str | None", str], list[VQARecord]]  # (table, rows, split, file stem)


def read_tables(source: Any, options: ReaderOptions, *, suffixes: tuple[str, ...], parse: Parse,
                default_root: Callable[[Path], Path | None] = lambda f: f.parent, hint: str = "") -> Records:
    """Shared driver: each file (or the in-memory source) -> parse(rows, ctx, split, stem) -> checked records.

    Images resolve against `options.image_root`, else `default_root(file)`. A read that gives no records is an error
    (a wrong split, a filter that matches nothing, every item bad)."""
    split, label = options.split, options.label
    if not is_path(source):
        table, name = rows_of(source, label)
        rows = Rows(name, options.image_root, options.check_images, options.on_bad_record, hint)
        return _nonempty(rows.finish(parse(table, rows, split, name)), name, split)
    parts = []
    for file, file_split in table_sources(source, split, suffixes):
        root = options.image_root if options.image_root is not None else default_root(file)
        rows = Rows(label or str(file), root, options.check_images, options.on_bad_record, hint)
        parts.append(rows.finish(parse(read_table(file), rows, file_split, file.name.split(".")[0])))
    return _nonempty(Records.concat(parts), label or str(source), split)


def _nonempty(records: Records, where: str, split: str | None) -> Records:
    if records:
        return records
    which = f" for split {split!r}" if split else ""
    bad = (f"; all {len(records.skipped)} item(s) were bad, the first: {records.skipped[0].where}: "
           f"{records.skipped[0].reason}") if records.skipped else ""
    raise DataError(f"{where}: no records{which}{bad}")
