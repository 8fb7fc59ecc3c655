"""Readers from each public dataset layout to `list[VQARecord]`, and `load_records(spec)` dispatching on `format`.

One module per release (`vqa_rad`, `slake`, `pathvqa`, `pmc_vqa`, `llava`, `llava_med_eval`, `reports` with IU X-ray,
`generic`), sharing `base` (options, registry entry, row access) and `tables` (files, splits, pickle refusal).
`READERS` maps each format name to its `Reader`, which carries the options it takes (a `ReaderOptions` subclass):
callers ask the entry (`accepts`, `reads_unlabeled`) rather than inspecting a function.

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

import os
from typing import TYPE_CHECKING, Any

from ...errors import shorten
from ..records import DataError, Records, records_to_dataset
from .base import BAD_RECORD_POLICIES, HUB_KEYS, Reader, ReaderOptions, strip_image_tokens
from .generic import GenericOptions, read_generic
from .llava import LlavaOptions, read_llava
from .llava_med_eval import read_llava_med_eval
from .pathvqa import read_pathvqa
from .pmc_vqa import read_pmc_vqa
from .reports import (DEFAULT_REPORT_INSTRUCTION, IUXrayOptions, ReportOptions, ReportTextOptions, read_iu_xray,
                      read_reports)
from .slake import SlakeOptions, read_slake
from .vqa_rad import VqaRadOptions, read_vqa_rad

if TYPE_CHECKING:
    import datasets

__all__ = [
    "READERS",
    "Reader",
    "ReaderOptions",
    "GenericOptions",
    "IUXrayOptions",
    "LlavaOptions",
    "ReportOptions",
    "ReportTextOptions",
    "SlakeOptions",
    "VqaRadOptions",
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

#: format name (a spec's "format", the CLI's --format) -> its reader
READERS: dict[str, Reader] = {reader.name: reader for reader in (
    read_vqa_rad, read_slake, read_pathvqa, read_pmc_vqa, read_llava, read_llava_med_eval, read_reports, read_iu_xray,
    read_generic)}


def _load_hub(hub: str, split: str | None, options: dict) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_dataset` with the spec's hub options; also takes local folders and packaged builders."""
    import datasets

    try:
        return datasets.load_dataset(hub, split=split, **options)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DataError(f"{hub}: cannot load dataset (split={split!r}): {type(err).__name__}: {err}") from err


def load_records(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> Records:
    """Read records from a spec: {"format": <READERS key>, "path": ... | "hub": ..., [split], reader options}.

    Reader options include `on_bad_record` ("skip" | "stop"); the result's `.skipped` lists the items left out.
    Unknown keys are refused by name before anything is read (`READERS[format].accepts` lists the known ones).

    A bare path means {"format": "generic", "path": path} (JSONL/JSON/CSV/TSV/parquet by suffix). With "hub", the
    data comes from `datasets.load_dataset(hub, split=..., name=config, revision=..., data_files=..., data_dir=...,
    cache_dir=...)` — a hub id, a local folder, or a packaged builder such as "parquet" with data_files — and is
    read by the format's reader; split=None reads every split. Keyword arguments override spec entries.
    """
    spec = {"format": "generic", "path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
    spec.update(kw)
    fmt = spec.pop("format", None)
    if fmt not in READERS:
        raise DataError(f"dataset spec needs 'format', one of {sorted(READERS)}; got {shorten(fmt)}")
    split = split if split is not None else spec.pop("split", None)
    spec.pop("split", None)
    hub, path = spec.pop("hub", None), spec.pop("path", None)
    if (hub is None) == (path is None):
        raise DataError(f"dataset spec for format {fmt!r} needs exactly one of 'path' or 'hub'")
    reader = READERS[fmt]
    hub_options = {HUB_KEYS[k]: spec.pop(k) for k in list(spec) if k in HUB_KEYS} if hub is not None else {}
    reader.check_keys(spec)
    if path is not None:
        return reader.read(path, reader.options(split=split, **spec))
    loaded = _load_hub(hub, split, hub_options)
    if split is not None:
        return reader.read(loaded, reader.options(split=split, label=f"{hub}[{split}]", **spec))
    return Records.concat(reader.read(part, reader.options(split=name, label=f"{hub}[{name}]", **spec))
                          for name, part in loaded.items())


def load_vqa_dataset(spec: str | os.PathLike | dict, split: str | None = None, **kw: Any) -> datasets.Dataset:
    """`load_records` as an Arrow-backed `datasets.Dataset` (see records_to_dataset)."""
    return records_to_dataset(load_records(spec, split, **kw))
