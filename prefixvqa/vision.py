"""The image side: an open_clip image tower that returns pooled embeddings (B, 1, D) or patch tokens (B, N, D).

`VisionEncoder(visual, preprocess, cfg)` only wraps modules it is given; `VisionEncoder.from_config` does the loading.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import EncoderConfig

log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """Weights or a config are not reachable (offline, or a wrong path); the message names what is needed."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def require_hub_file(repo_id: str, filename: str, what: str, revision: str | None = None) -> None:
    """Fail fast, before any library call, when a hub file is neither cached nor downloadable (offline)."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(found, str):
        raise ModelNotAvailableError(
            f"{what} needs the hub repo '{repo_id}' ({filename}), which is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. Download it on a connected machine "
            f"(`huggingface-cli download {repo_id}`) or point the config at a local copy.")


def to_rgb(image: Any) -> Any:
    """A PIL image in 8-bit RGB. 16-bit and float grayscale are min-max scaled, not clipped to 255."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def as_pil(item: Any) -> Any:
    """Accept a PIL image, a path or encoded bytes (DICOM, NIfTI, PNG, 16-bit TIFF ...) and return 8-bit RGB."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, Path, bytes)):
        from .data.images import load_image

        return load_image(item)
    raise TypeError(f"unsupported image input {type(item).__name__}: pass a PIL image, a path or bytes")


class VisionEncoder(nn.Module):
    """Wraps an open_clip image tower; returns (B, 1, D) pooled or (B, N, D) patch tokens from `cfg.layer`."""

    def __init__(self, visual: nn.Module, preprocess: Callable[[Any], torch.Tensor], cfg: EncoderConfig):
        super().__init__()
        self.visual, self.preprocess, self.cfg = visual, preprocess, cfg

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> "VisionEncoder":
        import open_clip

        check_encoder_available(cfg)
        kwargs: dict[str, Any] = dict(cfg.model_overrides)
        if cfg.image_size:
            kwargs["force_image_size"] = cfg.image_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=cfg.pretrained,
                                                                             **kwargs)
            except (RuntimeError, OSError, ValueError) as exc:
                raise ModelNotAvailableError(f"open_clip could not build encoder {cfg.name!r} with "
                                             f"pretrained={cfg.pretrained!r}: {exc}") from exc
        visual = model.visual
        del model  # the text tower is never used
        return cls(visual, preprocess, cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, D)
        if self.cfg.features == "pooled":
            return self.visual(pixels).unsqueeze(1)  # (B, 1, D)
        # NCHW is the one layout every open_clip tower (ViT, ModifiedResNet, timm) can return; a conv grid becomes
        # h*w tokens in row-major order, the same order a ViT's NLC output has.
        out = self.visual.forward_intermediates(pixels, indices=[self.cfg.layer], intermediates_only=True,
                                                output_fmt="NCHW", output_extra_tokens=self.cfg.keep_cls)
        tokens = out["image_intermediates"][0].flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        if self.cfg.keep_cls and out.get("image_intermediates_prefix"):
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """open_clip's own eval transform on each image -> (B, 3, H, W)."""
        return torch.stack([self.preprocess(as_pil(im)) for im in images])

    @torch.no_grad()
    def output_shape(self) -> tuple[int, int]:
        """(N, D) of one image's features, from one dry run (works for any tower open_clip builds)."""
        size = self.preprocess_size()
        was = self.training
        self.eval()
        out = self(torch.zeros(1, 3, *size, device=next(self.parameters()).device))
        self.train(was)
        return out.shape[1], out.shape[2]

    def preprocess_size(self) -> tuple[int, int]:
        size = getattr(self.visual, "image_size", 224)
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def preprocess_fingerprint(self) -> str:
        """Identifies the preprocessing so a feature cache built with another transform is never reused."""
        return hashlib.sha256(repr(self.preprocess).encode()).hexdigest()[:16]


def check_encoder_available(cfg: EncoderConfig) -> None:
    """Raise ModelNotAvailableError naming the weights/config file an encoder needs when it cannot be had offline."""
    import open_clip

    if cfg.name.startswith("hf-hub:"):
        require_hub_file(cfg.name[len("hf-hub:"):], "open_clip_config.json", f"encoder {cfg.name!r}")
        return
    if cfg.name not in open_clip.list_models():
        raise ModelNotAvailableError(f"encoder.name={cfg.name!r} is not an open_clip model; "
                                     "see open_clip.list_models()")
    if cfg.pretrained is None:
        return
    if Path(cfg.pretrained).suffix or os.sep in cfg.pretrained:  # a checkpoint file, not a tag
        if not Path(cfg.pretrained).is_file():
            raise ModelNotAvailableError(f"encoder.pretrained checkpoint not found: {cfg.pretrained}")
        return
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    if not tag_cfg:
        raise ModelNotAvailableError(f"open_clip has no pretrained tag {cfg.pretrained!r} for {cfg.name!r}; "
                                     f"known: {open_clip.list_pretrained_tags_by_model(cfg.name)}")
    if tag_cfg.get("hf_hub"):
        repo = tag_cfg["hf_hub"].rstrip("/")
        filename = "open_clip_model.safetensors"
        from huggingface_hub import try_to_load_from_cache

        if hub_offline() and not any(isinstance(try_to_load_from_cache(repo, f), str)
                                     for f in (filename, "open_clip_pytorch_model.bin")):
            raise ModelNotAvailableError(
                f"encoder {cfg.name!r} pretrained={cfg.pretrained!r} needs weights from the hub repo '{repo}', which "
                f"is not cached and HF_HUB_OFFLINE=1 forbids downloading. Download it on a connected machine or set "
                f"encoder.pretrained to a local checkpoint file (or null for random weights).")
    elif hub_offline():
        raise ModelNotAvailableError(f"encoder {cfg.name!r} pretrained={cfg.pretrained!r} downloads from "
                                     f"{tag_cfg.get('url')}; offline, set encoder.pretrained to a local checkpoint "
                                     "file")
