"""The image-tower backends, one registry: `encoder.backend` names an entry, and every caller (the model, the adapter
set, the availability check, fit-check) asks it here instead of knowing the libraries.

    open_clip      prefixvqa/vision.py     open_clip towers (OpenAI CLIP, BiomedCLIP, ...)
    open_clip_file prefixvqa/vision.py     an open_clip tower given by a model config file + checkpoint (LLaVA-Rad)
    transformers   prefixvqa/vision_hf.py  CLIPVisionModel, SiglipVisionModel, Dinov2Model, AutoModel backbones
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import ENCODER_BACKENDS, EncoderConfig
from .vision import VisionEncoder, check_config_file_tower, check_encoder_available
from .vision_hf import HFVisionEncoder, check_hf_encoder_available

__all__ = ["Backend", "BACKENDS", "backend", "build_encoder", "check_encoder", "wrap_tower"]


@dataclass(frozen=True)
class Backend:
    """One tower library: the encoder class (its `from_config` loads, its constructor wraps a built tower) and the
    offline availability check that names the missing file."""

    name: str
    encoder_class: type[VisionEncoder]
    check: Callable[[EncoderConfig], None]
    library: str  # what the model card and messages call it


BACKENDS: dict[str, Backend] = {
    "open_clip": Backend("open_clip", VisionEncoder, check_encoder_available, "open_clip"),
    "open_clip_file": Backend("open_clip_file", VisionEncoder, check_config_file_tower, "open_clip (config file)"),
    "transformers": Backend("transformers", HFVisionEncoder, check_hf_encoder_available, "transformers"),
}
assert tuple(BACKENDS) == ENCODER_BACKENDS, "BACKENDS must list config.ENCODER_BACKENDS"


def backend(cfg: EncoderConfig) -> Backend:
    """The registered backend `cfg.backend` names."""
    return BACKENDS[cfg.backend]


def build_encoder(cfg: EncoderConfig, dtype: torch.dtype | str | None = None) -> VisionEncoder:
    """Load the tower the config describes (see `VisionEncoder.from_config` / `HFVisionEncoder.from_config`)."""
    return backend(cfg).encoder_class.from_config(cfg, dtype)


def check_encoder(cfg: EncoderConfig) -> None:
    """Raise ModelNotAvailableError naming what the tower needs when it cannot be had (offline, a wrong path)."""
    backend(cfg).check(cfg)


def wrap_tower(visual: nn.Module, preprocess: Any, cfg: EncoderConfig) -> VisionEncoder:
    """An encoder around an already built tower (a trained copy, a fake-tensor tower for fit-check)."""
    return backend(cfg).encoder_class(visual, preprocess, cfg)
