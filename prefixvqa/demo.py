"""`prefixvqa demo`: the main job on an embedded offline default.

Builds a small medical VQA set from real DICOM files (the `pydicom-data` package; questions from their headers) plus a
generated lesion set (presence, side, count), trains the `demo_smollm2` adapter (a small open_clip ViT trained from
scratch, since no pretrained weights are reachable offline, and LoRA on the real SmolLM2-135M), evaluates on held-out
items (confidences temperature-scaled on a validation set), saves the adapter under `checkpoints/`, and prints sample
answers. Every answer, the evaluation's, the samples' and the shuffled-image control's, comes from the one answering
loop (`inference.answer_records`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .data.records import VQARecord
from .data.synthetic import lesion_records

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

MODALITY_WORDS = {"CT": "ct", "MR": "mri", "US": "ultrasound", "CR": "x-ray", "DX": "x-ray", "NM": "nuclear medicine",
                  "OT": "other", "SC": "other"}
MODALITY_QUESTION = "What is the imaging modality of this image?"
SAMPLE_TOKENS = 8  # new tokens for the printed sample answers and the control (the demo's answers are one word)


def dicom_records(views: int = 6, size: int = 64, seed: int = 0) -> list[VQARecord]:
    """Modality questions on every decodable `pydicom-data` file; each file gives `views` random crops (PNG bytes)."""
    from .data.images import load_image
    from .fileio import package_file
    from .vision import ModelNotAvailableError

    folder = package_file("data_store", "data", "pip install --no-deps pydicom-data",
                          purpose="the demo (real DICOM files)", error=ModelNotAvailableError)
    import pydicom

    rng = random.Random(seed)
    records = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
            image = load_image(path)
        except Exception as exc:  # undecodable transfer syntax or a deliberately broken test file
            log.info("demo: skipping %s (%s)", path.name, exc)
            continue
        if modality not in MODALITY_WORDS or MODALITY_WORDS[modality] == "other":
            continue
        for v in range(views):
            records.append(VQARecord(id=f"dicom-{path.stem}-{v}", image=random_crop_png(image, rng, size),
                                     question=MODALITY_QUESTION,
                                     answer=MODALITY_WORDS[modality], answer_type="closed",
                                     meta={"dataset": "pydicom-data", "modality": MODALITY_WORDS[modality],
                                           "question_type": "modality", "source": path.name}))
    choices = sorted({r.answer for r in records})
    for r in records:
        r.choices = choices
    return records


def random_crop_png(image: "Image.Image", rng: random.Random, size: int) -> bytes:
    """One view of an image: a random crop of 70-100 % of each side, resized to ``size``, as PNG bytes (the demo's
    DICOM views; the OOD benchmark crops other images the same way)."""
    from PIL import Image

    w, h = image.size
    s = rng.uniform(0.7, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    buf = io.BytesIO()
    image.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def build_demo_data(n_train: int, n_test: int, seed: int = 0,
                    views: int = 6) -> tuple[list[VQARecord], list[VQARecord]]:
    """Generated lesions: disjoint seeds for train and test. DICOM: views split per view index, so test crops are
    unseen crops of training files (the package has too few distinct studies for a patient-level split)."""
    train = lesion_records(n_train, seed=seed + 1, size=64, split="train")
    test = lesion_records(n_test, seed=seed + 2, size=64, split="test")
    dicom = dicom_records(views=views, seed=seed)
    train += [r for r in dicom if not r.id.endswith("-0")]
    test += [r for r in dicom if r.id.endswith("-0")]
    random.Random(seed).shuffle(train)
    return train, test


def check_demo_folder(out_dir: str | Path) -> Path:
    """Refuse, before anything is built, a demo folder whose parts (run/, eval/, adapter/) hold what an earlier demo
    did not write: each would otherwise be refused only minutes into the run. One line naming the part."""
    from .eval.reports import check_results_folder
    from .fileio import refuse_foreign
    from .train.checkpoint import check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir / "run")
    check_results_folder(out_dir / "eval")
    refuse_foreign(out_dir / "adapter")
    return out_dir


def run_demo(out_dir: str | Path = "checkpoints/demo", n_train: int = 360, n_test: int = 90, epochs: int = 6,
             seed: int = 0, progress: bool = True, preset: str = "demo_smollm2", views: int = 6,
             overrides: dict | None = None) -> dict:
    """Train, evaluate and save the demo adapter; `preset`/`overrides`/`views` let tests run it on tiny models."""
    from .eval.runner import evaluate, fit_calibration_on
    from .model import MedVQAAdapter
    from .train.trainer import TrainConfig, train

    t0 = time.time()
    out_dir = check_demo_folder(out_dir)
    train_records, test_records = build_demo_data(n_train, n_test, seed, views)
    print(f"demo data: {len(train_records)} training and {len(test_records)} held-out questions "
          f"(generated lesions + real DICOM from pydicom-data)")
    # the mapper and LoRA initialisation are seeded by the factory (the encoder seeds itself): same seed, same adapter
    model = MedVQAAdapter.from_preset(preset, seed=seed, **(overrides or {}))
    print(model.describe_parameters())
    cfg = TrainConfig(output_dir=str(out_dir / "run"), epochs=epochs, batch_size=16, seed=seed,
                      lr={"mapper": 2e-3, "lora": 1e-3, "encoder": 1e-3, "decoder": 0.0},
                      warmup=0.05, schedule="cosine", metric="loss", mixed_precision="bf16", progress=progress,
                      tensorboard=False)
    result = train(model, train_records, [], cfg)
    model.eval()
    # confidence: temperature scaling fitted on a validation set (generated questions from a seed neither split uses,
    # and fresh crops of the DICOM files, as the held-out ones are), then the held-out report shows calibration error
    # before/after, a reliability diagram and accuracy against coverage
    val_records = lesion_records(max(n_test, 30), seed=seed + 3, size=64, split="validation")
    for r in dicom_records(views=1, seed=seed + 3):
        r.id, r.meta["split"] = r.id.replace("dicom-", "dicom-validation-"), "validation"
        val_records.append(r)
    model.calibration = fit_calibration_on(model, val_records, "llava_med", batch_size=32, threshold=0.5,
                                           progress=progress)
    fitted = model.calibration.fitted_on
    print(f"calibration on {len(val_records)} validation questions: ECE {fitted['ece_before']:.3f} -> "
          f"{fitted['ece_after']:.3f} (temperature {model.calibration.temperature_generate:.2f} for generated and "
          f"{model.calibration.temperature_score:.2f} for ranked answers)")
    metrics = evaluate(model, test_records, "llava_med", out_dir / "eval", batch_size=32, progress=progress)
    by_type = _accuracy_by_type(out_dir / "eval" / "predictions.jsonl")
    model.save_pretrained(out_dir / "adapter", card={"metrics": {**metrics, **{f"accuracy_{k}": v for k, v in
                                                                             by_type.items()}},
                                                     "data": "generated lesion questions + pydicom-data modality "
                                                             "questions (prefixvqa demo)"})
    samples = test_records[:6]
    print("\nsample answers (held-out):")
    for r, text in zip(samples, _generated(model, samples)):
        print(f"  Q: {r.question:<45} gold: {r.answer:<12} model: {text}")
    control = _shuffled_image_control(model, test_records, seed)
    chance = {r.meta["question_type"]: 1 / len(r.choices) for r in test_records}
    print("\nheld-out accuracy by question type; control: the same questions with the images shuffled among them")
    print(f"  {'type':<10} {'accuracy':>8} {'control':>8} {'chance':>7}")
    for k, v in sorted(by_type.items()):
        print(f"  {k:<10} {v:>8.3f} {control[k]:>8.3f} " + (f"{chance[k]:>7.2f}" if k in chance else ""))
    print(f"\nadapter saved to {out_dir / 'adapter'}; report: {out_dir / 'eval' / 'report.md'}; "
          f"stopped: {result.stopped_reason}; {time.time() - t0:.0f} s")
    return {"metrics": metrics, "by_type": by_type, "control": control, "seconds": time.time() - t0}


def _generated(model: Any, records: Sequence[VQARecord], batch_size: int = 32) -> list[str]:
    """Generated answers (at most ``SAMPLE_TOKENS`` new tokens) through the one answering loop."""
    from .inference import answer_records

    rows = answer_records(model, records, [None] * len(records), batch_size, {"max_new_tokens": SAMPLE_TOKENS},
                          progress=False)
    return [row["prediction"] for row in rows]  # type: ignore[index]  (no on_error: a bad image raises)


def _shuffled_image_control(model: Any, records: list[VQARecord], seed: int) -> dict[str, float]:
    """Accuracy when each question gets another item's image: near chance if the answers really come from the image."""
    images = [r.image for r in records]
    random.Random(seed).shuffle(images)
    swapped = [dataclasses.replace(r, image=image) for r, image in zip(records, images)]
    return _by_type([(r.meta["question_type"], text, r.answer) for r, text in zip(records, _generated(model, swapped))])


def _accuracy_by_type(predictions: Path) -> dict[str, float]:
    import json

    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return _by_type([((r.get("meta") or {}).get("question_type", "other"), r["prediction"], r["gold"]) for r in rows])


def _by_type(rows: list[tuple[str, str, str]]) -> dict[str, float]:
    """(question type, prediction, gold) rows -> strict closed-match accuracy per type and over all."""
    from .eval.metrics import closed_match

    totals: dict[str, list[float]] = {}
    for kind, prediction, gold in rows:
        totals.setdefault(kind, []).append(closed_match(prediction, gold, mode="strict"))
    totals["all"] = [x for v in list(totals.values()) for x in v]
    return {k: sum(v) / len(v) for k, v in totals.items()}
