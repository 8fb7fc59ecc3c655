"""Generated data that needs no download, selected in recipes by `{format: synthetic, kind: ...}`.

* `lesion_records` (kind `lesions`): bright round "lesions" on a noisy grayscale body with presence, side and count
  questions. The demo, the learning tests and the few-shot sweep use it: its chance level is known, so "the adapter
  learned" is a testable claim.
* `colour_records` (kinds `vqa`, `closed`, `caption`, `instruct`): one flat colour decides the answer. Smoke runs and
  trainer tests use it: tiny, instant, and learnable in a few steps.
"""

from __future__ import annotations

import io

import numpy as np

from ..config import ConfigError
from .records import VQARecord

QUESTIONS = {
    "presence": ("Is there a lesion in the image?", ["yes", "no"]),
    "side": ("On which side of the image is the lesion?", ["left", "right"]),
    "count": ("How many lesions are there?", ["1", "2", "3"]),
}


def _image(rng: np.random.Generator, size: int, count: int, side: str) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) ** 2 / 0.2 + (yy - 0.5) ** 2 / 0.22 < 1).astype(np.float32) * 0.35
    img = body + rng.normal(0, 0.04, (size, size)).astype(np.float32)
    lo, hi = (0.12, 0.42) if side == "left" else (0.58, 0.88)
    # one lesion per vertical band, jittered inside it, so lesions never merge and every count is well posed
    bands = rng.permutation(3)[:count]
    centres = [(rng.uniform(lo, hi), 0.2 + 0.3 * b + rng.uniform(-0.03, 0.03)) for b in bands]
    for cx, cy in centres:
        r = rng.uniform(0.07, 0.09)
        img += 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def lesion_records(n: int, seed: int = 0, size: int = 64, kinds: tuple[str, ...] = ("presence", "side", "count"),
                   split: str = "train") -> list[VQARecord]:
    """`n` records cycling through the question kinds; each record has its own image (PNG bytes)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        count = int(rng.integers(1, 4)) if kind != "presence" or rng.random() < 0.5 else 0
        side = "left" if rng.random() < 0.5 else "right"
        answer = {"presence": "yes" if count else "no", "side": side, "count": str(count)}[kind]
        question, choices = QUESTIONS[kind]
        records.append(VQARecord(id=f"synthetic-{split}-{seed}-{i}", image=_image(rng, size, count, side),
                                 question=question, answer=answer, answer_type="closed", choices=list(choices),
                                 meta={"dataset": "synthetic_lesions", "split": split, "question_type": kind,
                                       "modality": "synthetic"}))
    return records


_COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (235, 235, 235)}
_COLOUR_TEXT = {
    "vqa": ("is there a lesion in the image?", {"red": "yes", "blue": "no", "green": "yes", "white": "no"}),
    "closed": ("is there a lesion in the image?", {"red": "yes", "blue": "no", "green": "yes", "white": "no"}),
    "caption": ("describe the image.", {"red": "ct of the chest", "blue": "mri of the brain",
                                        "green": "x-ray of the chest", "white": "ultrasound of the abdomen"}),
    "instruct": ("what organ is shown in the image?", {"red": "the heart", "blue": "the brain",
                                                       "green": "the lung", "white": "the liver"}),
}


def colour_records(n: int = 16, seed: int = 0, kind: str = "vqa", image_size: int = 32) -> list[VQARecord]:
    """`n` records cycling through four colours (PNG bytes, a little noise); the colour decides the answer."""
    from PIL import Image

    if kind not in _COLOUR_TEXT:
        raise ConfigError(f"synthetic data: kind={kind!r} is not one of {sorted([*_COLOUR_TEXT, 'lesions'])}")
    rng = np.random.default_rng(seed)
    question, answers = _COLOUR_TEXT[kind]
    names = list(_COLOURS)
    out = []
    for i in range(n):
        colour = names[i % len(names)]
        pixels = np.clip(np.array(_COLOURS[colour]) + rng.integers(-20, 20, (image_size, image_size, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
        choices = sorted(set(answers.values())) if kind == "closed" else None
        out.append(VQARecord(id=f"synthetic-{kind}-{seed}-{i}", image=buf.getvalue(), question=question,
                             answer=answers[colour], answer_type="closed" if kind in ("vqa", "closed") else "open",
                             choices=choices, meta={"dataset": "synthetic", "colour": colour,
                                                    "image_name": f"{kind}-{seed}-{i}.png"}))
    return out


def synthetic_split(kind: str = "vqa", **args) -> list[VQARecord]:
    """A recipe's `{format: synthetic, kind: ..., n: ..., seed: ...}` data spec -> records."""
    if kind == "lesions":
        if "image_size" in args:
            args["size"] = args.pop("image_size")
        if "kinds" in args:
            args["kinds"] = tuple(args["kinds"])
        return lesion_records(**args)
    return colour_records(kind=kind, **args)
