"""The processor: records in, tensors out (the pattern of transformers' LlavaProcessor).

It owns everything between a dataset record and the model's tensors: the prompt template, tokenisation (the last
prompt piece and the answer are tokenised together, so tokenizers that merge across the boundary give the ids they
give in context), prompt shortening (never the answer), label masking, image loading with each record's view settings
(DICOM frame/window, NIfTI slice), the tower's preprocessing (open_clip's transform or the transformers image
processor, LLaVA's pad-to-square: `data/transforms.py`) and collation with padding. Training, evaluation, the
feature cache, `answer`, `score_choices`, the CLI and the demo all go through one instance, saved in the adapter folder
(`processor_config.json` + the tokenizer files).

A batch is a dict of tensors::

    input_ids       (B, T)  token ids; image slots and padding hold `pad_id` (never read: they are masked or replaced)
    attention_mask  (B, T)  1 on real tokens and image slots
    image_mask      (B, T)  True on the L positions of each image slot, row by row, slot by slot
    labels          (B, T)  answer ids (+ EOS) where supervised, IGNORE (-100) elsewhere   [with answers]
                            (a conversation supervises every assistant answer, each closed as the template closes it)
    pixel_values    (I, 3, H, W)  one per distinct image                                     [with images]
    image_index     (S,)    which of the I images fills each of the S slots (images shared by several questions)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch

from .. import prompts
from ..config import TemplateConfig
from ..errors import PrefixVQAError
from . import images as image_files  # looked up at call time: one patchable image path
from .images import ImageLoadError, image_bytes_hash

if TYPE_CHECKING:
    from .records import VQARecord

log = logging.getLogger(__name__)

IGNORE = -100
PROCESSOR_NAME = "processor_config.json"
VIEW_KEYS = ("frame", "slice_index", "window")  # load_image arguments that change the pixels of one file


class ProcessorError(PrefixVQAError, ValueError):
    """Inputs the processor cannot lay out (image count vs. slots, a template longer than max_length) or a saved
    processor that does not match the encoder; the message names the record, question or file."""


class Sample(NamedTuple):
    """One tokenised item: text pieces around the image slots (n slots -> n + 1 pieces) and the answer ids.

    `supervised` marks the earlier answers of a conversation inside the pieces, (piece, start, end) token spans:
    training labels them too; generation and scoring read them as prompt."""

    pieces: list[list[int]]
    answer: list[int]
    supervised: tuple[tuple[int, int, int], ...] = ()


def view_args(record: VQARecord) -> dict[str, Any]:
    """The image view a record asks for through its meta (DICOM frame, NIfTI slice, window): one rule everywhere."""
    meta = record.meta or {}
    return {k: (tuple(meta[k]) if k == "window" else meta[k]) for k in VIEW_KEYS if meta.get(k) is not None}


def image_key(image: Any, view: dict[str, Any] | None = None) -> str:
    """When two image slots hold "the same image" (loaded, transformed and encoded once): the same file path, the
    same encoded bytes (by digest), or, for anything else (a PIL image), the same object; always with the same view.

    The one rule for `MedVQAProcessor.__call__` and for batches collated from `encode_record` items. An object key is
    only meaningful while the object lives, so it is compared within one call or one collated batch, never stored."""
    if isinstance(image, dict):  # a {bytes, path} cell: its bytes when it has them (what load_image decodes)
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (str, os.PathLike)):
        ref = "path:" + os.fspath(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        ref = "sha256:" + image_bytes_hash(image)
    else:
        ref = f"object:{id(image)}"
    return json.dumps([ref, view or {}], sort_keys=True, default=str)


def record_label(record: VQARecord) -> str:
    """A human name for a record's image in logs and errors: the file path, the source's name, or the id."""
    if isinstance(record.image, (str, os.PathLike)):
        return str(record.image)
    return str((record.meta or {}).get("image_name") or f"<bytes of record {record.id}>")


class MedVQAProcessor:
    """Template + tokenizer + image transform. Built by the model from its parts; does no I/O in the constructor."""

    def __init__(self, tokenizer: Any, template: TemplateConfig, transform: Callable[[Any], torch.Tensor],
                 image_seq_length: int, *, context_length: int | None = None, answer_room: int = 0):
        self.tokenizer, self.template, self.transform = tokenizer, template, transform
        self.image_seq_length = image_seq_length  # L: prefix vectors per image slot (the mapper's output length)
        # set by the model from its decoder (not saved): positions one sequence may fill (prefix vectors + tokens;
        # soft-prompt virtual tokens already taken off), None = no limit beyond template.max_length; and positions a
        # prompt without an answer leaves free for the answer to be generated
        self.context_length, self.answer_room = context_length, answer_room
        self._stop_criteria: dict[tuple[str, ...], Any] = {}

    def use_template(self, template: TemplateConfig) -> None:
        """Lay out every later sample with `template` (a curriculum stage's own, set through the model's config)."""
        if template != self.template:
            self.template = template
            self.__dict__.pop("start_ids", None)  # the cached opening tokens follow `template.start`

    # --- images -------------------------------------------------------------------------------------------------
    @staticmethod
    def load_image(image: Any, view: dict[str, Any] | None = None, name: str | None = None) -> Any:
        """Path, bytes, {bytes, path} cell or PIL image -> 8-bit RGB PIL image, with the record's view applied."""
        return image_files.load_image(image, **(view or {}), name=name)

    def load_record_image(self, record: VQARecord) -> Any:
        """The record's image with its own view (DICOM frame, NIfTI slice, window), named by path or id in errors:
        what training, evaluation and the feature cache all decode."""
        return self.load_image(record.image, view_args(record), record_label(record))

    def pixel_values(self, pictures: Sequence[Any], views: Sequence[dict[str, Any] | None] | None = None
                     ) -> torch.Tensor:
        """The tower's transform on each image (open_clip's eval transform or the image processor) -> (I, 3, H, W)."""
        views = views if views is not None else [None] * len(pictures)
        return torch.stack([self.transform(self.load_image(im, v)) for im, v in zip(pictures, views, strict=True)])

    def transform_fingerprint(self) -> str:
        """Identifies the preprocessing, so a cache or an adapter built with another transform is never reused."""
        return hashlib.sha256(repr(self.transform).encode()).hexdigest()[:16]

    # --- text ---------------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        """The id written into padding and image slots (never read: masked or replaced): the tokenizer's pad token,
        else its EOS, else 0, so tokenizers without a pad token (GPT-2, Llama) still batch."""
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def stop_strings(self) -> list[str]:
        """Texts that end a generated answer under this template (e.g. LLaVA-Med's "###"), for generation."""
        return prompts.stop_strings(self.template.name)

    def _split(self, prompt: str, target: str | None) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids): tokenised together, so tokenizers that merge across the boundary give the ids
        they give in context; the target starts where the joint ids leave the prompt's own ids."""
        own = self._encode(prompt)
        if target is None:
            return own, []
        joint = self._encode(prompt + target)
        keep = 0
        while keep < min(len(own), len(joint)) and own[keep] == joint[keep]:
            keep += 1
        return joint[:keep], joint[keep:]

    def _pieces(self, question: str, answer: str | None, shots: Sequence[tuple[str, str]],
                choices: Sequence[str] = (), history: Sequence[tuple[str, str]] = (),
                position: str | None = None) -> Sample:
        t = self.template
        segs = prompts.segments(t.name, question, position=position or t.image_position, system=t.system,
                                shots=shots, history=history, tokenizer=self.tokenizer, choices=choices)
        eos = self.tokenizer.eos_token_id
        end = [eos] if eos is not None and prompts.ends_with_eos(t.name) else []
        pieces: list[list[int]] = [[]]
        supervised: list[tuple[int, int, int]] = []

        def place(prompt: str, target: str | None) -> list[int]:
            *before, last = prompts.split_on_images(prompt)
            for text in before:
                pieces[-1] += self._encode(text)
                pieces.append([])
            ids, target_ids = self._split(last, target)
            pieces[-1] += ids
            return target_ids

        for k in range(0, len(segs) - 1, 2):  # a conversation's earlier exchanges: answers supervised in place
            ids = place(segs[k], segs[k + 1]) + end
            supervised.append((len(pieces) - 1, len(pieces[-1]), len(pieces[-1]) + len(ids)))
            pieces[-1] += ids
        target = prompts.answer_text(t.name, answer) if answer is not None else None
        answer_ids = place(segs[-1], target) + (end if answer is not None else [])
        # the start tokens open the sequence; MedVInT put its visual queries before the tokenised text (and its BOS)
        first = next((k for k, p in enumerate(pieces) if p), 0) if prompts.image_before_start(t.name) else 0
        start = self.start_ids
        if start and pieces[first][:len(start)] != start:
            pieces[first] = start + pieces[first]
            supervised = [(j, a + len(start) * (j == first), b + len(start) * (j == first)) for j, a, b in supervised]
        return Sample(pieces, answer_ids, tuple(supervised))

    @functools.cached_property
    def start_ids(self) -> list[int]:
        """Token ids every sequence opens with (`template.start`): for "tokenizer", those the tokenizer adds in front
        of a text by itself, found by encoding one word with and without special tokens."""
        tok, mode = self.tokenizer, self.template.start
        if mode == "none" or (mode == "bos" and tok.bos_token_id is None):
            return []
        if mode == "bos":
            return [tok.bos_token_id]
        plain = tok("x", add_special_tokens=False)["input_ids"]
        special = tok("x", add_special_tokens=True)["input_ids"]
        for i in range(len(special) - len(plain) + 1):
            if special[i:i + len(plain)] == plain:
                return list(special[:i])
        return []

    def tokenize(self, question: str, answer: str | None = None, shots: Sequence[tuple[str, str]] = (),
                 record_id: str | None = None, choices: Sequence[str] = (), *,
                 history: Sequence[tuple[str, str]] = (), position: str | None = None) -> Sample:
        """Token ids of the prompt pieces and of the answer (+ EOS where the template ends with it). `choices` are
        listed in the prompt by templates that show them (MedVInT); `history` holds a conversation's earlier
        exchanges (the image in the first), `position` where the record puts its image (None: the template's).

        Prompt + answer longer than `token_limit` (`template.max_length`, within what the decoder's context leaves):
        first a conversation's text-only earlier exchanges are dropped (oldest first; the one holding the image
        stays), then the question is shortened; never an answer or a candidate. It warns with the record."""
        history = list(history)
        answered = answer is not None
        sample = self._pieces(question, answer, shots, choices, history, position)
        excess = self._excess(sample, answered)
        if excess <= 0:
            return sample
        dropped = 0
        while excess > 0 and len(history) > 1:
            del history[1]
            dropped += 1
            sample = self._pieces(question, answer, shots, choices, history, position)
            excess = self._excess(sample, answered)
        q_ids = self._encode(question)
        while excess > 0 and q_ids:
            q_ids = q_ids[:max(0, len(q_ids) - excess)]
            sample = self._pieces(self.tokenizer.decode(q_ids), answer, shots, choices, history, position)
            excess = self._excess(sample, answered)
        limit, context_bound = self.token_limit(len(sample.pieces) - 1, answered), self._context_bound(sample)
        bound = f" (the decoder's context leaves {limit} here)" if context_bound else ""
        if excess > 0:
            fix = "use a decoder with a longer context or a shorter prefix" if context_bound else "raise it"
            raise ProcessorError(f"record {record_id or question[:40]!r}: the template and answers alone take "
                                 f"{limit + excess} tokens, over template.max_length={self.template.max_length}"
                                 f"{bound}; {fix}")
        what = f"{dropped} earlier exchange(s) of the conversation dropped" if dropped else ""
        if len(q_ids) < len(self._encode(question)):
            what += ("; " if what else "") + f"question shortened to {len(q_ids)} tokens"
        log.warning("record %s: prompt longer than template.max_length=%d tokens%s; %s",
                    record_id or repr(question[:40]), self.template.max_length, bound, what)
        return sample

    def token_limit(self, slots: int, answered: bool = True) -> int:
        """Prompt + answer tokens one sequence may hold: `template.max_length`, and never more than the decoder's
        context leaves beside the visual prefixes of its `slots` image slots (less `answer_room` when the answer is
        still to be generated), so no position past the decoder's table is ever used."""
        limit = self.template.max_length
        if self.context_length is not None:
            room = 0 if answered else self.answer_room
            limit = min(limit, self.context_length - slots * self.image_seq_length - room)
        return limit

    def _context_bound(self, sample: Sample) -> bool:
        """Whether the decoder's context, not a larger `template.max_length`, sets this sample's limit."""
        prefixes = (len(sample.pieces) - 1) * self.image_seq_length
        return self.context_length is not None and self.context_length - prefixes <= self.template.max_length

    def _excess(self, sample: Sample, answered: bool) -> int:
        used = sum(map(len, sample.pieces)) + len(sample.answer)
        return used - self.token_limit(len(sample.pieces) - 1, answered)

    def tokenize_record(self, record: VQARecord, answer: str | None) -> Sample:
        """`tokenize` with the record's choices, conversation history and image position (answer: its own, a
        candidate, or None to generate)."""
        return self.tokenize(record.question, answer, record_id=record.id, choices=record.choices or (),
                             history=record.history, position=record.image_position)

    # --- batches ------------------------------------------------------------------------------------------------
    def pad(self, samples: Sequence[Sample], padding_side: str = "right", labels: bool = True
            ) -> dict[str, torch.Tensor]:
        """Lay samples out as (B, T) tensors with L image positions per slot; pads on the given side."""
        L, pad = self.image_seq_length, self.pad_id
        rows = []
        for s in samples:
            ids, img, starts = [], [], []
            for j, piece in enumerate(s.pieces):
                if j:
                    ids += [pad] * L
                    img += [True] * L
                starts.append(len(ids))
                ids += piece
                img += [False] * len(piece)
            lab = [IGNORE] * len(ids) + list(s.answer)
            for j, a, b in s.supervised:  # a conversation's earlier answers
                lab[starts[j] + a:starts[j] + b] = ids[starts[j] + a:starts[j] + b]
            ids += s.answer
            img += [False] * len(s.answer)
            rows.append((ids, img, lab))
        B, T = len(rows), max(len(r[0]) for r in rows)
        out = {"input_ids": torch.full((B, T), pad, dtype=torch.long),
               "attention_mask": torch.zeros(B, T, dtype=torch.long),
               "image_mask": torch.zeros(B, T, dtype=torch.bool)}
        if labels:
            out["labels"] = torch.full((B, T), IGNORE, dtype=torch.long)
        for i, (ids, img, lab) in enumerate(rows):
            span = slice(T - len(ids), T) if padding_side == "left" else slice(0, len(ids))
            out["input_ids"][i, span] = torch.tensor(ids, dtype=torch.long)
            out["attention_mask"][i, span] = 1
            out["image_mask"][i, span] = torch.tensor(img, dtype=torch.bool)
            if labels:
                out["labels"][i, span] = torch.tensor(lab, dtype=torch.long)
        return out

    def __call__(self, images: Sequence[Any] | None = None, questions: Sequence[str] = (),
                 answers: Sequence[str] | None = None, *, shots: Sequence[Sequence[tuple[str, str]]] | None = None,
                 views: Sequence[dict[str, Any] | None] | None = None, padding_side: str = "right",
                 ids: Sequence[str] | None = None, choices: Sequence[Sequence[str]] | None = None
                 ) -> dict[str, torch.Tensor]:
        """Images (one per question, or per question a list: shots' images then the query's) + questions
        (+ answers) -> a batch. The same image object given for several questions is loaded and encoded once."""
        n = len(questions)
        shots = shots if shots is not None else [()] * n
        answers_ = answers if answers is not None else [None] * n
        ids_ = ids if ids is not None else [None] * n
        choices_ = choices if choices is not None else [()] * n
        samples = [self.tokenize(q, a, s, i, c)
                   for q, a, s, i, c in zip(questions, answers_, shots, ids_, choices_, strict=True)]
        batch = self.pad(samples, padding_side, labels=answers is not None)
        if images is not None:
            if len(images) != n:
                raise ProcessorError(f"{len(images)} image entries for {n} questions: give one per question (a list "
                                     "of images for a few-shot question)")
            per_item = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
            for k, (item, sample, item_shots) in enumerate(zip(per_item, samples, shots, strict=True)):
                slots = len(sample.pieces) - 1
                if len(item) != slots:
                    raise ProcessorError(
                        f"question {k}: its prompt has {slots} image slot(s) ({len(item_shots)} shot(s) + the "
                        f"question) but {len(item)} image(s) were given; give a list per question: one image per "
                        f"shot, in shot order, then the question's image")
            item_views = views if views else [None] * n
            unique: dict[str, int] = {}
            flat, flat_views, index = [], [], []
            for item, view in zip(per_item, item_views, strict=True):
                for im in item:
                    key = image_key(im, view)
                    if key not in unique:
                        unique[key] = len(flat)
                        flat.append(im)
                        flat_views.append(view)
                    index.append(unique[key])
            batch["pixel_values"] = self.pixel_values(flat, flat_views)
            if len(flat) < len(index):
                batch["image_index"] = torch.tensor(index, dtype=torch.long)
        return batch

    # --- records (the DataLoader path) ---------------------------------------------------------------------------
    def encode_record(self, record: VQARecord, *, pixels: bool = True, answer: bool = True) -> dict[str, Any]:
        """One record -> a collatable item (runs in DataLoader workers): sample, pixels, and its id. A bad image
        gives {"error": message} instead of raising, so the main process applies the run's policy."""
        item: dict[str, Any] = {"id": record.id, "label": record_label(record)}
        if record.image is not None:  # questions on one image + view share one image slot (see `image_key`)
            item["image_key"] = image_key(record.image, view_args(record))
        try:
            if pixels and record.image is not None:
                item["pixel_values"] = self.transform(self.load_record_image(record))
        except ImageLoadError as err:
            return {**item, "error": str(err)}
        item["sample"] = self.tokenize_record(record, record.answer if answer else None)
        return item

    def collate(self, items: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Items from `encode_record` -> a batch; failed items are left out and listed under "errors"."""
        good = [it for it in items if "error" not in it]
        batch: dict[str, Any] = {"ids": [it["id"] for it in good],
                                 "errors": [(it["id"], it["label"], it["error"]) for it in items if "error" in it]}
        if not good:
            return batch
        batch.update(self.pad([it["sample"] for it in good], padding_side,
                              labels=any(it["sample"].answer for it in good)))
        source = "pixel_values" if any("pixel_values" in it for it in good) else "features"
        if source in good[0]:
            first: dict[Any, int] = {}  # image key -> index of its first item
            index = [first.setdefault(it.get("image_key") or ("item", k), len(first)) for k, it in enumerate(good)]
            unique = [it for k, it in enumerate(good) if index[k] not in index[:k]]
            batch[source] = torch.stack([torch.as_tensor(it[source]) for it in unique])
            if len(unique) < len(good):
                batch["image_index"] = torch.tensor(index, dtype=torch.long)
        return batch

    # --- stop strings ---------------------------------------------------------------------------------------------
    def stop_criteria(self, stop: Sequence[str]) -> Any:
        """transformers' StopStringCriteria, built once per stop set: its tables cover the whole vocabulary and
        cost hundreds of milliseconds to build."""
        key = tuple(stop)
        if key not in self._stop_criteria:
            from transformers import StopStringCriteria

            self._stop_criteria[key] = StopStringCriteria(self.tokenizer, list(key))
        return self._stop_criteria[key]

    # --- save / load ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What `processor_config.json` holds: the template, L, and the transform with its fingerprint (checked by
        `from_pretrained` against the encoder's transform)."""
        return {"template": asdict(self.template), "image_seq_length": self.image_seq_length,
                "transform": repr(self.transform), "transform_fingerprint": self.transform_fingerprint()}

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer files + `processor_config.json` into `folder`, so the adapter reloads the same tokenisation."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder))
        (folder / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, transform: Callable[[Any], torch.Tensor],
                        template: TemplateConfig | None = None) -> "MedVQAProcessor":
        """Tokenizer (and template, unless the loading config overrides it) from the folder; the image transform is
        rebuilt from the encoder config and must match the saved one (else the adapter would see differently
        preprocessed images than it was trained on)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        data = json.loads((folder / PROCESSOR_NAME).read_text())
        proc = cls(AutoTokenizer.from_pretrained(str(folder)), template or TemplateConfig(**data["template"]),
                   transform, int(data["image_seq_length"]))
        if data.get("transform_fingerprint") not in (None, proc.transform_fingerprint()):
            raise ProcessorError(f"{folder / PROCESSOR_NAME}: image transform differs from the encoder's\n"
                             f"  saved: {data.get('transform')}\n  built: {proc.transform!r}")
        return proc
