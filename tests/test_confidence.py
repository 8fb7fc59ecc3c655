"""Confidence on every answer: temperature scaling lowers calibration error on held-out items, abstaining raises
accuracy on the answered ones, grounding maps depend on the image, and `predict` answers records without answers."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from prefixvqa.calibration import (Calibration, coverage_curve, expected_calibration_error, fit_calibration,
                                   is_correct, row_confidence)
from prefixvqa.data.records import VQARecord

SHADES = {"red": ((210, 40, 40), "yes"), "blue": ((40, 40, 210), "no"), "grey": ((128, 128, 128), None)}


def lesion_task(folder, n: int, seed: int, prefix: str, shades: tuple[str, ...] = ("red", "blue", "grey"),
                flip: float = 0.0) -> list[VQARecord]:
    """Red images: a lesion ("yes"); blue: none ("no"), each answer flipped with probability `flip` (label noise, so
    even a perfect model is right only 1 - flip of the time); grey images carry no information and their answer is a
    coin flip: confidence that tracks correctness is learnable."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        shade = shades[i % len(shades)]
        rgb, answer = SHADES[shade]
        path = folder / f"{prefix}{i}.png"
        Image.new("RGB", (32, 32), tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in rgb)).save(path)
        if answer is None or rng.random() < flip:
            answer = rng.choice(["yes", "no"]) if answer is None else {"yes": "no", "no": "yes"}[answer]
        records.append(VQARecord(f"{prefix}{i}", str(path), "is there a lesion?", answer,
                                 "closed", None, {"shade": shade, "question_type": "presence"}))
    return records


@pytest.fixture(scope="module")
def calibrated_setup(tmp_path_factory, tiny_decoders):
    """A tiny adapter trained briefly on the noisy lesion task (mostly right on red/blue but not yet as sure as it
    should be: under-confident), validation and held-out sets of red/blue items, and a mixed set with grey ones."""
    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    root = tmp_path_factory.mktemp("confidence")
    torch.manual_seed(0)
    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"])))
    train = lesion_task(root / "train", 48, 0, "tr", flip=0.1)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(60):
        batch = [train[(step * 16 + k) % len(train)] for k in range(16)]
        loss = model(**model.processor([r.image for r in batch], [r.question for r in batch],
                                       [r.answer for r in batch])).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    sets = {"val": lesion_task(root / "val", 90, 1, "va", ("red", "blue"), 0.1),
            "test": lesion_task(root / "test", 90, 2, "te", ("red", "blue"), 0.1),
            "mixed": lesion_task(root / "mixed", 60, 3, "mx")}
    return model, sets, root


