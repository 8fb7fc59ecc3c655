"""Image transforms the processor applies (PIL image -> (3, H, W) tensor), beside open_clip's own.

* `ImageProcessorTransform`: a transformers image processor (CLIPImageProcessor, SiglipImageProcessor,
  BitImageProcessor ...) run on one image, so the pixels are exactly the model's own preprocessing (resize, crop,
  rescale, normalisation): what the transformers tower backend uses.
* `PadToSquare`: LLaVA's `image_aspect_ratio: pad` (llava/mm_utils.py `expand2square`): a non-square image is placed
  in the middle of a square of the normalisation mean colour before the inner transform; any backend.

Each has a `repr` that states its settings: the processor's `transform_fingerprint` hashes it, so a feature cache or
an adapter made with other preprocessing is never reused.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch

__all__ = ["ImageProcessorTransform", "PadToSquare", "expand_to_square", "mean_colour", "transform_mean"]

# keys of an image processor's dict that name classes or files, not preprocessing (they differ between equal saves)
_NOT_PREPROCESSING = ("image_processor_type", "processor_class", "_processor_class")


def expand_to_square(image: Any, colour: tuple[int, ...]) -> Any:
    """A PIL image pasted into the centre of a square of `colour` whose side is its longer side (offset rounded down,
    as LLaVA's expand2square); a square image is returned as it is."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """The normalisation mean (0..1 per channel) as an 8-bit colour, truncated as LLaVA computes it."""
    return tuple(int(m * 255) for m in mean)


def transform_mean(transform: Any) -> Sequence[float]:
    """The normalisation mean a transform uses: an image processor's `image_mean`, or the mean of the Normalize step
    inside a torchvision Compose (open_clip's preprocessing)."""
    processor = getattr(transform, "image_processor", None)
    if processor is not None:
        return list(processor.image_mean)
    for step in getattr(transform, "transforms", ()):
        if hasattr(step, "mean"):
            return [float(m) for m in step.mean]
    raise ValueError(f"no normalisation mean found in {transform!r}: cannot pad to a square of the mean colour")


class ImageProcessorTransform:
    """A transformers image processor as a one-image transform: PIL image -> (3, H, W) float32 pixel values."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Any) -> torch.Tensor:
        """The processor's pixel values of one image (the batch axis dropped)."""
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    def settings(self) -> dict[str, Any]:
        """The processor's preprocessing settings (class name first): what the repr and the fingerprint show."""
        data = {k: v for k, v in self.image_processor.to_dict().items() if k not in _NOT_PREPROCESSING}
        return {"class": type(self.image_processor).__name__, **data}

    def __repr__(self) -> str:
        return f"ImageProcessorTransform({json.dumps(self.settings(), sort_keys=True, default=str)})"


class PadToSquare:
    """LLaVA's pad-to-square: the image centred on a square of `colour` (the mean colour), then `transform`."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], colour: tuple[int, ...]):
        self.transform, self.colour = transform, tuple(colour)

    @classmethod
    def around(cls, transform: Callable[[Any], torch.Tensor]) -> "PadToSquare":
        """Pad with the mean colour of the transform's own normalisation (as LLaVA pads with the processor's mean)."""
        return cls(transform, mean_colour(transform_mean(transform)))

    def __call__(self, image: Any) -> torch.Tensor:
        """Pad to a square, then the inner transform."""
        return self.transform(expand_to_square(image, self.colour))

    def __repr__(self) -> str:
        return f"PadToSquare(colour={self.colour}, {self.transform!r})"
