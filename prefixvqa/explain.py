"""Grounding maps: which parts of the image an answer depended on, as a heatmap over the image.

Two attributions of the answer's log-probability (its tokens given the image and question, teacher-forced):

* ``occlusion`` (default; any encoder): the image is cut into a ``grid`` x ``grid`` raster; each cell in turn is
  set to the preprocessing mean (zero after normalisation) and the drop in the answer's mean token log-probability
  is that cell's weight. All occluded copies go through the encoder and the decoder as one batch.
* ``grad_x_input`` (patch-feature encoders): the gradient of the answer's log-probability with respect to the
  encoder's patch features, times those features, summed over channels: one weight per patch of the feature grid.

Both are normalised to [0, 1] and drawn over the image as a heatmap overlay PNG.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from .errors import PrefixVQAError
from .fileio import atomic_write
from .ood import features_report

if TYPE_CHECKING:
    from PIL import Image

    from .model import Answer, MedVQAAdapter

__all__ = ["Grounding", "grounding_map", "overlay", "explain", "png_bytes", "METHODS", "ExplainMethod", "ExplainError",
           "explain_target", "is_explain_png"]

#: The PNG text chunk that marks an overlay as prefixvqa's: the proof that a later run may replace that file.
PNG_MARK = ("Software", "prefixvqa explain")
OVERLAY = "a grounding overlay prefixvqa wrote"

#: The attribution methods (module docstring); the one spelling that validation and the CLI's choices read.
ExplainMethod = Literal["occlusion", "grad_x_input"]
METHODS: tuple[str, ...] = get_args(ExplainMethod)


class ExplainError(PrefixVQAError, ValueError):
    """A grounding map that cannot be made as asked (unknown method, features without a square patch grid)."""


@dataclass
class Grounding:
    """A grounding map and what it explains: the heatmap over the image, the answer it attributes, the method, and
    the image as loaded, so :func:`overlay` can draw it without loading the image again."""

    heatmap: np.ndarray  # (g, g) in [0, 1], row-major over the image
    answer: "Answer"
    method: str
    image: "Image.Image"  # the loaded image (RGB), as the model saw it before resizing


def _answer_logprob(model: "MedVQAAdapter", question: str, answer: str, features: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the answer tokens (+ EOS) for each row of features (B, N, D): (B,)."""
    proc = model.processor
    B = features.shape[0]
    batch = proc(None, [question] * B, [answer] * B)
    out = model(**batch, features=features, full_logits=True)
    labels = batch["labels"][:, 1:].to(model.device)
    logp = out.logits[:, :-1].float().log_softmax(-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    return picked.sum(1) / mask.sum(1).clamp(min=1)


def _feature_grid(n: int, start: int) -> tuple[int, int]:
    """(start, side) of the square patch grid inside n feature tokens, `start` of them before the grid."""
    side = math.isqrt(n - start)
    if side * side != n - start or side < 2:
        raise ExplainError(f"grad_x_input needs a square grid of patch features; the encoder gives {n} token(s) "
                         f"(use method='occlusion')")
    return start, side


def grounding_map(model: "MedVQAAdapter", image: Any, question: str, answer: "Answer | str | None" = None, *,
                  method: ExplainMethod = "occlusion", grid: int = 8, view: dict | None = None,
                  max_new_tokens: int | None = None) -> Grounding:
    """Heatmap of how much the answer depended on each image region: the `answer` already given (so the map explains
    what was printed, beams and all), else one generated here (with its image's out-of-distribution report,
    `ood.features_report`)."""
    if method not in METHODS:
        raise ExplainError(f"method must be one of {METHODS}, got {method!r}")
    proc = model.processor
    pil = proc.load_image(image, view)
    pixels = proc.transform(pil).unsqueeze(0)  # (1, 3, H, W)
    from .generation import evaluating  # eval mode for the pass, every submodule's own mode back after

    with evaluating(model):
        with torch.no_grad():
            features = model.encode_pixels(pixels)  # (1, N, D)
            given = answer if answer is not None and not isinstance(answer, str) else dataclasses.replace(
                model.generate(**proc(None, [question], padding_side="left"), features=features,
                               max_new_tokens=max_new_tokens)[0], **features_report(model, features))
        # a given text is explained as is; an abstained answer by the guess it withheld
        target = answer if isinstance(answer, str) else (given.guess or given.text)
        if method == "occlusion":
            heat = _occlusion(model, pixels, question, target, grid)
        else:
            heat = _grad_x_input(model, features, question, target)
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    return Grounding(heat.astype(np.float32), given, method, pil)


def _occlusion(model: "MedVQAAdapter", pixels: torch.Tensor, question: str, answer: str, grid: int) -> np.ndarray:
    _, _, H, W = pixels.shape
    grid = max(1, min(grid, H, W))
    ys = np.linspace(0, H, grid + 1).round().astype(int)
    xs = np.linspace(0, W, grid + 1).round().astype(int)
    batch = pixels.repeat(grid * grid + 1, 1, 1, 1)  # first row: the image itself
    for r in range(grid):
        for c in range(grid):
            batch[1 + r * grid + c, :, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = 0.0  # the normalised mean
    with torch.no_grad():
        features = torch.cat([model.encode_pixels(batch[i:i + 32]) for i in range(0, len(batch), 32)])
        lp = torch.cat([_answer_logprob(model, question, answer, features[i:i + 32])
                        for i in range(0, len(features), 32)])
    return (lp[0] - lp[1:]).clamp(min=0).reshape(grid, grid).cpu().numpy()


def _grad_x_input(model: "MedVQAAdapter", features: torch.Tensor, question: str, answer: str) -> np.ndarray:
    start, side = _feature_grid(features.shape[1], model.encoder.leading_tokens(features.shape[1]))
    feats = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lp = _answer_logprob(model, question, answer, feats)
        (grad,) = torch.autograd.grad(lp.sum(), feats)
    attr = (grad * feats.detach())[0, start:].sum(-1).abs()  # (side * side,)
    return attr.reshape(side, side).cpu().numpy()


def overlay(image: "Image.Image", heatmap: np.ndarray, alpha: float = 0.45) -> "Image.Image":
    """The image with the heatmap (upsampled smoothly to its size) blended on top in a perceptual colour map."""
    from matplotlib import colormaps
    from PIL import Image

    base = image.convert("RGB")
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), mode="L").resize(base.size,
                                                                                         Image.BILINEAR)
    rgb = (colormaps["inferno"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(rgb, mode="RGB"), alpha)


def png_bytes(image: "Image.Image") -> bytes:
    """An image as PNG bytes in memory: what the web app sends for an overlay, no file written."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*PNG_MARK)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def is_explain_png(path: str | Path) -> bool:
    """Whether ``path`` is an overlay an earlier run wrote (a PNG carrying prefixvqa's text chunk): only such a file
    is replaced without being asked; any other file at the path is the user's."""
    from PIL import Image

    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(PNG_MARK[0]) == PNG_MARK[1]
    except (OSError, ValueError):
        return False


def explain_target(out: str | Path | None, image: Any = None, *, overwrite: bool = False) -> Path:
    """Where an overlay goes (default ``<image stem>_explain.png``), refused before any work when that is the input
    image itself or a file prefixvqa did not write (`fileio.OverwriteRefused`, one line), unless ``overwrite``."""
    from .fileio import OverwriteRefused, refuse_foreign

    path = Path(out) if out else Path(Path(str(image)).stem + "_explain.png")
    if isinstance(image, (str, Path)) and path.exists() and Path(image).exists() and path.samefile(image):
        raise OverwriteRefused(f"{path} is the input image: the overlay would replace it; give another path")
    refuse_foreign(path, overwrite or is_explain_png, OVERLAY, file=True)
    return path


def explain(model: "MedVQAAdapter", image: Any, question: str, out: str | Path | None = None, *,
            overwrite: bool = False, **kwargs: Any) -> tuple[Grounding, "Image.Image"]:
    """Grounding map and its overlay; with ``out``, the overlay is written there as a PNG (atomically). An existing
    ``out`` is replaced only when it is an overlay prefixvqa wrote, or with ``overwrite`` (checked before any work)."""
    if out is not None:
        out = explain_target(out, image, overwrite=overwrite)
    g = grounding_map(model, image, question, **kwargs)
    picture = overlay(g.image, g.heatmap)
    if out is not None:
        atomic_write(out, png_bytes(picture))
    return g, picture
