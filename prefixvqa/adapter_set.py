"""Several adapters on one loaded base model, one active per request (the app serves a whole hub this way).

The decoder is loaded once; each LoRA adapter is added to it as a peft *named adapter* (``PeftModel.load_adapter``)
and switched with ``set_adapter``. The small parts that differ per adapter are kept per adapter and swapped in by
reference: the mapper, the processor (template, prefix length), the calibration, and the image tower when the adapter
trained it (a frozen one shares the base tower). Switching therefore moves no weights and reads no files.

Only adapters trained on the same base models (encoder and decoder fingerprints) in a mode that can share a base
(`TuningMode.shares_base`: LoRA) can join; anything else is refused with the reason before any weights are read.
Every folder is read by `adapter_io.AdapterFolder`, the reader `from_pretrained` and resume use: the same version rule,
manifest check and strict key/shape checks.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .adapter_io import AdapterFolder, AdapterLoadError, resolve_adapter
from .calibration import Calibration

if TYPE_CHECKING:
    from torch import nn

    from .config import AdapterConfig
    from .model import Answer, MedVQAAdapter
    from .data.processor import MedVQAProcessor
    from .vision import VisionEncoder

__all__ = ["AdapterSet"]


@dataclass
class _Slot:
    peft_name: str
    mapper: "nn.Module"
    encoder: "VisionEncoder"
    processor: "MedVQAProcessor"
    config: "AdapterConfig"
    calibration: Calibration | None
    folder: Path | None
    image_summary: Any = None  # ood.ImageSummary: the adapter's training images (None: saved without one)


class AdapterSet:
    """Adapters sharing one base model. ``with adapters.using(name) as model:`` runs requests on one of them; calls
    are serialised by a lock, so concurrent requests (a web app's worker threads) never see a half-switched model."""

    def __init__(self, model: "MedVQAAdapter", name: str = "default", folder: str | Path | None = None):
        if not model.config.tuning.method.shares_base:
            raise AdapterLoadError(f"adapter {name!r}: tuning.mode={model.config.tuning.mode!r}; only modes that can "
                                   f"share one base model as peft named adapters (LoRA) can be served together")
        self.model = model.eval()
        self._lock = threading.RLock()
        self._base_encoder = model.encoder if model.config.encoder.freeze else None
        first = _Slot(model.decoder.active_adapter, model.mapper, model.encoder, model.processor, model.config,
                      model.calibration, Path(folder) if folder else None, model.image_summary)
        self.slots: dict[str, _Slot] = {name: first}
        self.active = name

    @classmethod
    def load(cls, ref: str | Path, name: str | None = None) -> "AdapterSet":
        """A set holding one adapter (folder, hub name or repo), loaded with `MedVQAAdapter.from_pretrained`: its base
        models become the base every later `add` must match. Named ``name`` (default: ``ref`` as given)."""
        from .model import MedVQAAdapter

        folder = resolve_adapter(ref)
        return cls(MedVQAAdapter.from_pretrained(folder), name or str(ref), folder)

    @property
    def names(self) -> list[str]:
        """The loaded adapters' names in the order they were added (the first is the default one)."""
        return list(self.slots)

    # --- adding -------------------------------------------------------------------------------------------------
    def _base(self) -> "VisionEncoder":
        """The base image tower (untrained by any adapter), built once if the first adapter trained its own."""
        if self._base_encoder is None:
            from .decoder import fingerprint
            from .encoders import build_encoder

            enc = build_encoder(self.model.config.encoder).to(self.model.device).eval()
            got = fingerprint(enc.visual, {"name": self.model.config.encoder.name})
            if got != self.model.base_fingerprints["encoder"]:
                raise AdapterLoadError(f"rebuilt base encoder has fingerprint {got}, expected "
                                       f"{self.model.base_fingerprints['encoder']}")
            self._base_encoder = enc
        return self._base_encoder

    def add(self, ref: str | Path, name: str | None = None) -> str:
        """Add an adapter (folder, hub name or Hugging Face repo) on the loaded base; returns its name here. It is
        read like `from_pretrained` reads it (`AdapterFolder`), so a folder either loads the same way here or is
        refused with the same error."""
        name = name or str(ref)
        if name in self.slots:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded")
        folder = AdapterFolder.open(ref)
        cfg = folder.config
        self._check_compatible(folder.path, cfg)
        mapper, encoder = self._own_parts(folder)
        processor = folder.processor(encoder.preprocess, cfg.template)
        if processor is None:
            from .data.processor import PROCESSOR_NAME

            raise AdapterLoadError(f"{folder.path / PROCESSOR_NAME} is missing: the adapter cannot join a set")
        if processor.tokenizer.get_vocab() != self.model.tokenizer.get_vocab():
            raise AdapterLoadError(f"{folder.path}: its tokenizer differs from the loaded base's")
        calibration = folder.calibration()
        peft_name = f"adapter_{len(self.slots)}"
        with self._lock:
            folder.load_peft(self.model.decoder, cfg.tuning, adapter_name=peft_name)
            self.model.decoder.set_adapter(self.slots[self.active].peft_name)  # loading does not switch
        self.slots[name] = _Slot(peft_name, mapper, encoder, processor, cfg, calibration, folder.path,
                                 folder.image_summary())
        return name

    def _own_parts(self, folder: AdapterFolder) -> tuple["nn.Module", "VisionEncoder"]:
        """The adapter's mapper, and its image tower: its own trained copy, or the shared base tower when frozen."""
        from .encoders import wrap_tower
        from .mappers import build_mapper

        cfg = folder.config
        state = folder.read_tensors()
        if any(k.startswith("decoder.") for k in state):
            raise AdapterLoadError(f"{folder.path}: it trained decoder weights (tuning.mode={cfg.tuning.mode!r}); it "
                                   f"cannot share a base")
        base = self._base()
        mapper = build_mapper(cfg.mapper, cfg.template.image_start_end)
        visual = base.visual if cfg.encoder.freeze else copy.deepcopy(base.visual)  # a trained tower: its own copy
        parts = ["mapper"] + ([] if cfg.encoder.freeze else ["encoder"])
        folder.load_parts({"mapper": mapper, "encoder": visual}, parts, state)
        encoder = wrap_tower(visual, base.preprocess, cfg.encoder).eval()
        return mapper.to(self.model.device).eval(), encoder

    def _check_compatible(self, folder: Path, cfg: "AdapterConfig") -> None:
        """Refuse, before any weights are read, an adapter that cannot sit on this base: its mode cannot share one,
        or it was trained on other base models (fingerprints), or its mapper feeds another embedding width."""
        if not cfg.tuning.method.shares_base:
            raise AdapterLoadError(f"{folder}: tuning.mode={cfg.tuning.mode!r}; only LoRA adapters can share a base")
        base = self.model.base_fingerprints
        for part in ("encoder", "decoder"):
            if cfg.fingerprints.get(part) != base[part]:
                raise AdapterLoadError(f"{folder}: trained on another {part} (fingerprint {cfg.fingerprints.get(part)}"
                                       f", loaded base has {base[part]}: {getattr(cfg, part).name})")
        if cfg.mapper.out_dim != self.model.config.mapper.out_dim:
            raise AdapterLoadError(f"{folder}: mapper.out_dim={cfg.mapper.out_dim} but the decoder takes "
                                   f"{self.model.config.mapper.out_dim}")

    # --- switching ----------------------------------------------------------------------------------------------
    def _activate(self, name: str) -> None:
        if name not in self.slots:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names}")
        slot, m = self.slots[name], self.model
        m.decoder.set_adapter(slot.peft_name)
        # the config first: setting the processor tells it this adapter's context and answer room (model.processor)
        m.mapper, m.encoder, m.config, m.calibration = slot.mapper, slot.encoder, slot.config, slot.calibration
        m.processor = slot.processor
        m.image_summary = slot.image_summary
        self.active = name

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator["MedVQAAdapter"]:
        """The model with adapter ``name`` active, held under the lock for the block."""
        with self._lock:
            self._activate(name)
            yield self.model

    def answer(self, name: str, images: Sequence[Any], questions: Sequence[str], **kwargs: Any) -> list["Answer"]:
        """`MedVQAAdapter.answer` with adapter ``name`` active, under the lock (safe from concurrent requests)."""
        with self.using(name) as model:
            return model.answer(images, questions, **kwargs)

    def score_choices(self, name: str, images: Sequence[Any], questions: Sequence[str],
                      choices: Sequence[Sequence[str]], **kwargs: Any) -> list[list[float]]:
        """`MedVQAAdapter.score_choices` with adapter ``name`` active, under the lock."""
        with self.using(name) as model:
            return model.score_choices(images, questions, choices, **kwargs)
