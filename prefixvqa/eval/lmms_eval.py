"""lmms-eval's SLAKE task: its prompt, answer normalisation, exact-match accuracy and its per-group accuracies.

Source: EvolvingLMMs-Lab/lmms-eval @ 0a75d6bab2ec6a5e402cecd153cb23b2b4b8ee71 (2026-07-14, "add SLAKE medical VQA
benchmark (#1392)"; unchanged at 75571cf): ``lmms_eval/tasks/slake/utils.py`` (``slake_doc_to_text``,
``normalize_answer``, ``slake_process_results``, the ``slake_*_accuracy`` aggregations) and
``lmms_eval/tasks/slake/_default_template_yaml`` / ``slake_zh.yaml`` (post prompts, metric list, greedy decoding with
32 new tokens). The rules are written anew here; the numbers equal the task's on the same responses:

* prompt: the question stripped, then "\\nAnswer the question using a single word or phrase." (Chinese questions:
  "\\n请用一个词或短语回答问题。"); no pre-prompt.
* normalisation of prediction and gold alike: stripped, lower-cased, parenthesised spans dropped (ASCII and
  full-width), ASCII and Chinese punctuation to spaces, spaces collapsed, "x ray"/"xray" -> "xray", yes/no synonyms
  (English and Chinese) -> "yes"/"no". An item is correct when both normalise to the same string.
* metrics: ``lmms_slake_accuracy`` over all items, open/closed by answer type, CT/MRI/X-ray by modality and the ten
  content types, each the mean over its items. Upstream reports 0.0 for a group without items; such a group is
  absent here (0.0 would read as a measured score).
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

from .hooks import RowScorer, register_prompt, register_scorer

__all__ = ["COMMIT", "SOURCE", "PROTOCOL_SPECS", "METRIC_LABELS", "normalize_answer", "prompt_for", "score_rows"]

REPO = "EvolvingLMMs-Lab/lmms-eval"
COMMIT = "0a75d6bab2ec6a5e402cecd153cb23b2b4b8ee71"
SOURCE = f"{REPO} @ {COMMIT}: lmms_eval/tasks/slake/utils.py, lmms_eval/tasks/slake/_default_template_yaml"

_POST_PROMPT = {"en": "\nAnswer the question using a single word or phrase.", "zh": "\n请用一个词或短语回答问题。"}
_YES = {"yes", "yeah", "yep", "true", "是", "是的", "有", "包含", "可以", "能", "会", "正常"}
_NO = {"no", "nope", "false", "否", "不是", "没有", "无", "不包含", "不能", "不会", "不可以", "不正常", "异常"}
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）"
_TO_SPACE = str.maketrans({char: " " for char in string.punctuation + _ZH_PUNCTUATION})

#: modality groups and content-type groups, as upstream names its metrics (value as normalised from the record)
MODALITIES = {"ct": "ct", "mri": "mri", "xray": "x-ray"}
CONTENT_TYPES = ("abnormality", "color", "kg", "modality", "organ", "plane", "position", "quantity", "shape", "size")
METRICS = ("lmms_slake_accuracy", "lmms_slake_open_accuracy", "lmms_slake_closed_accuracy",
           *(f"lmms_slake_{m}_accuracy" for m in MODALITIES), *(f"lmms_slake_{c}_accuracy" for c in CONTENT_TYPES))
METRIC_LABELS = {
    "lmms_slake_accuracy": "lmms-eval slake_accuracy (normalised exact match)",
    "lmms_slake_open_accuracy": "lmms-eval slake_open_accuracy",
    "lmms_slake_closed_accuracy": "lmms-eval slake_closed_accuracy",
    **{f"lmms_slake_{m}_accuracy": f"lmms-eval slake_{m}_accuracy (modality {v})" for m, v in MODALITIES.items()},
    **{f"lmms_slake_{c}_accuracy": f"lmms-eval slake_{c}_accuracy (content type)" for c in CONTENT_TYPES},
}


def normalize_answer(answer: Any) -> str:
    """lmms-eval SLAKE's ``normalize_answer`` rules, applied to prediction and gold alike."""
    text = "" if answer is None else str(answer)
    text = text.strip().lower()
    text = re.sub(r"\([^)]*\)", " ", text)
    text = re.sub(r"（[^）]*）", " ", text)
    text = re.sub(r"\s+", " ", text.translate(_TO_SPACE)).strip()
    if text in ("x ray", "xray"):
        text = "xray"
    return "yes" if text in _YES else "no" if text in _NO else text


def _group(value: Any) -> str:
    return str(value or "").strip().lower()


def prompt_for(record: Any) -> str:
    """The text lmms-eval's SLAKE task sends: the stripped question and the post prompt of its language."""
    lang = "zh" if _group((record.meta or {}).get("q_lang")) == "zh" else "en"
    return f"{record.question.strip()}{_POST_PROMPT[lang]}"


def score_rows(protocol: Any, records: Sequence[Any], predictions: Sequence[Mapping[str, Any]]
               ) -> list[dict[str, float]]:
    """Per item: correctness under ``lmms_slake_accuracy`` and under every group metric the item belongs to, as
    EvolvingLMMs-Lab/lmms-eval @ 0a75d6b scores it (lmms_eval/tasks/slake/utils.py)."""
    rows = []
    for record, pred in zip(records, predictions):
        correct = float(normalize_answer(pred["prediction"]) == normalize_answer(record.answer))
        row = {"lmms_slake_accuracy": correct}
        answer_type = _group(record.answer_type)
        if answer_type in ("open", "closed"):
            row[f"lmms_slake_{answer_type}_accuracy"] = correct
        modality, content = _group(record.meta.get("modality")), _group(record.meta.get("content_type"))
        for name, value in MODALITIES.items():
            if modality == value:
                row[f"lmms_slake_{name}_accuracy"] = correct
        if content in CONTENT_TYPES:
            row[f"lmms_slake_{content}_accuracy"] = correct
        rows.append(row)
    return rows


register_prompt("lmms_eval_slake", lambda record: (prompt_for(record), True))
register_scorer("lmms_eval_slake", RowScorer(METRICS, score_rows))

#: keyword arguments of the registered protocol (``eval.protocols`` builds and registers it)
PROTOCOL_SPECS: tuple[dict[str, Any], ...] = ({
    "name": "lmms_eval_slake", "item_metrics": METRICS, "primary": "lmms_slake_accuracy", "closed_mode": "generate",
    "prompt": "lmms_eval_slake", "scorer": "lmms_eval_slake", "datasets": ("slake",), "source": SOURCE,
    "description": "lmms-eval SLAKE: its prompt, every answer generated, normalised exact match; accuracy overall, "
                   "by answer type, modality and content type.",
},)