def test_temperature_scaling_recovers_an_overconfident_scale():
    """Synthetic: true P(correct) = sigmoid(z), reported log-odds 3z (overconfident); the fit finds T ~ 3 and
    lowers ECE on a fresh sample."""
    rng = np.random.default_rng(0)

    def sample(n):
        z = rng.normal(0.5, 1.5, n)
        ok = rng.random(n) < 1 / (1 + np.exp(-z))
        # a 2-way scored item whose winning-candidate log-likelihood margin is 3z (sign kept on the winner)
        win = [1 / (1 + math.exp(-abs(3 * v))) for v in z]
        rows = [{"mode": "score", "choice_probs": [p, 1 - p]} for p in win]
        return rows, [bool(o) if v >= 0 else not o for v, o in zip(z, ok)]

    rows, correct = sample(1500)
    cal = fit_calibration(rows, correct)
    assert 2.5 < cal.temperature_score < 3.5
    # a validation set without a single error does not collapse every confidence to 1 (Platt's smoothed targets)
    perfect = fit_calibration(rows[:100], [True] * 100)
    mean = float(np.mean([row_confidence(r, perfect) for r in rows[:100]]))
    assert perfect.temperature_score > 0.05 and 0.9 < mean < 0.99
    test_rows, test_correct = sample(1500)
    before = expected_calibration_error([row_confidence(r, None) for r in test_rows], test_correct)
    after = expected_calibration_error([row_confidence(r, cal) for r in test_rows], test_correct)
    assert after < before / 3
    # the curve: answering fewer, more confident items is more accurate
    curve = coverage_curve([row_confidence(r, cal) for r in test_rows], test_correct)
    assert curve[-1]["coverage"] == 1.0 and curve[len(curve) // 4]["accuracy"] > curve[-1]["accuracy"]


def test_calibration_lowers_ece_on_held_out_items(calibrated_setup, tmp_path):
    from prefixvqa.adapter_io import save_calibration
    from prefixvqa.eval.runner import evaluate, fit_calibration_on, load_predictions
    from prefixvqa.model import MedVQAAdapter

    model, sets, _ = calibrated_setup
    val, test = sets["val"], sets["test"]
    cal = fit_calibration_on(model, val, "llava_med", batch_size=32, threshold=0.7, max_new_tokens=3,
                             progress=False)  # llava_med generates every answer, as upstream
    assert cal.fitted_on["generated"] == 90 and cal.temperature_generate > 1.5  # under-confident: T raises it
    assert cal.fitted_on["ece_after"] < cal.fitted_on["ece_before"]
    evaluate(model, test, "llava_med", tmp_path / "eval", batch_size=32, calibration=cal, max_new_tokens=3,
             progress=False)
    conf = json.loads((tmp_path / "eval" / "metrics.json").read_text())["confidence"]
    assert conf["ece_calibrated"] < conf["ece_raw"] / 2, conf  # held-out items: the fitted temperature transfers
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "ECE, raw confidence" in report and "ECE, temperature-scaled" in report and "](reliability.png)" in report
    assert "Accuracy against coverage" in report
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    rows = load_predictions(tmp_path / "eval")
    assert all(r["confidence"] == pytest.approx(row_confidence(r, cal), abs=1e-6) for r in rows)

    # stored in the adapter folder (re-manifested), loaded with it, used by score_choices
    folder = model.save_pretrained(tmp_path / "adapter")
    save_calibration(folder, cal)
    loaded = MedVQAAdapter.from_pretrained(folder)
    assert loaded.calibration == cal
    raw = loaded.score_choices([test[0].image], [test[0].question], [["yes", "no"]], return_loglik=True)[0]
    assert loaded.score_choices([test[0].image], [test[0].question], [["yes", "no"]])[0] == \
        pytest.approx(cal.scored(raw))


def test_abstaining_raises_accuracy_on_answered_items(calibrated_setup):
    from prefixvqa.calibration import UNCERTAIN

    model, sets, _ = calibrated_setup
    test = sets["mixed"]
    answers = model.answer([r.image for r in test], [r.question for r in test], max_new_tokens=3)
    assert all(0.0 < a.confidence <= 1.0 and a.confidence == pytest.approx(math.exp(a.score / a.num_tokens))
               for a in answers)
    threshold = float(np.median([a.confidence for a in answers]))
    held = model.answer([r.image for r in test], [r.question for r in test], max_new_tokens=3,
                        abstain_below=threshold)
    right = [a.text == r.answer for a, r in zip(answers, test)]
    answered = [(h.text == r.answer) for h, r in zip(held, test) if not h.abstained]
    assert 0 < len(answered) < len(test)
    assert all(h.text == UNCERTAIN and h.guess == a.text for h, a in zip(held, answers) if h.abstained)
    assert sum(answered) / len(answered) > sum(right) / len(right) + 0.1


def test_grounding_map_depends_on_the_image(calibrated_setup, tmp_path):
    from PIL import Image

    from prefixvqa.explain import explain, grounding_map

    model, sets, _ = calibrated_setup
    test = sets["mixed"]
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = (210, 40, 40)  # lesion colour on the left only
    left, right = Image.fromarray(half), Image.fromarray(half[:, ::-1].copy())
    maps = {name: grounding_map(model, im, "is there a lesion?", answer="yes", grid=4).heatmap
            for name, im in (("left", left), ("right", right))}
    assert maps["left"].shape == (4, 4) and maps["left"].max() == 1.0
    assert not np.allclose(maps["left"], maps["right"], atol=1e-3)
    again = grounding_map(model, left, "is there a lesion?", answer="yes", grid=4).heatmap
    np.testing.assert_allclose(again, maps["left"], atol=1e-6)
    g, picture = explain(model, test[0].image, test[0].question, tmp_path / "x.png", grid=4)
    assert picture.size == Image.open(test[0].image).size and Image.open(tmp_path / "x.png").format == "PNG"
    with pytest.raises(ValueError, match="square grid of patch features"):  # one pooled vector has no layout
        grounding_map(model, left, "is there a lesion?", method="grad_x_input")


def test_grad_x_input_over_patch_features(tiny_decoders):
    from PIL import Image

    from prefixvqa.config import AdapterConfig
    from prefixvqa.explain import grounding_map
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    over = tiny_overrides(tiny_decoders["gpt2"])
    over = {**over, "mapper": {**over["mapper"], "kind": "linear"},
            "encoder": {**over["encoder"], "features": "patches"}}
    model = MedVQAAdapter(AdapterConfig().replace(**over)).eval()
    a, b = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    maps = [grounding_map(model, im, "is there a lesion?", answer="yes", method="grad_x_input").heatmap
            for im in (a, b)]
    assert maps[0].shape == (4, 4)  # 32 px / patch 8: the ViT's own 4 x 4 grid
    assert not np.allclose(maps[0], maps[1], atol=1e-3)


def test_predict_on_records_without_answers(calibrated_setup, tmp_path, capsys):
    from prefixvqa.cli import main

    model, sets, _ = calibrated_setup
    test = sets["mixed"]
    folder = model.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "unlabeled.jsonl"
    data.write_text("".join(json.dumps({"image": r.image, "question": r.question, "id": r.id,
                                        **({"answer_type": "closed"} if i % 2 else {})}) + "\n"
                            for i, r in enumerate(test[:6])))
    with pytest.raises(Exception, match="missing field 'answer'"):
        from prefixvqa.data.readers import load_records

        load_records(str(data))
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--adapter", str(folder), "--data", str(data), "--out", str(out),
                 "--abstain-below", "0.5", "--max-new-tokens", "3", "--closed-mode", "score"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in test[:6]]
    assert {r["mode"] for r in rows} == {"score", "generate"}  # closed ones ranked, the rest generated
    for r in rows:
        assert 0.0 <= r["confidence"] <= 1.0 and r["guess"]
        assert r["abstained"] == (r["confidence"] < 0.5) and (r["answer"] == "uncertain") == r["abstained"]
    assert "6 answers" in capsys.readouterr().out
    # CLI: answer with a grounding heatmap
    png = tmp_path / "explain.png"
    assert main(["answer", "--adapter", str(folder), "--image", test[0].image, "is there a lesion?",
                 "--max-new-tokens", "2", "--explain", str(png)]) == 0
    assert png.stat().st_size > 100 and "confidence" in capsys.readouterr().err


