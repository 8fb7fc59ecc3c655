"""LLaVA-Med's own evaluation questions (`data/eval/llava_med_eval_qa50_qa.jsonl`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..records import DataError, Records, VQARecord
from .base import IMAGE_TOKEN, Reader, ReaderOptions, Rows, extras, image_position, read_tables, strip_image_tokens


def _llava_med_eval(table: Iterable[Any], rows: Rows, split: str | None) -> list[VQARecord]:
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
                **extras(row, used)}
        return VQARecord(rows.text(row, index, "question_id"), image, question, rows.text(row, index, "gpt4_answer"),
                         None, None, meta, image_position=image_position(question, offsets, rows.where(index)))

    return rows.each(table, one)


def read(source: Any, options: ReaderOptions) -> Records:
    """LLaVA-Med's own evaluation questions (`data/eval/llava_med_eval_qa50_qa.jsonl`): JSON Lines of
    {question_id, image, text, gpt4_answer, type, domain, fig_caption, ...}.

    question = `text` without its `<image>` token (whose place goes to `image_position`), answer = `gpt4_answer`
    (the GPT-4 reference LLaVA-Med scores against), id = question_id. `type` (conversation / detailed_description)
    becomes meta["question_type"]; the true keys of `domain` (chest_xray, mri, ct_scan, histology, gross) become
    meta["modality"], so reports break results down the way the paper does. Images resolve against `image_root`
    (default: the file's folder; upstream keeps them in data/images/).
    """
    return read_tables(source, options, suffixes=(".jsonl", ".json"),
                       parse=lambda table, rows, part, stem: _llava_med_eval(table, rows, part))


read_llava_med_eval = Reader("llava_med_eval", read, ReaderOptions, "LLaVA-Med's evaluation questions (JSONL)")
