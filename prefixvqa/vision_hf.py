"""The transformers image-tower backend (`encoder.backend: transformers`): CLIPVisionModel (every LLaVA checkpoint's
tower), SiglipVisionModel (SigLIP, SigLIP2, MedSigLIP), Dinov2Model (RAD-DINO) and any other `AutoModel` image
backbone that records hidden states, with its own image processor as the transform.

Features follow LLaVA's `feature_select` (llava/model/multimodal_encoder/clip_encoder.py): the output of block
`encoder.layer` as `hidden_states` holds it (layer -2 = `hidden_states[-2]`, LLaVA's default), then `patches` drops
the class (and register) tokens (LLaVA's `patch`) unless `keep_cls` (LLaVA's `cls_patch`); `pooled` is the model's
`pooler_output` (CLIP: the normed class token; SigLIP: its attention-pooling head; DINOv2: the normed class token).
Only the blocks up to the selected one run (their output is taken by a hook and the rest of the forward skipped).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import ConfigError, EncoderConfig
from .data.transforms import ImageProcessorTransform, PadToSquare
from .vision import ModelNotAvailableError, VisionEncoder, hub_offline, require_hub_file

__all__ = ["HFVisionEncoder", "check_hf_encoder_available", "load_image_processor", "load_tower"]


class _Stop(Exception):
    """Raised by the block hook once the selected block has run: the remaining blocks are not needed."""


class HFVisionEncoder(VisionEncoder):
    """A transformers image model as the adapter's tower: the same interface as the open_clip `VisionEncoder`
    (`visual`, `preprocess`, `forward`, `output_shape`, `to_compute_dtype`), so every path (cache, few-shot,
    grounding, fit-check, export) takes either."""

    def __init__(self, visual: nn.Module, preprocess: Callable[[Any], torch.Tensor] | None, cfg: EncoderConfig):
        nn.Module.__init__(self)
        self.visual, self.preprocess, self.cfg = visual, preprocess, cfg
        self._plain_vit, self._stop_early, self._mha = False, True, False
        self._blocks = _blocks(visual)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, dtype: torch.dtype | str | None = None) -> "HFVisionEncoder":
        """Load the tower and its image processor from `cfg.name` (a hub id or folder); `dtype` casts a frozen one."""
        check_hf_encoder_available(cfg)
        encoder = cls(load_tower(cfg), image_transform(cfg, load_image_processor(cfg)), cfg)
        if dtype is not None:
            if cfg.freeze:
                encoder.visual.requires_grad_(False)
            encoder.to_compute_dtype(dtype)
        return encoder

    @property
    def patch_size(self) -> tuple[int, int]:
        """(height, width) of one patch, from the model config."""
        size = getattr(self.visual.config, "patch_size", None)
        if size is None:
            raise ConfigError(f"encoder {self.cfg.name!r}: its config names no patch_size; only pooled features")
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def prefix_tokens(self, height: int, width: int, length: int) -> int:
        """Tokens before the patch grid (class token, register tokens) in a sequence of `length` for that input."""
        ph, pw = self.patch_size
        return length - (height // ph) * (width // pw)

    def leading_tokens(self, n: int) -> int:
        """Class and register tokens kept in front of the patch grid (`keep_cls`), for an input of the processor's size."""
        if not self.cfg.keep_cls or self.cfg.features != "patches":
            return 0
        height, width = self.preprocess_size()
        return self.prefix_tokens(height, width, n)

    def _features(self, pixels: torch.Tensor, trains: bool) -> torch.Tensor:
        if self.cfg.features == "pooled":
            pooled = self.visual(pixel_values=pixels).pooler_output
            if pooled is None:
                raise ConfigError(f"encoder {self.cfg.name!r} has no pooled output (e.g. a SigLIP tower without its "
                                  "head): use encoder.features='patches'")
            return pooled.reshape(pooled.shape[0], 1, -1)
        if self.cfg.final_norm:  # the model's own last_hidden_state: every block, then its final norm (Gemma 3)
            tokens = self.visual(pixel_values=pixels).last_hidden_state
        else:
            tokens = self._block_output(pixels)
        if self.cfg.keep_cls:
            return tokens
        return tokens[:, self.prefix_tokens(pixels.shape[-2], pixels.shape[-1], tokens.shape[1]):]

    def _block_output(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output of block `cfg.layer` ((B, T, D), as `hidden_states[layer]` of the model holds it)."""
        n = len(self._blocks)
        last = self.cfg.layer + n if self.cfg.layer < 0 else self.cfg.layer
        if not 0 <= last < n:
            raise ConfigError(f"encoder.layer={self.cfg.layer} is out of range for a tower of {n} blocks")
        seen: list[torch.Tensor] = []

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(output[0] if isinstance(output, (tuple, list)) else output)
            if last < n - 1:
                raise _Stop

        handle = self._blocks[last].register_forward_hook(grab)
        try:
            with contextlib.suppress(_Stop):
                self.visual(pixel_values=pixels)
        finally:
            handle.remove()
        return seen[0]

    def preprocess_size(self) -> tuple[int, int]:
        """(height, width) of the processor's pixels (from the image processor's settings; 224 when it names none)."""
        processor = getattr(self.preprocess, "image_processor", None) or getattr(
            getattr(self.preprocess, "transform", None), "image_processor", None)
        for key in ("crop_size", "size"):
            size = getattr(processor, key, None) if processor is not None else None
            if isinstance(size, dict) and "height" in size:
                if key == "crop_size" and not getattr(processor, "do_center_crop", True):
                    continue
                return int(size["height"]), int(size["width"])
            if isinstance(size, dict) and "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        size = getattr(self.visual.config, "image_size", 224)
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _blocks(visual: nn.Module) -> nn.ModuleList:
    """The tower's transformer blocks: its ModuleList of `num_hidden_layers` modules (CLIP/SigLIP
    `encoder.layers`, DINOv2 `encoder.layer`, ...)."""
    n = getattr(visual.config, "num_hidden_layers", None)
    for module in visual.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} transformer blocks of {type(visual).__name__}: patch features need them")


def image_transform(cfg: EncoderConfig, image_processor: Any) -> Callable[[Any], torch.Tensor]:
    """The processor's transform for this tower: its image processor, padded to a square first when asked."""
    transform = ImageProcessorTransform(image_processor)
    return PadToSquare.around(transform) if cfg.image_aspect_ratio == "pad" else transform