def test_is_correct_rule():
    assert is_correct(1.0) and is_correct(0.5) and not is_correct(0.49) and not is_correct(None)
    with pytest.raises(ValueError, match="temperature_score"):
        Calibration(temperature_score=0.0)


def test_eval_cli_calibrates_saves_and_retrieves_shots(calibrated_setup, tmp_path, capsys):
    from prefixvqa.cli import main
    from prefixvqa.model import MedVQAAdapter

    model, sets, _ = calibrated_setup
    folder = model.save_pretrained(tmp_path / "adapter")
    files = {}
    for name, records in (("val", sets["val"][:40]), ("test", sets["mixed"][:24])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"id": r.id, "image": r.image, "question": r.question,
                                                   "answer": r.answer, "answer_type": "closed"}) + "\n"
                                       for r in records))
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(folder), "--data", str(files["test"]), "--out", str(out),
                 "--calibrate-on", str(files["val"]), "--save-calibration", "--abstain-below", "0.7",
                 "--shots", "1", "--shot-pool", str(files["val"]), "--feature-cache", str(tmp_path / "cache"),
                 "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "calibration on 40 validation items: ECE" in printed and "calibration.json" in printed
    assert MedVQAAdapter.from_pretrained(folder).calibration.threshold == 0.7
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    val_ids = {r.id for r in sets["val"]}
    assert all(len(r["shot_ids"]) == 1 and r["shot_ids"][0] in val_ids for r in rows)
    report = (out / "report.md").read_text()
    assert "ECE, temperature-scaled" in report and "| abstain below | 0.7000 |" in report
    # a one-file dataset has no separate train split: its "train" pool would leak the evaluated answers
    assert main(["eval", "--adapter", str(folder), "--data", str(files["test"]), "--out", str(out),
                 "--shots", "1"]) == 2
    assert "shares 24 record(s) with the evaluated data" in capsys.readouterr().err


