"""Report generation pairs: generic report tables (MIMIC-CXR / IU X-ray style) and IU X-ray as released on Kaggle."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ... import prompts
from ...errors import shorten
from ..records import DataError, Records, VQARecord
from .base import Reader, ReaderOptions, Rows, extras, read_tables
from .tables import SourceTypeError, is_path, read_table

log = logging.getLogger(__name__)

DEFAULT_REPORT_INSTRUCTION = "Describe the findings of the chest X-ray."
LLAVA_RAD_INSTRUCTION = "llava_rad"  # instruction=... naming LLaVA-Rad's prompt (prompts.report_question)
ReportTarget = Literal["findings", "impression", "both"]
IU_XRAY_REPORTS = "indiana_reports.csv"
IU_XRAY_PROJECTIONS = "indiana_projections.csv"
IU_XRAY_VIEWS = {"frontal": "Frontal", "lateral": "Lateral"}
_IU_XRAY_COLUMNS = {"uid", "MeSH", "Problems", "image"}


@dataclass(frozen=True, kw_only=True)
class ReportTextOptions(ReaderOptions):
    """How a study becomes a question and an answer. question = `instruction` (+ " Indication: ..." with
    `with_indication=True`), or with instruction="llava_rad" LLaVA-Rad's wording with the indication; answer =
    `target`: findings, impression or both ("FINDINGS: ...\\nIMPRESSION: ..."). `skip_empty`: leave out studies
    whose target section is empty (as report-generation work does)."""

    instruction: str = DEFAULT_REPORT_INSTRUCTION
    target: ReportTarget = "findings"
    with_indication: bool = False
    skip_empty: bool = True


@dataclass(frozen=True, kw_only=True)
class ReportOptions(ReportTextOptions):
    """Report tables: `image_field` names the column holding each study's image (or list of images)."""

    image_field: str = "image"


@dataclass(frozen=True, kw_only=True)
class IUXrayOptions(ReportTextOptions):
    """IU X-ray: `view` ("frontal" or "lateral") picks each study's images from the projections file (`projections`;
    default: indiana_projections.csv beside the reports)."""

    view: Literal["frontal", "lateral"] = "frontal"
    projections: str | os.PathLike | None = None


def _report_answer(findings: str, impression: str, target: str) -> str:
    if target == "findings":
        return findings
    if target == "impression":
        return impression
    return "\n".join(f"{k.upper()}: {v}" for k, v in (("findings", findings), ("impression", impression)) if v)


def _report_item(row: dict, index: int, rows: Rows, split: str | None, stem: str, options: ReportTextOptions, *,
                 image_field: str, id_field: str = "id", dataset: str = "report",
                 extra_meta: dict | None = None) -> VQARecord | None:
    target = options.target
    needed = (image_field, "findings") if target == "both" and "impression" not in row else (image_field,)
    for key in (*needed, *(() if target == "both" else (target,))):
        if key not in row:
            raise DataError(f"{rows.where(index)}: missing field '{key}'")
    findings = rows.text(row, index, "findings", required=False) or ""
    impression = rows.text(row, index, "impression", required=False) or ""
    indication = rows.text(row, index, "indication", required=False) or ""
    answer = _report_answer(findings, impression, target)
    if not answer:
        if options.skip_empty:
            return None
        raise DataError(f"{rows.where(index)}: empty report target '{target}'")
    image, image_meta = rows.images(row[image_field], index, image_field)
    instruction = options.instruction
    if instruction == LLAVA_RAD_INSTRUCTION:  # LLaVA-Rad's own wording, with the study's indication when given
        question = prompts.report_question(indication)
    else:
        question = f"{instruction} Indication: {indication}" if options.with_indication and indication else instruction
    meta = {
        "dataset": dataset,
        "split": split,
        "task": "report",
        "findings": findings or None,
        "impression": impression or None,
        "indication": indication or None,
        **image_meta,
        **(extra_meta or {}),
        **extras(row, (image_field, "findings", "impression", "indication", id_field)),
    }
    record_id = rows.text(row, index, id_field, required=False) or f"{stem}/{index}"
    return VQARecord(record_id, image, question, answer, None, None, meta)


def read_report_table(source: Any, options: ReportOptions) -> Records:
    """Report pairs (MIMIC-CXR / IU X-ray style) CSV/JSONL: image, findings[, impression, indication][, id].

    Question and answer as `ReportTextOptions` says. Studies whose target section is empty are skipped
    (skip_empty=True) — a missing column is an error. JSONL may give a list of images per study. IU X-ray's Kaggle
    `indiana_reports.csv` is refused with a pointer to format "iu_xray": its `image` column describes the exam; the
    image files are listed in `indiana_projections.csv`.
    """

    def parse(table: Iterable[Any], rows: Rows, part: str | None, stem: str) -> list[VQARecord]:
        table = list(table)
        if table and isinstance(table[0], dict) and _IU_XRAY_COLUMNS <= set(table[0]) and \
                options.image_field == "image":
            raise DataError(f"{rows.label}: this is IU X-ray as released on Kaggle: its 'image' column describes the "
                            f"exam ({shorten(table[0]['image'])}), it names no file. Read it with format 'iu_xray', "
                            f"which takes each study's image files from {IU_XRAY_PROJECTIONS} beside it")
        return rows.each(table, lambda row, index: _report_item(row, index, rows, part, stem, options,
                                                                image_field=options.image_field))

    return read_tables(source, options, suffixes=(".csv", ".tsv", ".jsonl", ".json", ".parquet"), parse=parse)


