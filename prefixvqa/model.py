"""MedVQAAdapter: image encoder -> mapper -> visual prefix -> causal decoder (+ LoRA).

The model owns the prompt layout, the placement of visual prefixes, label masking and the shift, so trainers and
evaluators only pass images, questions and answers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import prompts
from .config import AdapterConfig, ConfigError
from .decoder import apply_tuning, check_decoder_available, decoder_fingerprint, fingerprint, load_decoder
from .mappers import build_mapper
from .vision import ModelNotAvailableError, VisionEncoder, check_encoder_available

GROUPS = ("encoder", "mapper", "lora", "decoder")  # "lora" holds every peft tensor (LoRA or soft prompts)
IGNORE = -100


@dataclass
class Answer:
    text: str
    score: float  # log-probability of the generated tokens (sum)
    num_tokens: int


@dataclass
class AdapterOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, V)
    labels: torch.Tensor  # (B, T), IGNORE outside answers
    attention_mask: torch.Tensor  # (B, T)


Sample = tuple[list[list[int]], list[int]]  # (text pieces around the image slots, answer ids)


def check_available(config: AdapterConfig, encoder: bool = True, decoder: bool = True) -> None:
    """Before loading anything: every missing weight/config, each named by hub id or path, in one error."""
    problems = []
    for needed, check, cfg in ((encoder, check_encoder_available, config.encoder),
                               (decoder, check_decoder_available, config.decoder)):
        try:
            if needed:
                check(cfg)
        except ModelNotAvailableError as exc:
            problems.append(str(exc))
    if problems:
        raise ModelNotAvailableError("\n".join(problems))


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
        self.mapper = build_mapper(self.config.mapper)
        self.decoder = apply_tuning(decoder, config.tuning, quantized=bool(config.decoder.quantization),
                                    checkpointing=config.decoder.gradient_checkpointing)
        self.tokenizer = tokenizer
        self.freeze_encoder(config.encoder.freeze)

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

    def save_pretrained(self, path: str | Path, *, card: dict[str, Any] | None = None) -> Path:
        from .adapter_io import save_adapter

        return save_adapter(self, path, card=card)

    # --- core forward -------------------------------------------------------------------------------------------
    def forward(self, images: Sequence[Any] | None = None, questions: Sequence[str] = (),
                answers: Sequence[str] | None = None, *, features: torch.Tensor | None = None,
                shots: Sequence[Sequence[tuple[str, str]]] | None = None) -> AdapterOutput:
        feats = self.encode_images(images) if features is None else features  # (I, N, D_v), I = images in batch
        prefix = self.mapper(feats.to(self.device, torch.float32))  # (I, L, E)
        samples = self._tokenize_batch(questions, answers, shots)
        embeds, mask, labels = self._assemble(prefix, samples, left_pad=False)  # (B, T, E), (B, T), (B, T)
        logits = self._decode(embeds, mask)  # (B, T, V)
        loss = None
        if answers is not None:  # next-token loss on answer tokens only: position t predicts label t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return AdapterOutput(loss, logits, labels, mask)

    def _decode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return out.logits[:, -embeds.shape[1]:]  # peft prompt tuning prepends virtual tokens: drop their logits

    def _assemble(self, prefix: torch.Tensor, samples: list[Sample], left_pad: bool):
        """Interleave text embeddings and visual prefixes; pad to one length. Returns (embeds, mask, labels)."""
        emb = self.decoder.get_input_embeddings()
        chunks = [ids for pieces, answer in samples for ids in (*pieces, answer)]
        flat = torch.tensor(list(itertools.chain.from_iterable(chunks)), dtype=torch.long, device=self.device)
        table = iter(emb(flat).split([len(c) for c in chunks]))  # one embedding call for the whole batch
        prefix = prefix.to(emb.weight.dtype)
        images = iter(prefix)
        seqs, labels = [], []
        for pieces, answer in samples:
            parts, labs = [], []
            for j, ids in enumerate(pieces):
                if j:  # an image slot sits between consecutive text pieces
                    parts.append(next(images))
                    labs.append(torch.full((prefix.shape[1],), IGNORE, dtype=torch.long))
                parts.append(next(table))
                labs.append(torch.full((len(ids),), IGNORE, dtype=torch.long))
            parts.append(next(table))
            labs.append(torch.tensor(answer, dtype=torch.long))
            seqs.append(torch.cat(parts))
            labels.append(torch.cat(labs))
        B, T = len(seqs), max(len(s) for s in seqs)
        embeds = prefix.new_zeros(B, T, prefix.shape[-1])
        mask = torch.zeros(B, T, dtype=torch.long, device=self.device)
        label_out = torch.full((B, T), IGNORE, dtype=torch.long, device=self.device)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            span = slice(T - len(s), T) if left_pad else slice(0, len(s))
            embeds[i, span], mask[i, span], label_out[i, span] = s, 1, lab.to(self.device)
        return embeds, mask, label_out

    # --- text side ------------------------------------------------------------------------------------------------
    def tokenize(self, question: str, answer: str | None = None, shots: Sequence[tuple[str, str]] = ()) -> Sample:
        """Token ids of the prompt pieces around each image slot, and of the answer (+ EOS) when given."""
        t = self.config.template
        prompt = prompts.render(t.name, question, position=t.image_position, system=t.system, shots=shots,
                                tokenizer=self.tokenizer)
        pieces = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts.split_on_images(prompt)]
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not pieces[0] or pieces[0][0] != bos):
            pieces[0] = [bos] + pieces[0]
        if answer is None:
            return pieces, []
        answer_ids = self.tokenizer(prompts.answer_text(t.name, answer), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        answer_ids = answer_ids + ([eos] if eos is not None else [])
        room = t.max_length - sum(map(len, pieces))
        return pieces, answer_ids[:max(room, 1)]

    def _tokenize_batch(self, questions, answers, shots) -> list[Sample]:
        answers = answers if answers is not None else [None] * len(questions)
        shots = shots if shots is not None else [()] * len(questions)
        return [self.tokenize(q, a, s) for q, a, s in zip(questions, answers, shots, strict=True)]

    # --- images ---------------------------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (or, per sample, a list of images for few-shot prompts) -> features (I, N, D_v) in float32."""
        flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        pixels = self.encoder.pixels(flat).to(self.device, self._encoder_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.encoder.freeze):
            return self.encoder(pixels).float()

    @property
    def _encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images: Sequence[Any] | None, questions: Sequence[str], *, features: torch.Tensor | None = None,
               shots: Sequence[Sequence[tuple[str, str]]] | None = None, max_new_tokens: int = 32,
               num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               stop: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Answer]:
        """Batched generation through `generate(inputs_embeds=...)` (KV cache on); text is cut at stop strings."""
        feats = self.encode_images(images) if features is None else features
        samples = self._tokenize_batch(questions, None, shots)
        embeds, mask, _ = self._assemble(self.mapper(feats.to(self.device, torch.float32)), samples, left_pad=True)
        stop = list(stop) if stop is not None else prompts.stop_strings(self.config.template.name)
        eos = self.tokenizer.eos_token_id
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        if self.config.tuning.mode == "prefix_tuning":
            if num_beams > 1 or do_sample:
                raise ValueError("tuning.mode='prefix_tuning' generates greedily only (peft's key/value prefixes "
                                 "cannot be combined with transformers' generate on inputs_embeds)")
            return self._greedy_uncached(embeds, mask, max_new_tokens, stop)
        lm, extra = self._generation_model(embeds, mask)
        out = lm.generate(
            **extra, max_new_tokens=max_new_tokens, num_beams=num_beams,
            do_sample=do_sample, eos_token_id=eos, pad_token_id=self._pad_id(), stop_strings=stop or None,
            tokenizer=self.tokenizer, return_dict_in_generate=True, output_scores=True, output_logits=True,
            use_cache=True, **sampling, **generate_kwargs)
        seqs = out.sequences[:, -len(out.scores):]  # only the new tokens
        if num_beams > 1:
            steps = lm.compute_transition_scores(out.sequences, out.scores, out.beam_indices, False)
        else:
            steps = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
        done = torch.cumsum((seqs == eos).long(), 1) - (seqs == eos).long() > 0 if eos is not None else seqs < 0
        answers = []
        for ids, lp, after in zip(seqs, steps, done):
            keep = ~after
            text = self.tokenizer.decode(ids[keep], skip_special_tokens=True).lstrip()
            for s in stop:
                text = text.split(s)[0]
            answers.append(Answer(text.strip(), float(lp[keep].sum()), int(keep.sum())))
        return answers

    def _generation_model(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
        """The module to call `generate` on, and its inputs. peft's soft prompts are placed here explicitly because
        peft's own generate does not accept `inputs_embeds`: virtual tokens go in front (prompt tuning) or into the
        KV cache (prefix tuning), exactly where its forward puts them during training."""
        if self.config.tuning.mode != "prompt_tuning":
            return self.decoder, {"inputs_embeds": embeds, "attention_mask": mask}
        B = embeds.shape[0]
        prompt = self.decoder.get_prompt(batch_size=B).to(embeds.dtype)  # (B, V, E)
        mask = torch.cat([mask.new_ones(B, self.config.tuning.num_virtual_tokens), mask], dim=1)
        return self.decoder.get_base_model(), {"inputs_embeds": torch.cat([prompt, embeds], 1), "attention_mask": mask}

    def _greedy_uncached(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                         stop: Sequence[str]) -> list[Answer]:
        """Greedy decoding through the peft forward (recomputed each step): the path for peft prefix tuning."""
        eos, emb = self.tokenizer.eos_token_id, self.decoder.get_input_embeddings()
        B = embeds.shape[0]
        ids = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        scores = torch.zeros(B, device=self.device)
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            logp = self._decode(embeds, mask)[:, -1].float().log_softmax(-1)  # (B, V)
            nxt = logp.argmax(-1)
            scores += torch.where(alive, logp.gather(-1, nxt[:, None]).squeeze(-1), 0.0)
            ids = torch.cat([ids, torch.where(alive, nxt, eos if eos is not None else 0)[:, None]], 1)
            alive &= nxt != eos if eos is not None else alive
            embeds = torch.cat([embeds, emb(ids[:, -1:]).to(embeds.dtype)], 1)
            mask = torch.cat([mask, alive[:, None].long()], 1)
            if not alive.any():
                break
        out = []
        for row, score in zip(ids, scores):
            n = int((row != eos).sum()) + int((row == eos).any()) if eos is not None else len(row)
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True).lstrip()
            for s in stop:
                text = text.split(s)[0]
            out.append(Answer(text.strip(), float(score), n))
        return out

    @torch.no_grad()
    def score_choices(self, images: Sequence[Any] | None, questions: Sequence[str], choices: Sequence[Sequence[str]],
                      *, features: torch.Tensor | None = None, shots: Sequence[Sequence[tuple[str, str]]] | None = None,
                      return_loglik: bool = False) -> list[list[float]]:
        """Rank candidate answers by length-normalised log-likelihood, all (question, choice) pairs in one pass.

        Returns per-question probabilities (softmax over the normalised log-likelihoods), or the raw
        normalised log-likelihoods with `return_loglik=True`.
        """
        feats = self.encode_images(images) if features is None else features
        prefix = self.mapper(feats.to(self.device, torch.float32))  # (I, L, E)
        shots = shots if shots is not None else [()] * len(questions)
        per_sample = [len(s) + 1 for s in shots]  # images per sample
        starts = [0, *itertools.accumulate(per_sample)]
        samples, index = [], []
        for i, (q, options) in enumerate(zip(questions, choices, strict=True)):
            for c in options:
                samples.append(self.tokenize(q, c, shots[i]))
                index.extend(range(starts[i], starts[i + 1]))
        embeds, mask, labels = self._assemble(prefix[torch.tensor(index, device=self.device)], samples, left_pad=False)
        logp = self._decode(embeds, mask)[:, :-1].float().log_softmax(-1)  # (P, T-1, V)
        target = labels[:, 1:]
        token_lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != IGNORE)
        mean_lp = token_lp.sum(1) / (target != IGNORE).sum(1).clamp(min=1)  # (P,)
        out, pos = [], 0
        for options in choices:
            scores = mean_lp[pos:pos + len(options)]
            out.append((scores if return_loglik else scores.softmax(0)).tolist())
            pos += len(options)
        return out

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # output padding only

    # --- what trains ----------------------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per group: encoder, mapper, lora (all peft tensors), decoder (base weights)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
        groups["encoder"] = list(self.encoder.named_parameters())
        groups["mapper"] = list(self.mapper.named_parameters())
        for name, p in self.decoder.named_parameters():
            peft_part = any(k in name for k in ("lora_", "prompt_encoder", "modules_to_save"))
            groups["lora" if peft_part else "decoder"].append((name, p))
        return groups

    def set_trainable(self, *groups: str) -> None:
        """Exactly these groups train; everything else is frozen (the curriculum's per-stage switch)."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ConfigError(f"unknown parameter group(s) {sorted(unknown)}; expected some of {list(GROUPS)}")
        for group, params in self.parameter_groups().items():
            for _, p in params:
                p.requires_grad_(group in groups and p.dtype.is_floating_point)

    def _set_group(self, group: str, trainable: bool) -> None:
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
        if not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.eval()  # a frozen encoder keeps dropout/batch-norm in inference behaviour
        return self

    def parameter_report(self) -> dict[str, dict[str, int]]:
        report = {g: {"trainable": sum(p.numel() for _, p in ps if p.requires_grad),
                      "total": sum(p.numel() for _, p in ps)} for g, ps in self.parameter_groups().items()}
        report["all"] = {k: sum(r[k] for r in report.values()) for k in ("trainable", "total")}
        return report

    def describe_parameters(self) -> str:
        rows = [f"{g:<8} {r['trainable']:>14,} / {r['total']:>14,}" for g, r in self.parameter_report().items()]
        return "group         trainable /          total\n" + "\n".join(rows)