def test_abstention_has_one_rule():
    from prefixvqa.calibration import (UNCERTAIN, CalibrationError, abstain, abstains, abstention_threshold,
                                       check_threshold)
    from prefixvqa.errors import PrefixVQAError
    from prefixvqa.model import Answer

    cal = Calibration(threshold=0.6)
    assert abstention_threshold(None, None) is None and abstention_threshold(None, cal) == 0.6
    assert abstention_threshold(0.2, cal) == 0.2  # the caller's wins over the calibration's default
    with pytest.raises(CalibrationError, match="--abstain-below must be a confidence in"):
        abstention_threshold(1.5, cal, "--abstain-below")
    assert issubclass(CalibrationError, PrefixVQAError) and issubclass(CalibrationError, ValueError)
    assert check_threshold(0) == 0.0
    assert abstains(0.5, 0.6) and not abstains(0.6, 0.6) and not abstains(0.1, None) and not abstains(None, 0.6)
    answer = Answer("yes", -1.0, 2, 0.4)
    held = abstain(answer, 0.5)
    assert (held.text, held.guess, held.abstained, held.confidence) == (UNCERTAIN, "yes", True, 0.4)
    assert abstain(answer, 0.3) is answer and abstain(answer, None) is answer
    # --abstain-below on an adapter's calibration: same temperatures, another default threshold
    fitted = Calibration(2.0, 0.5, None, {"items": 3})
    assert fitted.with_threshold(0.7) == Calibration(2.0, 0.5, 0.7, {"items": 3})
    assert fitted.with_threshold(None) is fitted


def test_a_calibration_fitted_on_the_evaluated_items_is_refused(calibrated_setup, tmp_path):
    """The rule lives in the library, so Python callers get it as the CLI does."""
    from prefixvqa.eval.errors import DataOverlapError
    from prefixvqa.eval.runner import evaluate, fit_calibration_on

    model, sets, _ = calibrated_setup
    val, test = sets["val"][:8], sets["test"][:4]
    cal = fit_calibration_on(model, val, "llava_med", batch_size=8, max_new_tokens=2, progress=False)
    assert cal.fitted_ids == {r.id for r in val}
    for calibration in (cal, cal.with_threshold(0.5)):
        with pytest.raises(DataOverlapError, match="the calibration set shares 2 record"):
            evaluate(model, val[:2] + test, "llava_med", tmp_path / "x", calibration=calibration, progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything ran
    with pytest.raises(DataOverlapError, match="the calibration set shares 3 record"):  # before fitting, on request
        fit_calibration_on(model, val, "llava_med", evaluated=val[:3] + test, progress=False)
    # the ids stay in memory: the saved file carries provenance, and a reloaded calibration is not refused
    saved = json.loads(cal.save(tmp_path).read_text())
    assert "fitted_ids" not in saved and Calibration.load(tmp_path) == cal
    evaluate(model, val[:2], "llava_med", tmp_path / "y", calibration=Calibration.load(tmp_path), max_new_tokens=2,
             progress=False, plots=False)
