"""MedVQAAdapter: image encoder -> mapper -> visual prefix -> causal decoder (+ LoRA or another tuning mode).

The model takes tensors (`forward`); its `processor` turns images, questions and records into them. This file holds
the module itself: its parts, the factories, `forward`/`prefix`/`embed`, parameter groups and the train/eval switches.
Answering and scoring (`generate`, `score`, `answer`, `score_choices`) live in `generation.py`; the methods of the
same names here delegate to it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import generation as _generation
from .calibration import Calibration
from .config import AdapterConfig, ConfigError
from .encoders import build_encoder
from .decoder import (apply_tuning, attention_kernel, check_available, context_length, decoder_fingerprint, fingerprint,
                      is_peft_param, load_decoder)
from .errors import PrefixVQAError
from .generation import Answer, abstain, evaluating  # noqa: F401 (Answer, abstain re-exported for old imports)
from .mappers import build_mapper
from .data.processor import IGNORE, MedVQAProcessor, Sample
from .rng import seeded
from .vision import VisionEncoder

# The parameter groups every part of the library names (set_trainable, curriculum stages, optimiser groups, reports).
# "lora" holds every peft tensor whatever the mode (LoRA/DoRA matrices, prompt-tuning and prefix-tuning virtual
# tokens); "decoder" holds the base decoder's own weights; "encoder" and "mapper" are the vision side.
GROUPS = ("encoder", "mapper", "lora", "decoder")
#: `from_pretrained("vlm:SOURCE")`: a released vision-language checkpoint as released (see `from_vlm`)
VLM_SCHEME = "vlm:"


def _numel(p: torch.Tensor) -> int:
    """The weights a parameter stands for: a bitsandbytes 4-bit weight stores two per byte in a flat tensor, its
    `quant_state` keeps the real shape (8-bit weights hold one per element already)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


class BatchError(PrefixVQAError, ValueError):
    """The tensors passed to the model do not fit together (no image input, or image slots that do not match the
    prefixes); raised before any decoder work so the message names the mismatch."""


@dataclass
class AdapterOutput:
    """What `forward` returns; training reads `loss`, tests and calibration read the logits against the labels."""

    loss: torch.Tensor | None
    logits: torch.Tensor  # (K, V) at the K supervised positions when labels are given, else (B, T, V)
    labels: torch.Tensor | None  # (B, T), IGNORE outside answers
    attention_mask: torch.Tensor  # (B, T)


