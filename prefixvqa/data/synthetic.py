"""A generated lesion VQA task: bright round "lesions" on a noisy grayscale body, with presence, side and count
questions. Used by the demo, the learning tests, recipe smoke runs and the few-shot sweep: it needs no download and
has a known chance level, so "the adapter learned" is a testable claim.
"""

from __future__ import annotations

import io

import numpy as np

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