def _iu_xray_image_root(folder: Path) -> Path:
    """The Kaggle release unpacks its PNGs into images/images_normalized/; take the first candidate present."""
    candidates = [folder / "images" / "images_normalized", folder / "images_normalized", folder / "images"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _projections(proj_file: Path, view: str) -> dict[str, list[str]]:
    """uid -> image file names of that view, from indiana_projections.csv."""
    by_uid: dict[str, list[str]] = {}
    for index, row in enumerate(read_table(proj_file)):
        if not isinstance(row, dict) or not {"uid", "filename", "projection"} <= set(row):
            raise DataError(f"{proj_file} item {index}: expected columns uid, filename, projection")
        if str(row["projection"]).strip().lower() == view:
            by_uid.setdefault(str(row["uid"]).strip(), []).append(str(row["filename"]).strip())
    return by_uid


def _iu_xray_studies(table: Iterable[Any], rows: Rows, part: str | None, stem: str, options: IUXrayOptions,
                     by_uid: dict[str, list[str]], proj_file: Path) -> list[VQARecord]:
    """Reports joined with their images of the chosen view; studies without such an image are left out (logged)."""
    without: list[str] = []

    def one(row: dict, index: int) -> VQARecord | None:
        uid = rows.text(row, index, "uid")
        files = by_uid.get(uid)
        joined = {**{k: v for k, v in row.items() if k != "image"}, "image": (files or [None])[0]}
        if files and len(files) > 1:
            joined["image"] = files
        record = _report_item(joined, index, rows, part, stem, options, image_field="image", id_field="uid",
                              dataset="iu_xray", extra_meta={"exam": row.get("image"), "view": options.view})
        if record is not None and not files:  # the study has no image of this view: not this view's data
            without.append(uid)
            return None
        return record

    records = rows.each(table, one)
    if without:
        log.warning("%s: %d studies (with %s text) have no %s image in %s and are left out (uids %s%s)",
                    rows.label, len(without), options.target, IU_XRAY_VIEWS[options.view], proj_file,
                    ", ".join(without[:5]), ", ..." if len(without) > 5 else "")
    return records


def read_iu_xray_release(source: Any, options: IUXrayOptions) -> Records:
    """IU X-ray (Open-i) as released on Kaggle: `indiana_reports.csv` (uid, MeSH, Problems, image, indication,
    comparison, findings, impression) + `indiana_projections.csv` (uid, filename, projection) + images/.

    `source` is the folder or the reports CSV (`projections` defaults to the CSV beside it). The reports' `image`
    column describes the exam (kept as meta["exam"]); each study's files come from the projections file, joined by
    uid, for the chosen `view` ("frontal" or "lateral"; a study with several such images keeps the first as its image
    and all of them in meta["images"]). Studies without an image of that view are left out (one log line counts
    them), as are studies whose target section is empty (skip_empty). Images resolve against `image_root` (default:
    images/images_normalized/ as the Kaggle archive unpacks). Report options as in `ReportTextOptions`. The release
    has no split: split must be None.
    """
    if not is_path(source):
        raise SourceTypeError("read_iu_xray reads the released CSV files: give their folder or indiana_reports.csv")
    reports = Path(source) / IU_XRAY_REPORTS if Path(source).is_dir() else Path(source)
    if options.split is not None:
        raise DataError(f"{reports}: IU X-ray (Kaggle) has no split; read it with split=None and split it yourself")
    proj_file = Path(options.projections) if options.projections is not None else reports.parent / IU_XRAY_PROJECTIONS
    by_uid = _projections(proj_file, options.view)
    root = Path(options.image_root) if options.image_root is not None else _iu_xray_image_root(reports.parent)
    hint = f"Image file names come from {proj_file} (column 'filename'), resolved against image_root={root}"
    return read_tables(reports, options.but(image_root=root), suffixes=(".csv",), hint=hint,
                       parse=lambda table, rows, part, stem: _iu_xray_studies(table, rows, part, stem, options,
                                                                              by_uid, proj_file))


read_reports = Reader("report", read_report_table, ReportOptions, "report pairs: image + findings/impression")
read_iu_xray = Reader("iu_xray", read_iu_xray_release, IUXrayOptions, "IU X-ray as released on Kaggle (CSV pair)")
