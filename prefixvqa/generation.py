"""Answering and scoring with a `MedVQAAdapter`: what runs once the model can embed a batch.

`model.py` holds the module (its parts, the factories, `forward`/`prefix`/`embed`, parameter groups); this module
holds inference on top of it, as transformers keeps `generate` apart from its models:

- `generate`: greedy decoding runs its own KV-cached loop (prompts that share an image and everything before it
  compute that head once; stop strings are checked as it goes); beam search and sampling use transformers' `generate`.
- `score`: candidate answers continue from one KV cache of their question's prompt, and the vocabulary projection runs
  only where a candidate token is predicted.
- `answer` and `score_choices`: the convenience API (processor, then the tensor functions).

The functions take the model as their first argument; the model's public methods of the same names delegate here,
so callers keep using `model.generate(...)` etc. The model's type is imported for the type checker only: `model.py`
imports this module, never the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import Calibration, abstain  # noqa: F401 (abstain re-exported)
from .config import ConfigError
from .data.processor import Sample

if TYPE_CHECKING:
    from .model import MedVQAAdapter


@dataclass
class Answer:
    """One generated answer with what a caller needs to trust it: evaluation reads `text`, calibration and abstention
    read `score`/`num_tokens`/`confidence`, and an abstained answer keeps the model's guess in `guess`."""

    text: str  # the answer, or "uncertain" when it abstained (the guess is then in `guess`)
    score: float  # log-probability of the answer's tokens (sum), up to and including EOS or the stop string
    num_tokens: int
    confidence: float | None = None  # exp(mean token log-prob), temperature-scaled when the adapter is calibrated
    abstained: bool = False
    guess: str | None = None  # the model's answer when it abstained
    ood_score: float | None = None  # distance of the image from the training images (`ood`); None: no summary
    ood: bool = False  # the score lies above the adapter's threshold: the image is unlike its training images
    warning: str | None = None  # `ood.OOD_WARNING` when `ood`, else None


class ChoiceScores(list):
    """One question's candidate probabilities (or log-likelihoods), a plain list of floats that also says how unlike
    the training images its image is: ``ood_score``, ``ood`` and ``warning`` as on `Answer`."""

    def __init__(self, values: Sequence[float], ood_score: float | None = None, ood: bool = False,
                 warning: str | None = None):
        super().__init__(values)
        self.ood_score, self.ood, self.warning = ood_score, ood, warning


