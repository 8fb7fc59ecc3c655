"""LLaVA / LLaVA-Med conversation files: [{id, image, conversations: [{from, value}, ...]}, ...]."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ...errors import shorten
from ..records import DataError, Records, VQARecord
from .base import IMAGE_TOKEN, Reader, ReaderOptions, Rows, extras, image_position, read_tables, strip_image_tokens

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


@dataclass(frozen=True, kw_only=True)
class LlavaOptions(ReaderOptions):
    """`dataset` is the name put in meta; `per_turn=True` gives one record per exchange ("<id>#<turn>") instead of
    one per conversation, to evaluate every turn."""

    dataset: str = "llava"
    per_turn: bool = False


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
            position = image_position(pending, offsets, at) if offsets else position
        elif role in _GPT and pending is not None:
            answer = turn["value"].strip()
            if not answer:
                raise DataError(f"{at}: empty answer")
            pairs.append((pending, answer))
            pending = None
        else:
            expected = "a 'human'" if pending is None else "a 'gpt'"
            raise DataError(f"{at}: expected {expected} turn, got {shorten(turn['from'])}")
    if pending is not None:
        raise DataError(f"{where}: conversations end with a 'human' turn that has no answer")
    return pairs, position, system


def _llava(table: Iterable[Any], rows: Rows, split: str | None, dataset: str, per_turn: bool) -> list[VQARecord]:
    def one(row: dict, index: int) -> list[VQARecord]:
        item_id = rows.text(row, index, "id")
        image, image_meta = rows.images(row.get("image"), index, "image")
        pairs, position, system = _conversation(row.get("conversations"), rows.where(index))
        answer_type = rows.answer_type(row.get("answer_type"), index)
        meta = {"dataset": dataset, "split": split, "source_id": item_id, "n_turns": len(pairs), **image_meta,
                **extras(row, ("id", "image", "conversations", "answer_type"))}
        if system is not None:
            meta["system"] = system
        ends = range(1, len(pairs) + 1) if per_turn else [len(pairs)]
        return [VQARecord(item_id if len(pairs) == 1 or not per_turn else f"{item_id}#{n - 1}", image,
                          *pairs[n - 1], answer_type, None, {**meta, "turn": n - 1} if per_turn else meta,
                          history=pairs[:n - 1], image_position=position) for n in ends]

    return rows.each(table, one)


def read(source: Any, options: LlavaOptions) -> Records:
    """LLaVA / LLaVA-Med conversation JSON or JSONL: [{id, image, conversations: [{from, value}, ...]}, ...].

    One record per conversation, as LLaVA trains: question/answer are the last exchange, `history` the earlier
    ones, and training supervises every answer. `<image>` is removed from the text; where it stood in the first
    question (before or after it) is kept in `image_position` (a token in the middle of a question, in a later turn,
    or twice is a bad record). per_turn=True gives one record per exchange instead ("<id>#<turn>", with the exchanges
    before it as history), to evaluate every turn. Items without an image are text-only (image None); a list of
    images goes to meta["images"]. VQA splits' answer_type is kept. JSON Lines content in a .json file is read.
    """
    return read_tables(source, options, suffixes=(".json", ".jsonl"),
                       parse=lambda table, rows, part, stem: _llava(table, rows, part, options.dataset,
                                                                    options.per_turn))


read_llava = Reader("llava", read, LlavaOptions, "LLaVA / LLaVA-Med conversation JSON or JSONL")