def load_image_processor(cfg: EncoderConfig) -> Any:
    """The tower's own image processor (the slow, PIL-based one that LLaVA and the model cards use)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(cfg.name, revision=cfg.revision, backend="pil")
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"could not load the image processor of encoder {cfg.name!r}: {exc}") from exc


def load_tower(cfg: EncoderConfig) -> nn.Module:
    """The image model of `cfg.name`: the vision part of a composite config (CLIP, SigLIP: `vision_config`) as its
    own class (CLIPVisionModel, SiglipVisionModel, which read the vision weights of the full checkpoint), else the
    `AutoModel` of its config (Dinov2Model, ...). `model_overrides` are config fields."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if cfg.layout in ("llava_hf", "gemma3"):
        return _tower_inside(cfg)
    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision)
        vision = getattr(config, "vision_config", None)
        model_class = MODEL_MAPPING[type(vision)] if vision is not None else AutoModel
        model = model_class.from_pretrained(cfg.name, revision=cfg.revision, dtype=torch.float32,
                                            **cfg.model_overrides)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotAvailableError(f"transformers could not load encoder {cfg.name!r}: {exc}") from exc
    return model.eval()


def _tower_inside(cfg: EncoderConfig) -> nn.Module:
    """The vision tower of a LlavaForConditionalGeneration or Gemma3ForConditionalGeneration checkpoint
    (`vision_config` + its `vision_tower.*` tensors), loaded strictly into the tower's own class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from .vlm_layouts import LayoutError, tower_state

    config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise LayoutError(f"{cfg.name}/config.json: missing key 'vision_config' (encoder.layout={cfg.layout!r})")
    for key, value in cfg.model_overrides.items():
        setattr(vision, key, value)
    model = MODEL_MAPPING[type(vision)](vision)
    state = tower_state(cfg.name, cfg.revision)
    own = model.state_dict()  # transformers 5 names CLIP/SigLIP towers without the old `vision_model.` level
    found = {k: state.get(k, state.get("vision_model." + k)) for k in own}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise LayoutError(f"{cfg.name}: the vision tower's tensors {missing[:3]} are missing")
    model.load_state_dict(found)
    return model.float().eval()


def check_hf_encoder_available(cfg: EncoderConfig) -> None:
    """Fail fast, naming the file, when the tower's config, image processor or weights cannot be had offline."""
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        for needed in ("config.json", "preprocessor_config.json"):
            if not (local / needed).is_file():
                raise ModelNotAvailableError(f"encoder folder {local} has no {needed}")
        if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
            raise ModelNotAvailableError(f"encoder folder {local} has no weights (*.safetensors)")
        return
    if cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise ModelNotAvailableError(f"encoder path not found: {cfg.name}")
    if hub_offline():
        for needed in ("config.json", "preprocessor_config.json"):
            require_hub_file(cfg.name, needed, f"encoder {cfg.name!r}", cfg.revision)