def _language_model(model: MedVQAAdapter) -> nn.Module:
    return model.config.tuning.method.language_model(model.decoder)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Run the block in eval mode (no dropout, batch-norm statistics fixed) and give every submodule its own training
    flag back afterwards: inference entry points answer the same whatever mode the caller left the model in. A module
    already in eval mode throughout is left alone (one walk over its submodules, no mode switching)."""
    training = [m for m in module.modules() if m.training]
    if training:
        module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def lora_merged(model: MedVQAAdapter) -> Iterator[None]:
    """Inference with each LoRA delta folded into a temporary copy of its base weight: one matmul per layer instead
    of three. The original weight tensors are put back untouched on exit (no merge/unmerge rounding). Skipped for
    quantised bases (merging would requantise), for modes that cannot fold, and whenever gradients are on."""
    layers = []
    if (model.config.tuning.method.folds_for_inference and not model.config.decoder.quantization
            and not torch.is_grad_enabled()):
        from peft.tuners.lora import LoraLayer

        layers = [m for m in model.decoder.modules() if isinstance(m, LoraLayer) and not m.merged
                  and not m.disable_adapters and set(m.active_adapters) <= set(m.lora_A)]
    saved = []
    try:
        for m in layers:
            weight = m.get_base_layer().weight
            merged = weight.data + sum(m.get_delta_weight(a) for a in m.active_adapters).to(weight.dtype)
            saved.append((m, weight, weight.data))
            weight.data, m.merged_adapters = merged, list(m.active_adapters)
        yield
    finally:
        for m, weight, data in saved:
            weight.data, m.merged_adapters = data, []


# --- convenience API: processor, then the tensor functions -------------------------------------------------------
@torch.no_grad()
def answer(model: MedVQAAdapter, images: Sequence[Any] | None, questions: Sequence[str], *,
           features: torch.Tensor | None = None, shots: Sequence[Sequence[tuple[str, str]]] | None = None,
           views: Sequence[dict] | None = None, abstain_below: float | None = None, **generation: Any
           ) -> list[Answer]:
    """The body of `MedVQAAdapter.answer`: the processor left-pads the batch, `model.generate` answers it (in eval
    mode), and answers below `abstain_below` confidence become "uncertain"."""
    from .ood import reported, row_scores

    batch = model.processor(None if features is not None else images, questions, shots=shots, views=views,
                            padding_side="left")
    with evaluating(model):
        batch, features, scores = row_scores(model, batch, features)
        answers = model.generate(**batch, features=features, **generation)
    return [abstain(dataclasses.replace(a, **r), abstain_below)
            for a, r in zip(answers, reported(getattr(model, "image_summary", None), scores, len(answers)))]


@torch.no_grad()
def score_choices(model: MedVQAAdapter, images: Sequence[Any] | None, questions: Sequence[str],
                  choices: Sequence[Sequence[str]], *, features: torch.Tensor | None = None,
                  shots: Sequence[Sequence[tuple[str, str]]] | None = None, views: Sequence[dict] | None = None,
                  return_loglik: bool = False) -> list[list[float]]:
    """The body of `MedVQAAdapter.score_choices`: tokenise every (question, candidate) pair, `model.score` them (in
    eval mode), and turn each question's mean log-likelihoods into (calibrated) probabilities unless
    `return_loglik`."""
    shots = shots if shots is not None else [()] * len(questions)
    batch = model.processor(None if features is not None else images, questions, shots=shots, views=views,
                            choices=choices)  # templates that list the options show them (MedVInT)
    pairs = [[model.processor.tokenize(q, c, s, choices=opts) for c in opts]
             for q, opts, s in zip(questions, choices, shots, strict=True)]
    from .ood import reported, row_scores

    with evaluating(model):
        batch, features, ood = row_scores(model, batch, features)
        mean_lp = model.score(batch, pairs, features=features)
    values = mean_lp if return_loglik else [(model.calibration or Calibration()).scored(s) for s in mean_lp]
    return [ChoiceScores(v, **r) for v, r in zip(values, reported(getattr(model, "image_summary", None), ood,
                                                                     len(values)))]


# --- generation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: MedVQAAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
             pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
             image_index: torch.Tensor | None = None, *, max_new_tokens: int | None = None,
             num_beams: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             stop: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Answer]:
    """The body of `MedVQAAdapter.generate`: fill the unset settings from `config.generation`, embed the batch with
    LoRA folded, then the own greedy loop or transformers' `generate`; each row is cut and scored by `finish`. Runs
    in eval mode; generation stops where the decoder's context ends (`max_new_tokens` is cut to fit)."""
    stop = list(stop) if stop is not None else model.processor.stop_strings()
    defaults = model.config.generation
    num_beams = defaults.num_beams if num_beams is None else num_beams
    max_new_tokens = fit_new_tokens(model, attention_mask, defaults.max_new_tokens if max_new_tokens is None
                                    else max_new_tokens)
    if num_beams > 1 and "length_penalty" not in generate_kwargs:
        generate_kwargs["length_penalty"] = defaults.length_penalty
    with evaluating(model), lora_merged(model):
        embeds = model.embed(input_ids, image_mask, model.prefix(pixel_values, features, image_index))
        mask = attention_mask.to(model.device)
        if num_beams == 1 and not do_sample and not generate_kwargs:
            ids, steps = greedy(model, embeds, mask, image_mask.to(model.device), image_index, input_ids,
                                max_new_tokens, stop)
        else:
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
            ids, steps = _transformers_generate(model, embeds, mask, max_new_tokens, num_beams, do_sample, stop,
                                                **sampling, **generate_kwargs)
        return [finish(model, row, lp, stop) for row, lp in zip(ids.tolist(), steps.float().tolist())]


