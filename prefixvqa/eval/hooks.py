"""Extension points of the protocol registry, in a leaf module every protocol family can register into.

A toolkit's protocol (MedEvalKit, lmms-eval, ...) is more than a list of per-item metrics: it asks its own question
text (a *prompt builder*), parses and scores a whole answer set by its own rules (a *row scorer*, optionally with an
LLM *judge*), and may derive numbers from the averages (its *summary*). Family modules (`eval.medevalkit`,
`eval.lmms_eval`) register these here by name; `eval.protocols` reads them, so a family never imports the registry
it extends and no import circle forms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import EvaluationError

__all__ = ["PromptBuilder", "RowScorer", "Judge", "PROMPTS", "ROW_SCORERS", "JUDGES", "register_prompt",
           "register_scorer", "register_judge", "get_judge", "prompted"]

#: record -> (the question text the protocol asks, whether the record's choices are still listed by the template;
#: False when the text lists them itself)
PromptBuilder = Callable[[Any], "tuple[str, bool]"]
#: chat message lists (one per item, ``[{"role": "user", "content": ...}]``) -> the judge model's raw replies
#: (None where it failed), in order
Judge = Callable[[Sequence[list[dict[str, str]]]], Sequence["str | None"]]


@dataclass(frozen=True)
class RowScorer:
    """A toolkit's scoring of a whole answer set: ``score(protocol, records, predictions)`` gives one dict per item
    (metric -> value, only the metrics that apply to it; the protocol averages them like any per-item metric);
    ``summary(protocol, overall)`` adds numbers derived from the averages (as the toolkit prints them); ``judged``:
    the scorer accepts an LLM judge (``Protocol.judge``)."""

    metrics: tuple[str, ...]
    score: Callable[[Any, Sequence[Any], Sequence[Mapping[str, Any]]], list[dict[str, float]]]
    summary: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None
    judged: bool = False


PROMPTS: dict[str, PromptBuilder] = {}
ROW_SCORERS: dict[str, RowScorer] = {}
JUDGES: dict[str, Judge] = {}


def _register(table: dict[str, Any], what: str, name: str, value: Any, overwrite: bool) -> Any:
    if name in table and not overwrite:
        raise EvaluationError(f"{what} {name!r} is already registered (pass overwrite=True)")
    table[name] = value
    return value


def register_prompt(name: str, builder: PromptBuilder, *, overwrite: bool = False) -> PromptBuilder:
    """Name a prompt builder (``Protocol.prompt`` refers to it); refuse to replace one silently."""
    return _register(PROMPTS, "prompt", name, builder, overwrite)


def register_scorer(name: str, scorer: RowScorer, *, overwrite: bool = False) -> RowScorer:
    """Name a row scorer (``Protocol.scorer`` refers to it); refuse to replace one silently."""
    return _register(ROW_SCORERS, "scorer", name, scorer, overwrite)


def register_judge(name: str, judge: Judge, *, overwrite: bool = False) -> Judge:
    """Name an LLM judge (``get_protocol(name, judge=...)`` turns it on; off by default). The name goes into the
    manifest and metrics.json, so a judged number always says which judge gave it."""
    return _register(JUDGES, "judge", name, judge, overwrite)


def get_judge(name: str) -> Judge:
    """The registered judge ``name``; an unknown one is refused naming the registered ones."""
    if name not in JUDGES:
        raise EvaluationError(f"unknown judge {name!r}; registered: {sorted(JUDGES)} (register one with "
                              "prefixvqa.eval.hooks.register_judge)")
    return JUDGES[name]


def prompted(records: Sequence[Any], prompt: str | None) -> list[Any]:
    """The records as a protocol asks them: question replaced by the prompt builder's text (choices dropped where
    the text lists them itself); ``prompt=None`` leaves them as they are."""
    if prompt is None:
        return list(records)
    if prompt not in PROMPTS:
        raise EvaluationError(f"unknown prompt {prompt!r}; registered: {sorted(PROMPTS)}")
    out = []
    for record in records:
        text, keep_choices = PROMPTS[prompt](record)
        out.append(dataclasses.replace(record, question=text, choices=record.choices if keep_choices else None))
    return out
