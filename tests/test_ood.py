"""Out-of-distribution images (prefixvqa/ood.py): the training images' summary is saved with the adapter (strict, in
the manifest, old adapters still load), its score ranks unlike images above training-like ones, and the warning
reaches `answer`, `score_choices`, `predict`, `eval` and the CLI; training writes the summary into its checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prefixvqa.data.records import VQARecord
from prefixvqa.ood import (OOD_WARNING, SUMMARY_NAME, STATISTICS, ImageSummary, auroc, fit_summary, image_features,
                           quantile_threshold)


def pictures(folder, kind: str, n: int, seed: int) -> list[str]:
    """``inside``: grey scans with a bright disc at a random place (the training look); ``outside``: colour noise
    and stripes, nothing like them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        if kind == "inside":
            a = np.full((32, 32), 90.0) + rng.normal(0, 8, (32, 32))
            cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 7)
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
            a = np.repeat(a[..., None], 3, -1)
        elif i % 2:
            a = rng.integers(0, 256, (32, 32, 3)).astype(float)
        else:
            a = np.zeros((32, 32, 3))
            a[:, :, i % 3] = 255 * ((xx // (2 + i % 4)) % 2)
        path = folder / f"{kind}{seed}_{i}.png"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def records(paths: list[str], prefix: str, answer: str | None = "yes") -> list[VQARecord]:
    return [VQARecord(f"{prefix}{i}", p, "is there a lesion?", answer, "closed", ["yes", "no"], {})
            for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_decoders):
    """A tiny adapter with a summary of 40 training-like images (threshold on 20 held-out ones), and fresh inside
    and outside images."""
    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    root = tmp_path_factory.mktemp("ood")
    torch.manual_seed(0)
    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"]))).eval()
    train = records(pictures(root / "train", "inside", 40, 0), "tr")
    held = records(pictures(root / "held", "inside", 20, 1), "he")
    model.image_summary = fit_summary(image_features(model, train), image_features(model, held),
                                      provenance={"held_out_from": "test"})
    inside = pictures(root / "in", "inside", 12, 2)
    outside = pictures(root / "out", "outside", 12, 3)
    scores = model.image_summary.score(image_features(model, records(inside, "i")))
    inside = [p for _, p in sorted(zip(scores, inside))]  # the most training-like first (5 % of them are flagged)
    return model, inside, outside, root


def test_score_ranks_unlike_images_above_training_like_ones(setup):
    model, inside, outside, _ = setup
    f_in, f_out = image_features(model, records(inside, "i")), image_features(model, records(outside, "o"))
    train = image_features(model, records(pictures(setup[3] / "train", "inside", 40, 0), "tr"))
    for name in STATISTICS:
        summary = fit_summary(train, statistic=name)  # type: ignore[arg-type]
        assert summary.threshold is None  # nothing held out: scores only
        assert auroc(summary.score(f_in), summary.score(f_out)) >= 0.95, name
    s = model.image_summary
    assert s.threshold is not None and s.fitted_on["held_out"] == 20 and s.fitted_on["images"] == 40
    assert sum(map(s.flagged, s.score(f_in))) <= 2 and all(map(s.flagged, s.score(f_out)))
    assert auroc([1, 2], [3, 4]) == 1.0 and auroc([1, 2], [2, 1]) == 0.5
    assert quantile_threshold(list(range(1, 21)), 0.95) == 19 and quantile_threshold([1.0] * 9, 0.95) is None


def test_summary_round_trip_manifest_strict_and_old_adapters(setup, tmp_path):
    from prefixvqa.adapter_io import AdapterLoadError
    from prefixvqa.fileio import MANIFEST_NAME, write_manifest
    from prefixvqa.model import MedVQAAdapter

    model = setup[0]
    folder = model.save_pretrained(tmp_path / "adapter")
    assert SUMMARY_NAME in json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert (folder / SUMMARY_NAME).stat().st_size < 1 << 20
    loaded = MedVQAAdapter.from_pretrained(folder).image_summary
    want = model.image_summary
    assert (loaded.statistic, loaded.threshold, loaded.quantile, loaded.encoder_key, loaded.fitted_on) == (
        want.statistic, want.threshold, want.quantile, want.encoder_key, want.fitted_on)
    assert all(torch.equal(loaded.tensors[k], want.tensors[k].float()) for k in want.tensors)
    # damaged: one line naming the file (after a manifest that agrees, so the summary reader itself is tested)
    (folder / SUMMARY_NAME).write_bytes(b"not safetensors")
    write_manifest(folder)
    with pytest.raises(AdapterLoadError, match=SUMMARY_NAME):
        MedVQAAdapter.from_pretrained(folder)
    # a file whose tensors do not fit its statistic
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(4)}, str(folder / SUMMARY_NAME),
              metadata={"summary": json.dumps({"statistic": "mahalanobis"})})
    write_manifest(folder)
    with pytest.raises(AdapterLoadError, match="needs tensors"):
        MedVQAAdapter.from_pretrained(folder)
    # an adapter saved before summaries existed: loads, without the signal
    (folder / SUMMARY_NAME).unlink()
    write_manifest(folder)
    old = MedVQAAdapter.from_pretrained(folder)
    assert old.image_summary is None
    a = old.answer([setup[2][0]], ["is there a lesion?"], max_new_tokens=2)[0]
    assert a.ood_score is None and not a.ood and a.warning is None
    # a summary file the manifest does not list is refused like any other unlisted file
    model.image_summary.save(folder)
    with pytest.raises(AdapterLoadError, match=SUMMARY_NAME):
        MedVQAAdapter.from_pretrained(folder)