class MedVQAAdapter(nn.Module):
    """The trainable bridge between a vision encoder and a causal decoder, saved as a small adapter folder.

    Build one with a factory (`from_preset`, `from_pretrained`) or from an `AdapterConfig`. Parts may be passed
    prebuilt (tests, several adapters sharing one loaded decoder); otherwise the constructor loads them, after checking
    in one error that every weight it needs is there.

    The fresh tensors (mapper, LoRA/peft) are initialised under `rng.seeded(seed)`: the same config and seed give the
    same adapter whether it is built here, by `from_preset` or by a recipe (which passes `train.seed`), and the
    caller's random generators are left as they were; `seed=None` draws from the caller's generators instead. A new
    model is in training mode (nn.Module's default); the inference methods switch to eval mode for their call.
    A `template.max_length` longer than the decoder's context leaves beside the visual prefix is clamped, with a
    warning."""

    def __init__(self, config: AdapterConfig, *, encoder: VisionEncoder | None = None, decoder: nn.Module | None = None,
                 tokenizer: Any = None, seed: int | None = 0):
        super().__init__()
        check_available(config, encoder is None, decoder is None)
        encoder = encoder if encoder is not None else build_encoder(config.encoder)
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
        self.max_positions = context_length(decoder)  # the decoder's context (None: its config names none)
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            self.mapper = build_mapper(self.config.mapper, self.config.template.image_start_end)
            self.decoder = apply_tuning(decoder, config.tuning, quantized=bool(config.decoder.quantization),
                                        checkpointing=config.decoder.gradient_checkpointing)
        if self.config.template.image_start_end:  # as LLaVA initialised <im_start>/<im_end>: the mean token embedding
            with torch.no_grad():
                self.mapper.delimiters.copy_(decoder.get_input_embeddings().weight.float().mean(0).expand(2, -1))
        with torch.no_grad(), evaluating(self.mapper):
            prefix_length = self.mapper(torch.zeros(1, num_tokens, feat_dim)).shape[1]
        self._fit_template(prefix_length)
        self.processor = MedVQAProcessor(tokenizer, self.config.template, encoder.preprocess, prefix_length)
        self.calibration: Calibration | None = None  # temperatures fitted on validation data (calibration.json)
        self.image_summary: Any = None  # training images' feature summary (ood.ImageSummary, image_summary.safetensors)
        self.freeze_encoder(config.encoder.freeze)

    @property
    def config(self) -> AdapterConfig:
        """The adapter's settings, saved as `prefixvqa_config.json`. Setting a new one (a curriculum stage's template
        or tuning) also gives the processor its template and context: what trains is what the saved config says."""
        return self._config

    @config.setter
    def config(self, config: AdapterConfig) -> None:
        """Replace the settings; the processor follows (see the getter)."""
        self._config = config
        processor = self.__dict__.get("_processor")
        if processor is not None:
            processor.use_template(config.template)
            self.processor = processor  # the context again: a tuning switch may change the virtual tokens

    @property
    def processor(self) -> MedVQAProcessor:
        """Records in, tensors out (see `data/processor.py`). Whichever processor is set (built here, or read from
        an adapter folder) is told the decoder's context, so its prompts never outgrow it."""
        return self._processor

    @processor.setter
    def processor(self, processor: MedVQAProcessor) -> None:
        """Set the processor and give it the decoder's context and the room a generated answer needs."""
        processor.context_length = self.text_context
        if self.text_context is not None:  # room for a generated answer, at most half of what the prefix leaves
            free = self.text_context - processor.image_seq_length
            processor.answer_room = max(0, min(self.config.generation.max_new_tokens, free // 2))
        self._processor = processor

    @property
    def text_context(self) -> int | None:
        """Positions one sequence may fill (visual prefixes + tokens + generated tokens): the decoder's context less
        the tuning mode's virtual tokens; None when the decoder's config names no context."""
        if self.max_positions is None:
            return None
        return self.max_positions - self.config.tuning.method.virtual_positions(self.config.tuning)

    def _fit_template(self, prefix_length: int) -> None:
        """Clamp `template.max_length` to what the decoder's context leaves beside one visual prefix, with a warning;
        refuse a decoder whose context cannot hold the prefix and a minimal prompt."""
        if self.text_context is None:
            return
        room, asked = self.text_context - prefix_length, self.config.template.max_length
        if room < 8:
            raise ConfigError(f"the decoder's context ({self.max_positions} positions) leaves {room} beside the "
                              f"visual prefix ({prefix_length}) and soft prompt: too short for a prompt; shorten "
                              "mapper.prefix_length or tuning.num_virtual_tokens, or use another decoder")
        if asked > room:
            warnings.warn(f"template.max_length={asked} is longer than the decoder's context leaves beside the visual "
                          f"prefix ({self.max_positions} positions - {prefix_length} prefix"
                          f"{' - soft prompt' if self.text_context < self.max_positions else ''}); clamped to {room}",
                          stacklevel=3)
            self.config = self.config.replace(template={"max_length": room})

    @property
    def tokenizer(self) -> Any:
        """The decoder's tokenizer, as the processor holds it (one object: a processor loaded from an adapter folder
        brings its own, and this follows it)."""
        return self.processor.tokenizer

    # --- factories ------------------------------------------------------------------------------------------------
    @staticmethod
    def list_presets() -> list[str]:
        """Names `from_preset` accepts (the JSON presets shipped with the package), sorted; reads no weights."""
        from .presets import list_presets

        return list_presets()

    @classmethod
    def from_preset(cls, name: str, *, seed: int | None = 0, **overrides: Any) -> "MedVQAAdapter":
        """A new, untrained adapter for a published setting (e.g. "llava-med"): the preset's config with `overrides`
        applied (section dicts merge, `decoder={"name": ...}`; `a__b=v` sets one field), then the encoder and decoder
        weights loaded; mapper and LoRA initialised under `seed` (as a recipe with `train.seed` does). Offline
        (HF_HUB_OFFLINE=1) only cached weights are used; every missing one is named in one
        `ModelNotAvailableError` before anything loads. Unknown names raise `ConfigError` listing `list_presets()`.
        The model is in training mode, ready for `train`."""
        from .presets import preset_config
        from .vlm_import import load_release_weights

        model = cls(preset_config(name, **overrides), seed=seed)
        load_release_weights(model)  # a released-weights preset (decoder.layout): its projector, as from_vlm
        return model

    @classmethod
    def from_vlm(cls, source: str, *, revision: str | None = None, seed: int | None = 0,
                 **overrides: Any) -> "MedVQAAdapter":
        """A released vision-language checkpoint (LLaVA, LLaVA-Med v1.5, LLaVA-Rad's LoRA release, transformers'
        LlavaForConditionalGeneration; local folder or hub id) as an adapter whose tower, projector (the mapper),
        language model and template are the checkpoint's, read from its own config (see prefixvqa/vlm_import.py);
        `overrides` change the config as in `from_preset`. Ready to answer or to fine-tune (LoRA by default)."""
        from .vlm_import import from_vlm

        return from_vlm(cls, source, revision=revision, seed=seed, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True, **overrides: Any) -> "MedVQAAdapter":
        """A trained adapter, ready to answer: `path` is a local folder, a local hub name ("name" or "name@version")
        or a Hugging Face Hub repo id (offline: from the cache only). The folder's files are verified against its
        manifest, its config must come from a compatible release, and the base models are loaded and fingerprinted:
        with `strict` (the default) a base whose weights differ from the ones it was trained on is refused
        (`AdapterLoadError`), since the adapter would silently answer worse; `strict=False` loads anyway. The
        trained tensors, peft files, processor and calibration then replace the fresh ones. `overrides` change the
        stored config before loading (e.g. a local decoder path). Returned in eval mode, as transformers does; call
        `.train()` to train it further. ``"vlm:SOURCE"`` is a released checkpoint as it was released (`from_vlm`
        with nothing added: `tuning.mode` frozen), so every command that takes `--adapter` answers, evaluates and
        serves a released model in one step."""
        from .adapter_io import load_adapter

        if str(path).startswith(VLM_SCHEME):
            return cls.from_vlm(str(path)[len(VLM_SCHEME):], **{"tuning": {"mode": "frozen"}, **overrides}).eval()
        return load_adapter(cls, path, strict=strict, **overrides).eval()

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
                full_logits: bool = False, segment_ids: torch.Tensor | None = None) -> AdapterOutput:
        """Tensors from the processor -> loss on answer tokens. lm_head runs only where a label is supervised.
        `segment_ids` marks a packed batch's records (data/packing.py): each attends and counts positions alone."""
        embeds = self.embed(input_ids, image_mask, self.prefix(pixel_values, features, image_index))  # (B, T, E)
        keep = None
        if labels is not None and not full_logits:  # position t predicts label t + 1
            keep = F.pad(labels[:, 1:] != IGNORE, (0, 1))  # (B, T) bool
        lm, kwargs = self._lm_inputs(embeds, attention_mask, keep=keep if keep is not None else 0,
                                     segments=segment_ids, image_mask=image_mask)
        with attention_kernel(lm, kwargs["inputs_embeds"].shape[1], embeds.device):
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
                raise BatchError("pass pixel_values (images through the processor) or features (the cache)")
            features = self.encode_pixels(pixel_values)  # (I, N, D_v)
        prefix = self.mapper(features.to(self.device, torch.float32))  # (I, L, E)
        return prefix if image_index is None else prefix[image_index.to(self.device)]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual prefixes written into the image slots, in order: (B, T, E)."""
        emb = self.decoder.get_input_embeddings()
        embeds = emb(input_ids.to(self.device))  # (B, T, E)
        slots = image_mask.to(self.device)
        if int(slots.sum()) != prefix.shape[0] * prefix.shape[1]:
            raise BatchError(f"{int(slots.sum())} image positions but {prefix.shape[0]} prefixes of "
                             f"{prefix.shape[1]} vectors")
        return embeds.masked_scatter(slots[..., None], prefix.to(embeds.dtype))

    def _lm_inputs(self, embeds: torch.Tensor, mask: torch.Tensor, keep: int | torch.Tensor = 0,
                   segments: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """The module to call and its first-call inputs. Position ids follow the attention mask, so left-padded rows
        equal unpadded ones. peft's soft prompts are placed here as peft's own forward places them (virtual tokens in
        front for prompt tuning, key/value prefixes for prefix tuning), which also lets a KV cache be reused."""
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                  "logits_to_keep": keep}
        if segments is not None:  # a packed batch: block-diagonal causal mask, positions restarting per record
            from .data.packing import packed_inputs

            kwargs.update(packed_inputs(self, segments.to(self.device), embeds.dtype))
        elif image_mask is not None and self.image_attention is not None:  # Gemma 3: each image's tokens both ways
            from .vlm_gemma3 import image_attention_masks

            if self.config.tuning.method.soft_prompt:
                raise ConfigError(f"tuning.mode={self.config.tuning.mode!r} puts virtual tokens in front of the "
                                  f"prompt, which decoder.layout={self.config.decoder.layout!r}'s image-attention "
                                  "masks do not cover: use lora, dora, full or frozen")
            kwargs["attention_mask"] = image_attention_masks(self.decoder.config, mask, image_mask, embeds.dtype)
        method = self.config.tuning.method
        return method.language_model(self.decoder), method.place_virtual_tokens(self.decoder, self.config.tuning,
                                                                                kwargs, positions)

    @property
    def image_attention(self) -> str | None:
        """How the decoder attends over image tokens where that is not causal (the layout's rule, vlm_layouts.py
        `IMAGE_ATTENTION`: Gemma 3's "bidirectional"), else None."""
        from .vlm_layouts import IMAGE_ATTENTION

        return IMAGE_ATTENTION.get(self.config.decoder.layout)

    # --- images -------------------------------------------------------------------------------------------------
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, H, W) -> features (I, N, D_v) in float32; no graph through a frozen tower."""
        pixels = pixel_values.to(self.device, self._encoder_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.encoder.freeze):
            return self.encoder(pixels).float()

    def encode_images(self, images: Sequence[Any], views: Sequence[dict[str, Any] | None] | None = None
                      ) -> torch.Tensor:
        """Images (or, per sample, a list of images for few-shot prompts) -> features (I, N, D_v): what the cache
        stores. Loading and preprocessing go through the processor; the encoder runs in eval mode (its caller's mode is
        given back)."""
        flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        with evaluating(self):
            return self.encode_pixels(self.processor.pixel_values(flat, views))

    @property
    def _encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the mapper's device (the part that is always on one device, whatever the decoder's
        placement)."""
        return next(self.mapper.parameters()).device

    # --- inference: delegations to prefixvqa/generation.py -----------------------------------------------------
    def answer(self, images: Sequence[Any] | None, questions: Sequence[str], *, features: torch.Tensor | None = None,
               shots: Sequence[Sequence[tuple[str, str]]] | None = None, views: Sequence[dict] | None = None,
               abstain_below: float | None = None, **generation: Any) -> list[Answer]:
        """Answer questions about images (paths, bytes, PIL; the same object for several questions is encoded once
        and its prefix KV shared). Few-shot: per question a list of images (shots' then the query's) and `shots`
        [(question, answer), ...]. Answers whose confidence is below `abstain_below` come back as "uncertain" with
        the guess kept. Generation settings: see `generate`."""
        return _generation.answer(self, images, questions, features=features, shots=shots, views=views,
                                  abstain_below=abstain_below, **generation)

    def score_choices(self, images: Sequence[Any] | None, questions: Sequence[str], choices: Sequence[Sequence[str]],
                      *, features: torch.Tensor | None = None, shots: Sequence[Sequence[tuple[str, str]]] | None = None,
                      views: Sequence[dict] | None = None, return_loglik: bool = False) -> list[list[float]]:
        """Rank candidate answers by length-normalised log-likelihood (answer tokens + EOS). Each question's prompt
        runs once; its KV cache serves its K candidates. Returns per-question probabilities (softmax over the
        normalised log-likelihoods, divided by the calibrated temperature when the adapter has one), or those
        log-likelihoods with `return_loglik=True`."""
        return _generation.score_choices(self, images, questions, choices, features=features, shots=shots,
                                         views=views, return_loglik=return_loglik)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 image_index: torch.Tensor | None = None, *, max_new_tokens: int | None = None,
                 num_beams: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Answer]:
        """Answers for a left-padded batch. Greedy decoding runs its own KV-cached loop (shared image heads, stop
        strings checked as it goes); beam search and sampling use transformers' `generate`. Unset `num_beams` and
        `max_new_tokens` come from `config.generation` (the source paper's decoding)."""
        return _generation.generate(self, input_ids, attention_mask, image_mask, pixel_values, features, image_index,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, stop=stop, **generate_kwargs)

    def score(self, batch: dict[str, torch.Tensor], pairs: Sequence[Sequence[Sample]],
              features: torch.Tensor | None = None) -> list[list[float]]:
        """Mean log-probability of each candidate's answer tokens (+ EOS): pairs[q] are question q's tokenised
        (prompt, candidate) samples. The prompt common to a question's candidates runs once with a KV cache; the
        candidates continue from it and the vocabulary projection runs only where a candidate token is predicted."""
        return _generation.score(self, batch, pairs, features)

    def _shared_head(self, input_ids: torch.Tensor | None, mask: torch.Tensor, image_mask: torch.Tensor,
                     image_index: torch.Tensor | None) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        # the hook generation.prefill calls (tests wrap it to see that the shared-image path ran)
        return _generation.shared_head(self, input_ids, mask, image_mask, image_index)

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
        """One group's switch; floating-point tensors only (quantised weights cannot train)."""
        if trainable and group in ("encoder", "decoder"):
            self.changed_parts.add(group)
        for _, p in self.parameter_groups()[group]:
            p.requires_grad_(trainable and p.dtype.is_floating_point)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the vision tower. A frozen tower also stays in eval mode (see `train`), so its
        features equal the feature cache's; unfreezing marks the encoder as changed, so the adapter folder stores it."""
        self._set_group("encoder", not frozen)
        self.encoder.train(self.training and not frozen)

    def freeze_mapper(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the mapper, e.g. for a stage that tunes only the decoder side."""
        self._set_group("mapper", not frozen)

    def freeze_decoder(self, frozen: bool = True, include_lora: bool = True) -> None:
        """Freeze (or unfreeze) the base decoder's weights and, unless `include_lora=False`, its peft tensors too.
        Unfreezing the base marks the decoder as changed, so the adapter folder then stores it."""
        self._set_group("decoder", not frozen)
        if include_lora:
            self._set_group("lora", not frozen)

    def train(self, mode: bool = True) -> "MedVQAAdapter":
        """nn.Module.train, except that a part with nothing to train (a frozen encoder or decoder) stays in eval mode:
        its dropout and batch-norm keep inference behaviour, so training the mapper sees the features that the
        feature cache and inference see."""
        super().train(mode)
        for part in (self.encoder, self.decoder):  # frozen parts keep dropout/batch-norm in inference behaviour
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """{group: {"trainable": n, "total": n}} per parameter group plus "all": what a run logs and stores in its
        card, and what tests check a tuning mode against."""
        report = {g: {"trainable": sum(_numel(p) for _, p in ps if p.requires_grad),
                      "total": sum(_numel(p) for _, p in ps)} for g, ps in self.parameter_groups().items()}
        report["all"] = {k: sum(r[k] for r in report.values()) for k in ("trainable", "total")}
        return report

    def describe_parameters(self) -> str:
        """`parameter_report` as a small table for logs and the CLI."""
        rows = [f"{g:<8} {r['trainable']:>14,} / {r['total']:>14,}" for g, r in self.parameter_report().items()]
        return "group         trainable /          total\n" + "\n".join(rows)
