"""Packed batches (`train.packing`): the records of one batch laid end to end in as few rows as fit.

A padded batch is as long as its longest record, so short VQA questions next to a long one are mostly padding.
Packing puts several records into one row (as many rows as greedy first-fit by length needs at `packing_length`
positions, the records then spread longest first so the rows come out about equally long), and keeps each record on
its own:

* ``segment_ids`` (B, T) numbers the records of a row 1, 2, ...; padding is 0;
* the decoder sees position ids that restart at every record and a block-diagonal causal mask (a token attends only to
  earlier tokens of its own record), built in `packed_inputs` as the attention implementation wants it: a boolean
  4-D mask for SDPA, an additive one for eager attention;
* each record's visual prefixes stay at its own image slots (``image_index`` is reordered with the records);
* labels stay per record; the first position of every record is never a target, so no loss crosses a boundary.

Packing happens inside one batch: the batch holds the same records as the padded one, the loss is the mean over the
same answer tokens, so a packed run trains on the same data order with the same loss (equal within float rounding,
tests/test_packing.py) and resumes exactly, since the data position still counts batches. Which decoders honour the
mask and position ids is a registry checked by tests (`PACKABLE_MODEL_TYPES`); anything else is refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..config import ConfigError
from .processor import IGNORE

if TYPE_CHECKING:
    from ..model import MedVQAAdapter
    from .processor import MedVQAProcessor

__all__ = ["PACKABLE_MODEL_TYPES", "MASK_ATTENTION", "PackingUnsupported", "first_fit", "pack_rows", "pack_batch",
           "pack_collate", "packing_refusal", "check_packable", "packing_for", "packed_inputs", "segment_positions",
           "attention_window", "mask_for_attention"]

#: decoder model types whose forward takes `position_ids` and passes a ready 4-D attention mask through to its
#: attention (transformers' `create_causal_mask` returns a 4-D mask as given): the families the presets use (gpt2,
#: llama, mistral, biogpt) and the others with default LoRA targets, each checked by tests/test_packing.py (packed loss
#: and gradients equal the padded batch's). BLOOM and MPT, for example, derive ALiBi biases from a 2-D padding mask
#: and take no position ids: they cannot be packed this way and are refused.
PACKABLE_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "biogpt", "qwen2", "gpt_neox", "phi3", "gpt_neo"})

#: attention implementations that take the block mask: SDPA as a boolean mask (True = attend), eager as an additive
#: one (0 or the dtype's minimum), as transformers' own mask builders give each of them
MASK_ATTENTION = {"sdpa": "bool", "eager": "additive"}


class PackingUnsupported(ConfigError):
    """`train.packing` asked of a model that cannot keep packed records apart (its decoder, attention
    implementation or tuning mode); the message says which and how to go on."""


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit decreasing: item indices grouped into bins of at most `capacity` (an item longer than
    `capacity` gets a bin of its own, never split). Longest first, ties in batch order; bins in the order opened.
    Deterministic: the same lengths always give the same bins (what an exact resume needs)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The rows a batch is packed into: as many as `first_fit` needs, with the records then spread over them longest
    first, each into the row that is shortest so far, so the rows end up about equally long and the padded width (the
    longest row) is small, where first-fit leaves its last row nearly empty. Falls back to the first-fit rows when
    the spread would overfill a row. Deterministic, like `first_fit`."""
    bins = first_fit(lengths, capacity)
    rows: list[list[int]] = [[] for _ in bins]
    load = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = min(range(len(rows)), key=lambda b: load[b])
        rows[r].append(i)
        load[r] += lengths[i]
    return rows if max(load) <= max(capacity, max(lengths)) else bins


def pack_batch(batch: dict[str, Any], capacity: int, image_seq_length: int, pad_id: int = 0) -> dict[str, Any]:
    """A right-padded collated batch (see `MedVQAProcessor.collate`) -> the same records packed into rows of at most
    `capacity` positions, with ``segment_ids``; the other keys (ids, errors, pixel_values/features) pass through.
    `image_seq_length` is the prefix length L of one image slot; `pad_id` fills the padding (never read)."""
    if "input_ids" not in batch:  # every item failed: nothing to lay out
        return batch
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    bins = pack_rows(lengths, capacity)
    B, T = len(bins), max(sum(lengths[i] for i in b) for b in bins)
    slots = (batch["image_mask"].sum(1) // max(1, image_seq_length)).tolist()  # image slots per record
    first_slot = [sum(slots[:i]) for i in range(len(slots))]
    n_slots = sum(slots)
    index = batch.get("image_index")
    index = index if index is not None else torch.arange(n_slots)
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].new_full((B, T), pad_id)
    out["attention_mask"] = batch["attention_mask"].new_zeros(B, T)
    out["image_mask"] = batch["image_mask"].new_zeros(B, T)
    out["segment_ids"] = torch.zeros(B, T, dtype=torch.long)
    if "labels" in batch:
        out["labels"] = batch["labels"].new_full((B, T), IGNORE)
    order: list[int] = []
    for row, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members, start=1):
            n = lengths[i]
            span = slice(at, at + n)
            for key in ("input_ids", "attention_mask", "image_mask", "labels"):
                if key in batch:
                    out[key][row, span] = batch[key][i, :n]
            out["segment_ids"][row, span] = seg
            if "labels" in batch:
                out["labels"][row, at] = IGNORE  # a record's first position is never predicted from the one before
            order.extend(range(first_slot[i], first_slot[i] + slots[i]))
            at += n
    if n_slots:
        new_index = index[torch.tensor(order, dtype=torch.long)]
        if torch.equal(new_index, torch.arange(len(new_index))):
            out.pop("image_index", None)
        else:
            out["image_index"] = new_index
    return out