def fit_new_tokens(model: MedVQAAdapter, attention_mask: torch.Tensor, max_new_tokens: int) -> int:
    """`max_new_tokens` cut so the longest prompt plus its answer stays within the decoder's context (the last new
    token is never fed back, so it needs no position); at least one."""
    context = model.text_context
    if context is None:
        return max_new_tokens
    fits = context - int(attention_mask.sum(1).max()) + 1
    return max(1, min(max_new_tokens, fits))


def _transformers_generate(model: MedVQAAdapter, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                           num_beams: int, do_sample: bool, stop: Sequence[str], **generate_kwargs: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search or sampling through transformers' `generate` -> (new ids (B, n), their log-probabilities)."""
    if not model.config.tuning.method.transformers_generate:
        raise ConfigError(f"tuning.mode={model.config.tuning.mode!r} generates greedily only (peft's key/value "
                          "prefixes cannot be combined with transformers' generate on inputs_embeds)")
    lm, kwargs = model._lm_inputs(embeds, mask)
    criteria = [model.processor.stop_criteria(stop)] if stop else []
    out = lm.generate(inputs_embeds=kwargs["inputs_embeds"], attention_mask=kwargs["attention_mask"],
                      max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                      eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.processor.pad_id,
                      stopping_criteria=criteria, return_dict_in_generate=True, output_scores=True,
                      output_logits=True, use_cache=True, **generate_kwargs)
    ids = out.sequences[:, -len(out.scores):]  # only the new tokens
    if num_beams > 1:
        return ids, lm.compute_transition_scores(out.sequences, out.scores, out.beam_indices, False)
    logp = torch.stack(out.logits, 1).float().log_softmax(-1)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def greedy(model: MedVQAAdapter, embeds: torch.Tensor, mask: torch.Tensor, image_mask: torch.Tensor,
           image_index: torch.Tensor | None, input_ids: torch.Tensor, max_new_tokens: int, stop: Sequence[str]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-cached greedy decoding -> (new ids (B, n), their log-probabilities (B, n)). A row that has produced EOS
    or completed a stop string leaves the batch (its later ids are EOS, or the pad id, with log-probability 0:
    `finish` cuts there); the loop ends when no row is left. Each step is `decoding.stepper`'s."""
    from . import decoding

    logits, cache, mask, pos = prefill(model, embeds, mask, image_mask, image_index, input_ids)
    eos = model.tokenizer.eos_token_id
    criteria = model.processor.stop_criteria(stop) if stop else None
    B, device = embeds.shape[0], model.device
    ids = torch.full((B, max_new_tokens), model.processor.pad_id if eos is None else eos, dtype=torch.long,
                     device=device)
    steps = torch.zeros(B, max_new_tokens, device=device)
    step = decoding.stepper(_language_model(model), model.decoder.get_input_embeddings(), embeds.dtype, cache, mask,
                            pos, max_new_tokens - 1)
    running = torch.arange(B, device=device)  # rows still decoding, in the stepper's order
    for t in range(max_new_tokens):
        logp = logits.float().log_softmax(-1)  # (b, V)
        nxt = logp.argmax(-1)  # (b,)
        ids[running, t] = nxt
        steps[running, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)
        ended = nxt == eos if eos is not None else torch.zeros_like(nxt, dtype=torch.bool)
        if criteria is not None:
            ended |= criteria(ids[running, :t + 1], None).to(device)
        if bool(ended.all()) or t == max_new_tokens - 1:
            return ids[:, :t + 1], steps[:, :t + 1]
        if bool(ended.any()):
            keep = torch.nonzero(~ended).squeeze(1)
            running, nxt = running[keep], nxt[keep]
            step.keep(keep)
        logits = step.step(nxt)
    return ids[:, :0], steps[:, :0]  # max_new_tokens == 0


def prefill(model: MedVQAAdapter, embeds: torch.Tensor, mask: torch.Tensor, image_mask: torch.Tensor,
            image_index: torch.Tensor | None, input_ids: torch.Tensor | None = None
            ) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """Run left-padded prompts once with a KV cache -> (last logits (B, V), cache, mask, last positions (B,)).

    When rows share their first image and everything before it (VQA-RAD and SLAKE ask several questions per image;
    the image comes first in most templates), that head is computed once per distinct image and its KV reused by
    every row that asks about it. The head is found through `model._shared_head` (which delegates to `shared_head`),
    so a test can watch whether the shared path ran."""
    B, T = mask.shape
    lm, kwargs = model._lm_inputs(embeds, mask, keep=1)
    head = model._shared_head(input_ids, mask, image_mask, image_index)
    if head is None:
        out = lm(**kwargs, use_cache=True)
        return out.logits[:, -1], out.past_key_values, kwargs["attention_mask"], kwargs["position_ids"][:, -1]
    H, rows, owner = head  # head length; a row per distinct head; which head each row has
    device = model.device
    start = T - mask.sum(1)  # (B,) where each row begins
    take = start[rows, None] + torch.arange(H, device=device)  # (U, H)
    head_embeds = embeds[rows[:, None], take]  # (U, H, E)
    h_out = lm(inputs_embeds=head_embeds, attention_mask=mask.new_ones(len(rows), H),
               position_ids=torch.arange(H, device=device).expand(len(rows), H), use_cache=True, logits_to_keep=1)
    cache = h_out.past_key_values
    cache.reorder_cache(owner)  # (U, ...) -> (B, ...)
    tail_len = int((mask.sum(1) - H).max())
    cols = torch.arange(T - tail_len, T, device=device)
    tail_mask = (mask[:, -tail_len:].bool() & (cols[None] >= (start + H)[:, None])).long()  # (B, tail)
    positions = H + (tail_mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([mask.new_ones(B, H), tail_mask], 1)
    out = lm(inputs_embeds=embeds[:, -tail_len:], attention_mask=full_mask, position_ids=positions,
             past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, full_mask, positions[:, -1]


def shared_head(model: MedVQAAdapter, input_ids: torch.Tensor | None, mask: torch.Tensor, image_mask: torch.Tensor,
                image_index: torch.Tensor | None) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(head length H, a row per distinct image, each row's image) when every row has one image slot with the same
    tokens before it and some rows share an image; None otherwise (then the plain prefill is as fast). Soft prompts
    sit in front of every row, so their modes never share."""
    if image_index is None or input_ids is None or model.config.tuning.method.soft_prompt:
        return None
    B, T = mask.shape
    L = model.processor.image_seq_length
    if len(image_index) != B or int(image_mask.sum()) != B * L:
        return None
    start = T - mask.sum(1)
    first = image_mask.float().argmax(1)  # first image position per row
    H = first - start + L
    if not bool((H == H[0]).all()) or bool((mask.sum(1) <= H).any()):
        return None
    image_index = image_index.to(model.device)
    distinct, owner = torch.unique(image_index, return_inverse=True)
    if len(distinct) == B:
        return None
    rows = torch.stack([torch.nonzero(image_index == u)[0, 0] for u in distinct])
    # the tokens before the image must match too (they do for one template without shots; check anyway)
    h = int(H[0])
    text = [tuple(input_ids[r, int(start[r]):int(start[r]) + h - L].tolist()) for r in range(B)]
    ids_ok = all(text[r] == text[int(rows[o])] for r, o in enumerate(owner.tolist()))
    return (h, rows, owner) if ids_ok else None


def finish(model: MedVQAAdapter, ids: list[int], steps: list[float], stop: Sequence[str]) -> Answer:
    """Cut a row at EOS or at the token that completes a stop string; score and count only what is kept."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    n = len(ids)
    if eos is not None and eos in ids:
        n = ids.index(eos) + 1
    text = tokenizer.decode(ids[:n], skip_special_tokens=True)
    if any(s in text for s in stop):
        n = next(k for k in range(1, n + 1) if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True)
                                                   for s in stop))
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        text = min((text.split(s)[0] for s in stop), key=len)
    total = float(sum(steps[:n]))
    return Answer(text.strip(), total, n, (model.calibration or Calibration()).generated(total, n))


# --- candidate scoring --------------------------------------------------------------------------------------------
def _shared_prompts(pairs: Sequence[Sequence[Sample]]
                    ) -> tuple[list[Sample], list[list[int]], list[int], list[int], list[int]]:
    """Split each question's (prompt, candidate) samples into one prompt per group of candidates that share it and
    the candidates' continuations -> (prompts, continuations, owning prompt per continuation, first counted token
    per continuation, image slot rows of the prompts in order)."""
    slots = [len(s[0].pieces) - 1 for s in pairs]  # image slots per question
    first_slot = [sum(slots[:q]) for q in range(len(pairs))]
    prompts: list[Sample] = []
    conts: list[list[int]] = []
    owners: list[int] = []
    starts: list[int] = []
    slot_rows: list[int] = []
    for q, samples in enumerate(pairs):
        same = all(s.pieces[:-1] == samples[0].pieces[:-1] for s in samples)
        groups = [list(samples)] if same else [[s] for s in samples]
        for group in groups:
            S = min(len(s.pieces[-1]) for s in group)
            prompts.append(Sample(group[0].pieces[:-1] + [group[0].pieces[-1][:S]], []))
            slot_rows += range(first_slot[q], first_slot[q] + slots[q])
            for s in group:
                conts.append(s.pieces[-1][S:] + s.answer)
                starts.append(len(s.pieces[-1]) - S)  # first counted token of the continuation
                owners.append(len(prompts) - 1)
    return prompts, conts, owners, starts, slot_rows


@torch.no_grad()
def score(model: MedVQAAdapter, batch: dict[str, torch.Tensor], pairs: Sequence[Sequence[Sample]],
          features: torch.Tensor | None = None) -> list[list[float]]:
    """The body of `MedVQAAdapter.score`: each shared prompt is prefilled once, its KV cache reordered to one row per
    candidate, and all continuations run in one call with logits kept only at counted positions. Runs in eval
    mode."""
    with evaluating(model), lora_merged(model):  # folded LoRA for the whole pass
        features = batch.get("features") if features is None else features
        prefix = model.prefix(batch.get("pixel_values"), features, batch.get("image_index"))  # (S, L, E)
        prompts, conts, owners, starts, slot_rows = _shared_prompts(pairs)
        p = model.processor.pad(prompts, "left", labels=False)
        embeds = model.embed(p["input_ids"], p["image_mask"], prefix[torch.tensor(slot_rows, dtype=torch.long)])
        device = model.device
        last, cache, mask, pos = prefill(model, embeds, p["attention_mask"].to(device), p["image_mask"].to(device),
                                         None)
        owner = torch.tensor(owners, device=device)
        cache.reorder_cache(owner)
        P, C = len(conts), max(map(len, conts))
        ids = torch.full((P, C), model.processor.pad_id, dtype=torch.long, device=device)
        cmask = torch.zeros(P, C, dtype=torch.long, device=device)
        counted = torch.zeros(P, C, dtype=torch.bool, device=device)
        for i, (c, s) in enumerate(zip(conts, starts)):
            ids[i, :len(c)], cmask[i, :len(c)], counted[i, s:len(c)] = torch.tensor(c), 1, True
        keep = F.pad(counted[:, 1:], (0, 1))  # continuation position j predicts token j + 1
        # a shorter continuation's padding repeats its last position: never one past the decoder's context
        steps = torch.minimum(torch.arange(C, device=device)[None], cmask.sum(1, keepdim=True) - 1)
        out = _language_model(model)(
            inputs_embeds=model.decoder.get_input_embeddings()(ids).to(embeds.dtype),
            attention_mask=torch.cat([mask[owner], cmask], 1),
            position_ids=pos[owner, None] + 1 + steps, past_key_values=cache,
            use_cache=False, logits_to_keep=keep if C > 1 else 0)
        token_lp = torch.zeros(P, C, device=device)
        first = last[owner].float().log_softmax(-1).gather(-1, ids[:, :1]).squeeze(-1)  # predicted by the prompt
        token_lp[:, 0] = torch.where(counted[:, 0], first, 0.0)
        if C > 1:
            rest = out.logits.float().log_softmax(-1)  # (K, V) at kept positions
            token_lp[:, 1:][counted[:, 1:]] = rest.gather(-1, ids[:, 1:][counted[:, 1:]][:, None]).squeeze(-1)
        mean = (token_lp.sum(1) / counted.sum(1).clamp(min=1)).tolist()
        result, k = [], 0
        for samples in pairs:
            result.append(mean[k:k + len(samples)])
            k += len(samples)
        return result