def test_answer_and_score_choices_carry_the_warning_and_abstain(setup):
    model, inside, outside, _ = setup
    images, questions = [inside[0], outside[0]], ["is there a lesion?"] * 2
    answers = model.answer(images, questions, max_new_tokens=3)
    assert [a.ood for a in answers] == [False, True]
    assert answers[1].warning == OOD_WARNING and answers[0].warning is None
    assert answers[1].ood_score > model.image_summary.threshold >= answers[0].ood_score
    summary, model.image_summary = model.image_summary, None
    try:  # the answers themselves do not change: the features are computed once either way
        plain = model.answer(images, questions, max_new_tokens=3)
        plain_probs = model.score_choices(images, questions, [["yes", "no"]] * 2)
    finally:
        model.image_summary = summary
    assert [(a.text, a.score) for a in plain] == [(a.text, a.score) for a in answers]
    probs = model.score_choices(images, questions, [["yes", "no"]] * 2)
    assert probs == plain_probs and [p.ood for p in probs] == [False, True] and probs[1].warning == OOD_WARNING
    # with an abstention threshold in force, a flagged answer is "uncertain" whatever its confidence
    withheld = model.answer(images, questions, max_new_tokens=3, abstain_below=0.0)
    assert [a.abstained for a in withheld] == [False, True] and withheld[1].text == "uncertain"
    assert withheld[1].guess == answers[1].text


def test_predict_eval_and_cli_report_it(setup, tmp_path, capsys):
    from prefixvqa.cli import main
    from prefixvqa.eval.runner import evaluate, fit_calibration_on
    from prefixvqa.predict import predict_records

    model, inside, outside, root = setup
    test = records(inside[:4] + outside[:4], "t")
    rows = predict_records(model, test, closed_mode="score", progress=False)
    assert [r["ood"] for r in rows] == [False] * 4 + [True] * 4
    assert all(r["warning"] == OOD_WARNING for r in rows[4:]) and not any(r["abstained"] for r in rows)
    assert all(r["abstained"] for r in predict_records(model, test[4:], abstain_below=0.0, progress=False))
    metrics = evaluate(model, test, "llava_med", tmp_path / "eval", closed_mode="score", progress=False, plots=False)
    assert metrics
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["ood"]
    assert written["flagged"]["n"] == 4 and written["not flagged"]["n"] == 4
    assert "## Images unlike the training images" in (tmp_path / "eval" / "report.md").read_text()
    # calibrating on held-out in-distribution images refits the threshold too
    before = model.image_summary
    try:
        fit_calibration_on(model, records(pictures(root / "val", "inside", 12, 4), "v"), "llava_med",
                           closed_mode="score", progress=False)
        assert model.image_summary.threshold != before.threshold
        assert model.image_summary.fitted_on["held_out"] == 12
    finally:
        model.image_summary = before
    folder = model.save_pretrained(tmp_path / "adapter")
    assert main(["answer", "--adapter", str(folder), "--image", outside[0], "is there a lesion?",
                 "--max-new-tokens", "2"]) == 0
    assert f"warning: this image is {OOD_WARNING}" in capsys.readouterr().out
    assert main(["answer", "--adapter", str(folder), "--image", inside[0], "is there a lesion?", "--choices",
                 "yes,no"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["answer", "--adapter", str(folder), "--image", outside[0], "is there a lesion?", "--choices",
                 "yes,no", "--abstain-below", "0"]) == 0
    printed = capsys.readouterr().out
    assert "uncertain" in printed and OOD_WARNING in printed


def test_training_writes_the_summary_into_its_checkpoints(tmp_path, tiny_decoders):
    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides
    from prefixvqa.train import TrainConfig, train

    from prefixvqa.data.cache import encoder_key

    train_records = records(pictures(tmp_path / "tr", "inside", 16, 0), "tr")
    eval_records = records(pictures(tmp_path / "ev", "inside", 10, 1), "ev")
    cfg = dict(epochs=1, batch_size=8, progress=False, tensorboard=False, plot=False, eval_every_epoch=False)
    for freeze in (True, False):  # a tower that trains: the summary is of the trained tower's features
        torch.manual_seed(0)
        over = tiny_overrides(tiny_decoders["gpt2"])
        model = MedVQAAdapter(AdapterConfig().replace(**{**over, "encoder": {**over["encoder"], "freeze": freeze}}))
        result = train(model, train_records, eval_records,
                       TrainConfig(output_dir=str(tmp_path / f"run{freeze}"), **cfg))
        for folder in (result.best_dir, result.last_dir):
            summary = ImageSummary.load(folder)
            assert summary is not None and summary.fitted_on["images"] == 16
            assert summary.fitted_on["held_out"] == 10 and summary.fitted_on["held_out_from"] == "evaluation images"
        loaded = MedVQAAdapter.from_pretrained(result.best_dir)
        assert loaded.image_summary.threshold == summary.threshold
        assert summary.encoder_key == encoder_key(loaded)
        assert (summary.encoder_key == model.base_fingerprints["encoder"]) == freeze