def pack_collate(items: Sequence[dict[str, Any]], processor: MedVQAProcessor, capacity: int) -> dict[str, Any]:
    """The processor's collate, packed (picklable through `functools.partial`, so DataLoader workers run it):
    `items` collated right-padded, then packed into rows of `capacity` positions."""
    return pack_batch(processor.collate(items), capacity, processor.image_seq_length, processor.pad_id)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 wherever the segment id changes (each record, and the padding run after the
    last one): (B, T) -> (B, T)."""
    T = segments.shape[1]
    arange = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, arange, torch.zeros_like(arange)).cummax(1).values
    return arange - first


def attention_window(decoder_config: Any) -> int | None:
    """The decoder's sliding attention window (Mistral's `sliding_window`, GPT-Neo's local `window_size`, Qwen2's
    sliding layers), or None when every layer attends to the whole sequence. A ready 4-D mask replaces the window
    transformers would apply, so a packed record must fit inside it (checked per batch in `packed_inputs`)."""
    types = getattr(decoder_config, "layer_types", None) or getattr(decoder_config, "attention_layers", None)
    if types is not None and not any(t in ("sliding_attention", "local") for t in types):
        return None
    window = getattr(decoder_config, "sliding_window", None) or getattr(decoder_config, "window_size", None)
    return int(window) if window else None


def packing_refusal(model: MedVQAAdapter) -> str | None:
    """Why this model cannot train on packed batches (one line naming the setting to change), or None."""
    decoder_cfg = model.decoder.config
    kind = getattr(decoder_cfg, "model_type", None)
    if kind not in PACKABLE_MODEL_TYPES:
        return (f"train.packing: decoder model_type {kind!r} is not known to honour a per-record attention mask "
                f"and position ids (packable: {sorted(PACKABLE_MODEL_TYPES)}); set train.packing: false")
    method = model.config.tuning.method
    if method.soft_prompt:
        return (f"train.packing: tuning.mode {method.name!r} puts its virtual tokens in front of each row, not of "
                "each packed record; set train.packing: false or use a weight-space mode (lora, dora, full, frozen)")
    impl = getattr(decoder_cfg, "_attn_implementation", None) or "eager"
    if impl not in MASK_ATTENTION:
        return (f"train.packing: the decoder's attention implementation {impl!r} is not one that takes the packed "
                f"block mask {sorted(MASK_ATTENTION)}; load the decoder with attn_implementation='sdpa' or set "
                "train.packing: false")
    return None


def check_packable(model: MedVQAAdapter) -> None:
    """Raise `PackingUnsupported` (one line) when the model cannot keep packed records apart."""
    reason = packing_refusal(model)
    if reason is not None:
        raise PackingUnsupported(reason)


def packing_for(model: MedVQAAdapter, cfg: Any) -> int | None:
    """Positions per packed row for a run with TrainConfig `cfg` (None: `train.packing` is off): `train.packing_length`, else the
    template's `max_length`; a record longer than that takes a row of its own (never split or cut). Refuses a model
    that cannot keep packed records apart (`check_packable`) before anything trains."""
    if not cfg.packing:
        return None
    check_packable(model)
    return int(cfg.packing_length if cfg.packing_length is not None else model.config.template.max_length)


def packed_inputs(model: MedVQAAdapter, segments: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The decoder's ``attention_mask`` (B, 1, T, T) and ``position_ids`` (B, T) for a packed batch: a token attends
    to the earlier tokens of its own record only (padding to earlier padding, so no row is empty), positions restart
    per record. Refuses models that cannot honour them (`check_packable`)."""
    check_packable(model)
    B, T = segments.shape
    window = attention_window(model.decoder.config)
    if window is not None and T > window:  # only then can a record outgrow the window: one count, one sync
        lengths = torch.zeros(B, int(segments.max()) + 1, dtype=torch.long, device=segments.device)
        longest = int(lengths.scatter_add_(1, segments, torch.ones_like(segments))[:, 1:].max())
        if longest > window:
            raise PackingUnsupported(f"train.packing: a record of {longest} positions is longer than the decoder's "
                                     f"sliding attention window ({window}), which a packed block mask cannot apply; "
                                     "set train.packing: false")
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
    return {"attention_mask": mask_for_attention(model.decoder.config, allowed, dtype),
            "position_ids": segment_positions(segments)}


def mask_for_attention(decoder_config: Any, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, T, T) boolean "query may attend to key" matrix as the decoder's attention implementation takes a ready
    4-D mask (`MASK_ATTENTION`): (B, 1, T, T) boolean for SDPA, additive (0 or the dtype's minimum) for eager. Also
    what Gemma 3's image-attention rule builds its masks with (vlm_gemma3.py)."""
    if MASK_ATTENTION.get(getattr(decoder_config, "_attn_implementation", None) or "eager") == "bool":
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
