"""MedVQAAdapter: image encoder -> mapper -> visual prefix -> causal decoder (+ LoRA).

The model takes tensors (`forward`, `generate`, `score`); its `processor` turns images, questions and records into
them. `answer` and `score_choices` are the convenience API: processor, then the tensor methods.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import UNCERTAIN, Calibration
from .config import AdapterConfig, ConfigError
from .decoder import (apply_tuning, check_available, decoder_fingerprint, fingerprint, is_peft_param,
                      load_decoder)
from .mappers import build_mapper
from .data.processor import IGNORE, MedVQAProcessor, Sample
from .vision import VisionEncoder

GROUPS = ("encoder", "mapper", "lora", "decoder")  # "lora" holds every peft tensor (LoRA or soft prompts)


@dataclass
class Answer:
    text: str  # the answer, or "uncertain" when it abstained (the guess is then in `guess`)
    score: float  # log-probability of the answer's tokens (sum), up to and including EOS or the stop string
    num_tokens: int
    confidence: float | None = None  # exp(mean token log-prob), temperature-scaled when the adapter is calibrated
    abstained: bool = False
    guess: str | None = None  # the model's answer when it abstained


@dataclass
class AdapterOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (K, V) at the K supervised positions when labels are given, else (B, T, V)
    labels: torch.Tensor | None  # (B, T), IGNORE outside answers
    attention_mask: torch.Tensor  # (B, T)


def abstain(answer: Answer, below: float | None) -> Answer:
    """The answer, or "uncertain" (with the guess kept) when its confidence is below the threshold."""
    if below is None or answer.confidence is None or answer.confidence >= below:
        return answer
    return Answer(UNCERTAIN, answer.score, answer.num_tokens, answer.confidence, True, answer.text)


class MedVQAAdapter(nn.Module):
    """Parts may be passed prebuilt (tests, sharing one loaded decoder); otherwise the factories load them."""

    def __init__(self, config: AdapterConfig, *, encoder: VisionEncoder | None = None, decoder: nn.Module | None = None,
                 tokenizer: Any = None):
        super().__init__()
        check_available(config, encoder is None, decoder is None)
        encoder = encoder if encoder is not None else VisionEncoder.from_config(config.encoder)
        if decoder is None:
            decoder, tokenizer = load_decoder(config.decoder)
        num_tokens, feat_dim = encoder.output_shape()
        embed_dim = decoder.get_input_embeddings().embedding_dim
        for field, have, want in (("in_dim", config.mapper.in_dim, feat_dim),
                                  ("out_dim", config.mapper.out_dim, embed_dim)):
            if have not in (None, want):
                raise ConfigError(f"mapper.{field}={have} but the models give {want}; a different encoder or decoder?")
        self.config = config.replace(mapper={"in_dim": feat_dim, "out_dim": embed_dim})
        self.num_image_tokens = num_tokens
        self.base_fingerprints = {"encoder": fingerprint(encoder.visual, {"name": config.encoder.name}),
                                  "decoder": decoder_fingerprint(decoder)}
        self.encoder = encoder
        # parts whose weights may differ from their base model (trained or set to train, merged into, or loaded
        # from an adapter that stored them): an adapter folder stores a full-mode decoder only when it is here
        self.changed_parts: set[str] = set()
        self.mapper = build_mapper(self.config.mapper, self.config.template.image_start_end)
        if self.config.template.image_start_end:  # as LLaVA initialised <im_start>/<im_end>: the mean token embedding
            with torch.no_grad():
                self.mapper.delimiters.copy_(decoder.get_input_embeddings().weight.float().mean(0).expand(2, -1))
        with torch.no_grad():
            prefix_length = self.mapper.eval()(torch.zeros(1, num_tokens, feat_dim)).shape[1]
        self.decoder = apply_tuning(decoder, config.tuning, quantized=bool(config.decoder.quantization),
                                    checkpointing=config.decoder.gradient_checkpointing)
        self.processor = MedVQAProcessor(tokenizer, self.config.template, encoder.preprocess, prefix_length)
        self.calibration: Calibration | None = None  # temperatures fitted on validation data (calibration.json)
        self.freeze_encoder(config.encoder.freeze)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # --- factories ------------------------------------------------------------------------------------------------
    @staticmethod
    def list_presets() -> list[str]:
        from .presets import list_presets

        return list_presets()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MedVQAAdapter":
        from .presets import preset_config

        return cls(preset_config(name, **overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True, **overrides: Any) -> "MedVQAAdapter":
        from .adapter_io import load_adapter

        return load_adapter(cls, path, strict=strict, **overrides)

    def save_pretrained(self, path: str | Path, *, card: dict[str, Any] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter folder. `state_dict` (this model's names, full tensors) replaces the live tensors:
        what a sharded run gathers to rank 0 (see prefixvqa/train/distributed.py)."""
        from .adapter_io import save_adapter

        return save_adapter(self, path, card=card, state_dict=state_dict)

    # --- core forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                full_logits: bool = False) -> AdapterOutput:
        """Tensors from the processor -> loss on answer tokens. lm_head runs only where a label is supervised."""
        embeds = self.embed(input_ids, image_mask, self.prefix(pixel_values, features, image_index))  # (B, T, E)
        keep = None
        if labels is not None and not full_logits:  # position t predicts label t + 1
            keep = F.pad(labels[:, 1:] != IGNORE, (0, 1))  # (B, T) bool
        lm, kwargs = self._lm_inputs(embeds, attention_mask, keep=keep if keep is not None else 0)
        logits = lm(**kwargs, use_cache=False).logits  # (K, V) at kept positions, or (B, T', V)
        loss = None
        if keep is not None:
            loss = F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])
        elif labels is not None:
            logits = logits[:, -embeds.shape[1]:]  # soft prompts come first: drop their logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return AdapterOutput(loss, logits, labels, attention_mask)

    def prefix(self, pixel_values: torch.Tensor | None, features: torch.Tensor | None,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prefixes, one per image slot: (S, L, E)."""
        if features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values (images through the processor) or features (the cache)")
            features = self.encode_pixels(pixel_values)  # (I, N, D_v)
        prefix = self.mapper(features.to(self.device, torch.float32))  # (I, L, E)
        return prefix if image_index is None else prefix[image_index.to(self.device)]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual prefixes written into the image slots, in order: (B, T, E)."""
        emb = self.decoder.get_input_embeddings()
        embeds = emb(input_ids.to(self.device))  # (B, T, E)
        slots = image_mask.to(self.device)
        if int(slots.sum()) != prefix.shape[0] * prefix.shape[1]:
            raise ValueError(f"{int(slots.sum())} image positions but {prefix.shape[0]} prefixes of "
                             f"{prefix.shape[1]} vectors")
        return embeds.masked_scatter(slots[..., None], prefix.to(embeds.dtype))

    def _lm_inputs(self, embeds: torch.Tensor, mask: torch.Tensor, keep: int | torch.Tensor = 0
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """The module to call and its first-call inputs. Position ids follow the attention mask, so left-padded rows
        equal unpadded ones. peft's soft prompts are placed here as peft's own forward places them (virtual tokens in
        front for prompt tuning, key/value prefixes for prefix tuning), which also lets a KV cache be reused."""
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                  "logits_to_keep": keep}
        method = self.config.tuning.method
        return method.language_model(self.decoder), method.place_virtual_tokens(self.decoder, self.config.tuning,
                                                                                kwargs, positions)

    @contextlib.contextmanager
    def _lora_merged(self):
        """Inference with each LoRA delta folded into a temporary copy of its base weight: one matmul per layer
        instead of three. The original weight tensors are put back untouched on exit (no merge/unmerge rounding).
        Skipped for quantised bases (merging would requantise) and whenever gradients are on."""
        layers = []
        if (self.config.tuning.method.folds_for_inference and not self.config.decoder.quantization
                and not torch.is_grad_enabled()):
            from peft.tuners.lora import LoraLayer

            layers = [m for m in self.decoder.modules() if isinstance(m, LoraLayer) and not m.merged
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

    def _lm(self) -> nn.Module:
        return self.config.tuning.method.language_model(self.decoder)

    # --- images -------------------------------------------------------------------------------------------------
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, H, W) -> features (I, N, D_v) in float32; no graph through a frozen tower."""
        pixels = pixel_values.to(self.device, self._encoder_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.encoder.freeze):
            return self.encoder(pixels).float()

    def encode_images(self, images: Sequence[Any], views: Sequence[dict[str, Any] | None] | None = None
                      ) -> torch.Tensor:
        """Images (or, per sample, a list of images for few-shot prompts) -> features (I, N, D_v): what the cache
        stores. Loading and preprocessing go through the processor."""
        flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        return self.encode_pixels(self.processor.pixel_values(flat, views))

    @property
    def _encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    # --- inference: convenience API -------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images: Sequence[Any] | None, questions: Sequence[str], *, features: torch.Tensor | None = None,
               shots: Sequence[Sequence[tuple[str, str]]] | None = None, views: Sequence[dict] | None = None,
               abstain_below: float | None = None, **generation: Any) -> list[Answer]:
        """Answer questions about images (paths, bytes, PIL; the same object for several questions is encoded once
        and its prefix KV shared). Few-shot: per question a list of images (shots' then the query's) and `shots`
        [(question, answer), ...]. Answers whose confidence is below `abstain_below` come back as "uncertain" with
        the guess kept. Generation settings: see `generate`."""
        batch = self.processor(None if features is not None else images, questions, shots=shots, views=views,
                               padding_side="left")
        return [abstain(a, abstain_below) for a in self.generate(**batch, features=features, **generation)]

    @torch.no_grad()
    def score_choices(self, images: Sequence[Any] | None, questions: Sequence[str], choices: Sequence[Sequence[str]],
                      *, features: torch.Tensor | None = None, shots: Sequence[Sequence[tuple[str, str]]] | None = None,
                      views: Sequence[dict] | None = None, return_loglik: bool = False) -> list[list[float]]:
        """Rank candidate answers by length-normalised log-likelihood (answer tokens + EOS). Each question's prompt
        runs once; its KV cache serves its K candidates. Returns per-question probabilities (softmax over the
        normalised log-likelihoods, divided by the calibrated temperature when the adapter has one), or those
        log-likelihoods with `return_loglik=True`."""
        shots = shots if shots is not None else [()] * len(questions)
        batch = self.processor(None if features is not None else images, questions, shots=shots, views=views,
                               choices=choices)  # templates that list the options show them (MedVInT)
        pairs = [[self.processor.tokenize(q, c, s, choices=opts) for c in opts]
                 for q, opts, s in zip(questions, choices, shots, strict=True)]
        mean_lp = self.score(batch, pairs, features=features)
        if return_loglik:
            return mean_lp
        return [(self.calibration or Calibration()).scored(scores) for scores in mean_lp]

    # --- inference: tensors ---------------------------------------------------------------------------------------
    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor, image_mask: torch.Tensor,
                 image_index: torch.Tensor | None, input_ids: torch.Tensor | None = None
                 ) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """Run left-padded prompts once with a KV cache -> (last logits (B, V), cache, mask, last positions (B,)).

        When rows share their first image and everything before it (VQA-RAD and SLAKE ask several questions per
        image; the image comes first in most templates), that head is computed once per distinct image and its KV
        reused by every row that asks about it."""
        B, T = mask.shape
        lm, kwargs = self._lm_inputs(embeds, mask, keep=1)
        head = self._shared_head(input_ids, mask, image_mask, image_index)
        if head is None:
            out = lm(**kwargs, use_cache=True)
            return out.logits[:, -1], out.past_key_values, kwargs["attention_mask"], kwargs["position_ids"][:, -1]
        H, rows, owner = head  # head length; a row per distinct head; which head each row has
        start = T - mask.sum(1)  # (B,) where each row begins
        take = start[rows, None] + torch.arange(H, device=self.device)  # (U, H)
        head_embeds = embeds[rows[:, None], take]  # (U, H, E)
        h_out = lm(inputs_embeds=head_embeds, attention_mask=mask.new_ones(len(rows), H),
                   position_ids=torch.arange(H, device=self.device).expand(len(rows), H), use_cache=True,
                   logits_to_keep=1)
        cache = h_out.past_key_values
        cache.reorder_cache(owner)  # (U, ...) -> (B, ...)
        tail_len = int((mask.sum(1) - H).max())
        cols = torch.arange(T - tail_len, T, device=self.device)
        tail_mask = (mask[:, -tail_len:].bool() & (cols[None] >= (start + H)[:, None])).long()  # (B, tail)
        positions = H + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([mask.new_ones(B, H), tail_mask], 1)
        out = lm(inputs_embeds=embeds[:, -tail_len:], attention_mask=full_mask, position_ids=positions,
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values, full_mask, positions[:, -1]

    def _shared_head(self, input_ids: torch.Tensor | None, mask: torch.Tensor, image_mask: torch.Tensor,
                     image_index: torch.Tensor | None) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(head length H, a row per distinct image, each row's image) when every row has one image slot with the
        same tokens before it and some rows share an image; None otherwise (then the plain prefill is as fast)."""
        if image_index is None or input_ids is None or self.config.tuning.method.soft_prompt:
            return None
        B, T = mask.shape
        if len(image_index) != B or int(image_mask.sum()) != B * self.processor.image_seq_length:
            return None
        start = T - mask.sum(1)
        first = image_mask.float().argmax(1)  # first image position per row
        H = first - start + self.processor.image_seq_length
        if not bool((H == H[0]).all()) or bool((mask.sum(1) <= H).any()):
            return None
        image_index = image_index.to(self.device)
        distinct, owner = torch.unique(image_index, return_inverse=True)
        if len(distinct) == B:
            return None
        rows = torch.stack([torch.nonzero(image_index == u)[0, 0] for u in distinct])
        # the tokens before the image must match too (they do for one template without shots; check anyway)
        L, h = self.processor.image_seq_length, int(H[0])
        text = [tuple(input_ids[r, int(start[r]):int(start[r]) + h - L].tolist()) for r in range(B)]
        ids_ok = all(text[r] == text[int(rows[o])] for r, o in enumerate(owner.tolist()))
        return (int(H[0]), rows, owner) if ids_ok else None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 image_index: torch.Tensor | None = None, *, max_new_tokens: int | None = None,
                 num_beams: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Answer]:
        """Answers for a left-padded batch. Greedy decoding runs its own KV-cached loop (shared image heads, stop
        strings checked as it goes); beam search and sampling use transformers' `generate`. Unset `num_beams` and
        `max_new_tokens` come from `config.generation` (the source paper's decoding)."""
        stop = list(stop) if stop is not None else self.processor.stop_strings()
        defaults = self.config.generation
        num_beams = defaults.num_beams if num_beams is None else num_beams
        max_new_tokens = defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        if num_beams > 1 and "length_penalty" not in generate_kwargs:
            generate_kwargs["length_penalty"] = defaults.length_penalty
        with self._lora_merged():
            embeds = self.embed(input_ids, image_mask, self.prefix(pixel_values, features, image_index))
            mask = attention_mask.to(self.device)
            if num_beams == 1 and not do_sample and not generate_kwargs:
                ids, steps = self._greedy(embeds, mask, image_mask.to(self.device), image_index, input_ids,
                                          max_new_tokens, stop)
            else:
                if not self.config.tuning.method.transformers_generate:
                    raise ConfigError(f"tuning.mode={self.config.tuning.mode!r} generates greedily only (peft's "
                                      "key/value prefixes cannot be combined with transformers' generate on "
                                      "inputs_embeds)")
                lm, kwargs = self._lm_inputs(embeds, mask)
                sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
                criteria = [self.processor.stop_criteria(stop)] if stop else []
                out = lm.generate(inputs_embeds=kwargs["inputs_embeds"], attention_mask=kwargs["attention_mask"],
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.processor.pad_id,
                                  stopping_criteria=criteria, return_dict_in_generate=True, output_scores=True,
                                  output_logits=True, use_cache=True, **sampling, **generate_kwargs)
                ids = out.sequences[:, -len(out.scores):]  # only the new tokens
                if num_beams > 1:
                    steps = lm.compute_transition_scores(out.sequences, out.scores, out.beam_indices, False)
                else:
                    logp = torch.stack(out.logits, 1).float().log_softmax(-1)
                    steps = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return [self._finish(row, lp, stop) for row, lp in zip(ids.tolist(), steps.float().tolist())]

    def _greedy(self, embeds: torch.Tensor, mask: torch.Tensor, image_mask: torch.Tensor,
                image_index: torch.Tensor | None, input_ids: torch.Tensor, max_new_tokens: int, stop: Sequence[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """KV-cached greedy decoding -> (new ids (B, n), their log-probabilities (B, n))."""
        lm = self._lm()
        logits, cache, mask, pos = self._prefill(embeds, mask, image_mask, image_index, input_ids)
        emb, eos = self.decoder.get_input_embeddings(), self.tokenizer.eos_token_id
        criteria = self.processor.stop_criteria(stop) if stop else None
        B = embeds.shape[0]
        ids = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        steps = torch.zeros(B, 0, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            logp = logits.float().log_softmax(-1)  # (B, V)
            nxt = logp.argmax(-1)  # (B,)
            ids = torch.cat([ids, nxt[:, None]], 1)
            steps = torch.cat([steps, logp.gather(-1, nxt[:, None])], 1)
            done |= nxt == eos if eos is not None else done
            if criteria is not None:
                done |= criteria(ids, None).to(self.device)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            pos = pos + 1
            out = lm(inputs_embeds=emb(nxt[:, None]).to(embeds.dtype), attention_mask=mask, position_ids=pos[:, None],
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits, cache = out.logits[:, -1], out.past_key_values
        return ids, steps

    def _finish(self, ids: list[int], steps: list[float], stop: Sequence[str]) -> Answer:
        """Cut a row at EOS or at the token that completes a stop string; score and count only what is kept."""
        eos = self.tokenizer.eos_token_id
        n = len(ids)
        if eos is not None and eos in ids:
            n = ids.index(eos) + 1
        text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        if any(s in text for s in stop):
            n = next(k for k in range(1, n + 1)
                     if any(s in self.tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop))
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            text = min((text.split(s)[0] for s in stop), key=len)
        score = float(sum(steps[:n]))
        return Answer(text.strip(), score, n, (self.calibration or Calibration()).generated(score, n))

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor], pairs: Sequence[Sequence[Sample]],
              features: torch.Tensor | None = None) -> list[list[float]]:
        """Mean log-probability of each candidate's answer tokens (+ EOS): pairs[q] are question q's tokenised
        (prompt, candidate) samples. The prompt common to a question's candidates runs once with a KV cache; the
        candidates continue from it and the vocabulary projection runs only where a candidate token is predicted."""
        with self._lora_merged():  # folded LoRA for the whole pass
            features = batch.get("features") if features is None else features
            prefix = self.prefix(batch.get("pixel_values"), features, batch.get("image_index"))  # (S, L, E)
            slots = [len(s[0].pieces) - 1 for s in pairs]  # image slots per question
            first_slot = [sum(slots[:q]) for q in range(len(pairs))]
            prompts, conts, owners, starts, slot_rows = [], [], [], [], []
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
            p = self.processor.pad(prompts, "left", labels=False)
            embeds = self.embed(p["input_ids"], p["image_mask"], prefix[torch.tensor(slot_rows, dtype=torch.long)])
            mask = p["attention_mask"].to(self.device)
            lm = self._lm()
            last, cache, mask, pos = self._prefill(embeds, mask, p["image_mask"].to(self.device), None)
            owner = torch.tensor(owners, device=self.device)
            cache.reorder_cache(owner)
            P, C = len(conts), max(map(len, conts))
            ids = torch.full((P, C), self.processor.pad_id, dtype=torch.long, device=self.device)
            cmask = torch.zeros(P, C, dtype=torch.long, device=self.device)
            counted = torch.zeros(P, C, dtype=torch.bool, device=self.device)
            for i, (c, s) in enumerate(zip(conts, starts)):
                ids[i, :len(c)], cmask[i, :len(c)], counted[i, s:len(c)] = torch.tensor(c), 1, True
            keep = F.pad(counted[:, 1:], (0, 1))  # continuation position j predicts token j + 1
            out = lm(inputs_embeds=self.decoder.get_input_embeddings()(ids).to(embeds.dtype),
                     attention_mask=torch.cat([mask[owner], cmask], 1),
                     position_ids=pos[owner, None] + 1 + torch.arange(C, device=self.device), past_key_values=cache,
                     use_cache=False, logits_to_keep=keep if C > 1 else 0)
            token_lp = torch.zeros(P, C, device=self.device)
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

        # --- what trains ----------------------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per group: encoder, mapper, lora (all peft tensors), decoder (base weights)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
        groups["encoder"] = list(self.encoder.named_parameters())
        groups["mapper"] = list(self.mapper.named_parameters())
        for name, p in self.decoder.named_parameters():
            groups["lora" if is_peft_param(name) else "decoder"].append((name, p))
        return groups

    def set_trainable(self, *groups: str) -> None:
        """Exactly these groups train; everything else is frozen (the curriculum's per-stage switch)."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ConfigError(f"unknown parameter group(s) {sorted(unknown)}; expected some of {list(GROUPS)}")
        self.changed_parts.update(g for g in groups if g in ("encoder", "decoder"))
        for group, params in self.parameter_groups().items():
            for _, p in params:
                p.requires_grad_(group in groups and p.dtype.is_floating_point)

    def _set_group(self, group: str, trainable: bool) -> None:
        if trainable and group in ("encoder", "decoder"):
            self.changed_parts.add(group)
        for _, p in self.parameter_groups()[group]:
            p.requires_grad_(trainable and p.dtype.is_floating_point)

    def freeze_encoder(self, frozen: bool = True) -> None:
        self._set_group("encoder", not frozen)
        self.encoder.train(self.training and not frozen)

    def freeze_mapper(self, frozen: bool = True) -> None:
        self._set_group("mapper", not frozen)

    def freeze_decoder(self, frozen: bool = True, include_lora: bool = True) -> None:
        self._set_group("decoder", not frozen)
        if include_lora:
            self._set_group("lora", not frozen)

    def train(self, mode: bool = True) -> "MedVQAAdapter":
        super().train(mode)
        for part in (self.encoder, self.decoder):  # frozen parts keep dropout/batch-norm in inference behaviour
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def parameter_report(self) -> dict[str, dict[str, int]]:
        report = {g: {"trainable": sum(p.numel() for _, p in ps if p.requires_grad),
                      "total": sum(p.numel() for _, p in ps)} for g, ps in self.parameter_groups().items()}
        report["all"] = {k: sum(r[k] for r in report.values()) for k in ("trainable", "total")}
        return report

    def describe_parameters(self) -> str:
        rows = [f"{g:<8} {r['trainable']:>14,} / {r['total']:>14,}" for g, r in self.parameter_report().items()]
        return "group         trainable /          total\n" + "\n".join(rows)
