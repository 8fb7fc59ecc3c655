"""How well the out-of-distribution score (prefixvqa/ood.py) separates held-out training-like images from real images
of other kinds: AUROC per source and overall, and the share flagged at the adapter's threshold, for each statistic.

Two adapters, both on the demo preset (its small ResNet image tower trains with the adapter, so the features and the
score depend on the trained tower: a short demo-like training run is part of the benchmark):

* **demo**: trained as `prefixvqa demo` trains (generated lesions + crops of the pydicom-data DICOM files, same
  settings, fewer epochs unless ``--epochs 6``). In: the held-out DICOM crops (and, separately, the held-out lesion
  images). Out: the Med-Flamingo and LLaVA-Med example images, the VQA-RAD images and the colour fundus image in
  ../shared/realdata, and generated natural-like photos (sky, ground, sun, texture).
* **vqa-rad**: trained on VQA-RAD questions about 8 of the 10 VQA-RAD images here (random crops as views). In: fresh
  crops of its training images and the 2 images it never saw; threshold on 24 other fresh crops. Out: the same sources minus VQA-RAD, plus the demo's
  DICOM crops and lesions (Med-Flamingo's and LLaVA-Med's synpic images come from MedPix, as VQA-RAD's do: they are
  reported, not expected to be separated).

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_ood.py [--epochs 2] [--adapter checkpoints/demo/adapter] [--skip-vqa-rad]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefixvqa.data.records import VQARecord  # noqa: E402
from prefixvqa.ood import STATISTICS, auroc, image_features, summarize_training_images  # noqa: E402

REAL = ROOT.parent / "shared" / "realdata"


def natural_photos(n: int, seed: int = 0, size: int = 256) -> list[bytes]:
    """Generated outdoor-like colour photos: a sky gradient, a textured ground with a horizon at a random height, a
    sun or a tree-like blob, sensor noise; PNG bytes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = int(rng.integers(size // 3, 2 * size // 3))
        top, bottom = rng.integers(90, 200, 3), rng.integers(150, 255, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        sky = (top * (1 - t) + bottom * t) * np.ones((1, size, 1))
        ground_colour = rng.choice([[60, 120, 40], [150, 120, 70], [90, 90, 95], [200, 190, 150]])
        ground = ground_colour + rng.normal(0, 25, (size - h, size, 3))
        a = np.concatenate([sky, ground]).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(a)
        draw = ImageDraw.Draw(img)
        x, y, r = int(rng.integers(20, size - 20)), int(rng.integers(10, h)), int(rng.integers(8, 30))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(150, 255, 3)))
        for _ in range(int(rng.integers(1, 5))):  # trees, rocks, buildings
            x0, w, hh = int(rng.integers(0, size)), int(rng.integers(10, 60)), int(rng.integers(20, 100))
            draw.rectangle((x0, h - hh, x0 + w, h + 5), fill=tuple(int(c) for c in rng.integers(0, 160, 3)))
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def crops(path_or_bytes: Any, views: int, seed: int, size: int = 64) -> list[bytes]:
    """Random crops (70-100 % of each side) resized to ``size``: the demo's DICOM views, for any image."""
    from prefixvqa.data.images import load_image
    from prefixvqa.demo import random_crop_png

    rng = random.Random(seed)
    image = load_image(path_or_bytes)
    return [random_crop_png(image, rng, size) for _ in range(views)]


def as_records(images: list[Any], prefix: str) -> list[VQARecord]:
    return [VQARecord(f"{prefix}{i}", im, "q", "a") for i, im in enumerate(images)]


def real_sources() -> dict[str, list[str]]:
    """The real images in ../shared/realdata, by source."""
    return {"med-flamingo": sorted(str(p) for p in (REAL / "med_flamingo" / "img").glob("*.jpg")),
            "llava-med examples": sorted(str(p) for p in (REAL / "llava_med" / "examples").iterdir()),
            "vqa-rad": sorted(str(p) for p in (REAL / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg")),
            "colour fundus": [str(REAL / "llava_med_retina" / "color_fundus_image.jpg")]}


def train_short(records: list[VQARecord], epochs: int, out: Path, seed: int = 0) -> Any:
    """The demo's model and training settings (demo.run_demo), ``epochs`` epochs."""
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.train.trainer import TrainConfig, train

    model = MedVQAAdapter.from_preset("demo_smollm2", seed=seed)
    if epochs == 0:  # the tower as initialised: what the score sees before any training
        return model.eval()
    cfg = TrainConfig(output_dir=str(out), epochs=epochs, batch_size=16, seed=seed,
                      lr={"mapper": 2e-3, "lora": 1e-3, "encoder": 1e-3, "decoder": 0.0}, warmup=0.05,
                      schedule="cosine", metric="loss", mixed_precision="bf16", progress=False, tensorboard=False,
                      plot=False)
    t0 = time.time()
    train(model, records, [], cfg)
    print(f"  trained {len(records)} records x {epochs} epoch(s) in {time.time() - t0:.0f} s")
    return model.eval()


def measure(model: Any, train_records: list[VQARecord], inside: dict[str, list[Any]],
            outside: dict[str, list[Any]], threshold_images: list[Any] | None) -> list[dict[str, Any]]:
    """Per statistic: the summary the trainer fits (threshold refitted on ``threshold_images`` when given, as `eval
    --calibrate-on` does), AUROC of every inside set against all outside images and per outside source."""
    feats_in = {k: image_features(model, as_records(v, k)) for k, v in inside.items()}
    feats_out = {k: image_features(model, as_records(v, k)) for k, v in outside.items()}
    thr_feats = image_features(model, as_records(threshold_images, "t")) if threshold_images else None
    rows = []
    for name in STATISTICS:
        summary = summarize_training_images(model, train_records, statistic=name)  # type: ignore[arg-type]
        if thr_feats is not None:
            summary = summary.with_threshold(summary.score(thr_feats), "validation images")
        s_in = {k: summary.score(v) for k, v in feats_in.items()}
        s_out = {k: summary.score(v) for k, v in feats_out.items()}
        all_out = [x for v in s_out.values() for x in v]
        row = {"statistic": name, "threshold": summary.threshold, "fitted_on": summary.fitted_on}
        for k, v in s_in.items():
            row[f"AUROC in={k}"] = auroc(v, all_out)
            row[f"flagged in={k}"] = sum(map(summary.flagged, v)) / len(v)
        for k, v in s_out.items():
            row[f"AUROC vs {k}"] = auroc(s_in[next(iter(s_in))], v)
            row[f"flagged {k}"] = sum(map(summary.flagged, v)) / len(v)
        row["flagged all out"] = sum(map(summary.flagged, all_out)) / len(all_out)
        rows.append(row)
    return rows


def show(title: str, rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    print(f"\n## {title}\nimages: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for row in rows:
        print(f"\nstatistic {row['statistic']}: threshold {row['threshold'] or float('nan'):.4g} "
              f"(fitted on {row['fitted_on'].get('images')} training images, held out "
              f"{row['fitted_on'].get('held_out')} from {row['fitted_on'].get('held_out_from')})")
        for k, v in row.items():
            if k.startswith(("AUROC", "flagged")):
                print(f"  {k:<40} {v:.3f}")


def demo_benchmark(args: argparse.Namespace, work: Path) -> None:
    from prefixvqa.demo import build_demo_data, dicom_records
    from prefixvqa.data.synthetic import lesion_records

    train_records, test_records = build_demo_data(360, 90, 0, 6)
    if args.adapter:
        from prefixvqa.model import MedVQAAdapter

        model = MedVQAAdapter.from_pretrained(args.adapter).eval()
        print(f"demo adapter: {args.adapter}")
    else:
        print(f"demo adapter: a short demo run ({args.epochs} epoch(s))")
        model = train_short(train_records, args.epochs, work / "demo")
    val = lesion_records(90, seed=3, size=64, split="validation") + dicom_records(views=1, seed=3)
    inside = {"held-out DICOM": [r.image for r in test_records if r.id.startswith("dicom-")],
              "held-out DICOM + lesions": [r.image for r in test_records]}
    outside = {**real_sources(), "natural photos": natural_photos(20)}
    rows = measure(model, train_records, inside, outside, [r.image for r in val])
    show("demo adapter", rows, {**{k: len(v) for k, v in inside.items()}, **{k: len(v) for k, v in outside.items()}})


def vqa_rad_benchmark(args: argparse.Namespace, work: Path) -> None:
    from prefixvqa.data.readers import load_records
    from prefixvqa.demo import build_demo_data

    folder = REAL / "vqa_rad"
    records = [r for r in load_records({"format": "vqa_rad", "path": str(folder), "check_images": False}) if Path(str(r.image)).is_file()]
    images = sorted({str(r.image) for r in records})
    seen, unseen = images[:8], images[8:]
    views = {im: crops(im, 6, k) for k, im in enumerate(seen)}
    train_records = [VQARecord(f"{r.id}-{v}", views[str(r.image)][v], r.question, r.answer, r.answer_type,
                               r.choices, r.meta) for r in records if str(r.image) in views for v in range(6)]
    print(f"VQA-RAD adapter: {len(train_records)} training records ({args.vqa_rad_epochs} epoch(s))")
    model = train_short(train_records, args.vqa_rad_epochs, work / "vqa_rad")
    inside = {"fresh crops of its images + 2 unseen VQA-RAD images":
              [c for k, im in enumerate(seen) for c in crops(im, 2, 100 + k)] +
              [c for k, im in enumerate(unseen) for c in [im] + crops(im, 4, 200 + k)]}
    _, demo_test = build_demo_data(60, 30, 0, 6)
    real = real_sources()
    real.pop("vqa-rad")
    outside = {**real, "demo DICOM crops": [r.image for r in demo_test if r.id.startswith("dicom-")],
               "demo lesions": [r.image for r in demo_test if not r.id.startswith("dicom-")],
               "natural photos": natural_photos(20)}
    validation = [c for k, im in enumerate(seen) for c in crops(im, 3, 300 + k)]  # as `eval --calibrate-on` would
    rows = measure(model, train_records, inside, outside, validation)
    show("VQA-RAD adapter", rows, {**{k: len(v) for k, v in inside.items()},
                                   **{k: len(v) for k, v in outside.items()}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="a trained demo adapter folder (default: train a short demo run here)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs of the short demo run (the demo trains 6; 0: the untrained tower)")
    ap.add_argument("--vqa-rad-epochs", type=int, default=3)
    ap.add_argument("--skip-vqa-rad", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_demo:
            demo_benchmark(args, Path(tmp))
        if not args.skip_vqa_rad:
            vqa_rad_benchmark(args, Path(tmp))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
