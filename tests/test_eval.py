"""Evaluation protocols and runner, end to end on a tiny adapter trained here for a few dozen steps (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from prefixvqa.data.records import VQARecord, content_hash  # noqa: E402
from prefixvqa.eval import protocols as P  # noqa: E402
from prefixvqa.eval.metrics import normalize_answer  # noqa: E402
from prefixvqa.eval.runner import compare, evaluate, load_predictions, rescore  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"  # ../shared next to the checkout

COLOURS = {"red": ((220, 30, 30), "yes", "lung", "ct"), "blue": ((30, 30, 220), "no", "liver", "mri")}


def make_task(folder, n: int = 8, prefix: str = "t") -> list[VQARecord]:
    """Red images have a lesion in the lung (CT), blue ones none, in the liver (MRI): one closed + one open each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        rgb, yes_no, organ, modality = COLOURS[colour]
        path = folder / f"{prefix}{i}.png"
        Image.new("RGB", (32, 32), tuple(min(255, c + 3 * i) for c in rgb)).save(path)
        meta = {"dataset": "colours", "split": "test", "modality": modality, "organ": organ, "image_name": path.name}
        records.append(VQARecord(f"{prefix}{i}c", str(path), "is there a lesion?", yes_no, "closed", None,
                                 {**meta, "question_type": "presence"}))
        records.append(VQARecord(f"{prefix}{i}o", str(path), "what organ is shown?", organ, "open", None,
                                 {**meta, "question_type": "organ"}))
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny adapter trained with a plain AdamW loop on the colour task, saved and reloaded."""
    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import build_decoder, tiny_overrides

    root = tmp_path_factory.mktemp("eval")
    decoder = build_decoder(root / "decoder", "gpt2")
    torch.manual_seed(0)
    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(decoder)))
    train = make_task(root / "train_images", 8, "tr")
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):
        batch = model.processor([r.image for r in train], [r.question for r in train], [r.answer for r in train])
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(root / "adapter")
    loaded = MedVQAAdapter.from_pretrained(root / "adapter").eval()
    return loaded, root / "adapter", make_task(root / "test_images", 4, "te"), root


def test_end_to_end_outputs_and_determinism(trained, tmp_path):
    model, adapter, records, _ = trained
    spec = {"reader": "colours", "split": "test"}
    first = evaluate(model, records, "llava_med", tmp_path / "a", batch_size=3, max_new_tokens=4, data_spec=spec,
                     adapter_path=adapter, progress=False, closed_mode="score")
    evaluate(model, records, "llava_med", tmp_path / "b", batch_size=3, max_new_tokens=4, data_spec=spec,
             adapter_path=adapter, progress=False, closed_mode="score")
    out = tmp_path / "a"
    for name in ("predictions.jsonl", "metrics.json", "report.md", "manifest.json", "per_type_accuracy.png",
                 "confusion_closed.png", "confidence_hist.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # two runs give byte-identical results (scores of differently padded batches differ in the last float bits,
    # so determinism is asserted for the same batch size)
    assert (out / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (out / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()

    # trained on the same rule: closed questions (scored over yes/no) are answered right
    assert first["closed_accuracy_strict"] == 1.0 and first["n"] == len(records)
    rows = load_predictions(out)
    assert [r["id"] for r in rows] == [r.id for r in records]
    closed = [r for r in rows if r["answer_type"] == "closed"]
    assert all(r["mode"] == "score" and r["candidates"] == ["yes", "no"] for r in closed)
    assert all(math.isclose(sum(r["choice_probs"]), 1.0, abs_tol=1e-5) for r in closed)
    assert all(r["mode"] == "generate" and r["choice_probs"] is None for r in rows if r["answer_type"] == "open")
    assert {"gold", "prediction", "question", "confidence", "score", "meta"} <= set(rows[0])

    report = (out / "report.md").read_text()
    for heading in ("## Overall", "## By answer type", "## By question type", "## By modality", "## By organ"):
        assert heading in report
    assert "](per_type_accuracy.png)" in report and "](confusion_closed.png)" in report
    assert "closed accuracy, LLaVA-Med v1.0.0 code" in report and "closed accuracy (strict)" in report

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "colours" and manifest["split"] == "test"
    assert manifest["item_ids"] == [r.id for r in records] and manifest["content_hash"] == content_hash(records)
    assert manifest["data_spec"] == spec and manifest["adapter"]["path"] == str(adapter)
    assert manifest["adapter"]["saved_fingerprints"] and manifest["protocol"]["name"] == "llava_med"
    assert manifest["prefixvqa_version"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["breakdown"]) == {"answer_type", "question_type", "modality", "organ"}
    assert rescore(out, "llava_med", records) == pytest.approx(first)

    table = compare([out, tmp_path / "b"])
    assert table.splitlines()[0] == "| metric | a | b |"
    line = next(row for row in table.splitlines() if row.startswith("| closed_accuracy_strict"))
    assert line == "| closed_accuracy_strict | 1.0000 | 1.0000 |"


def test_generate_mode_and_prefix_vqa(trained, tmp_path):
    from prefixvqa.eval.metrics import default_similarity_model_path, token_f1_ids

    model, _, records, root = trained
    # upstream's tokenizer and encoder (gpt2, bert-base-uncased) as local stand-ins: the tiny decoder's tokenizer,
    # the packaged MiniLM at its last (6th) layer
    protocol = P.get_protocol("prefix_vqa", upstream_metrics=True, f1_tokenizer=str(root / "decoder"),
                              bertscore_model=str(default_similarity_model_path()), bertscore_layer=6)
    metrics = evaluate(model, records, protocol, tmp_path, closed_mode="generate", max_new_tokens=4, progress=False)
    for key in ("exact_match", "bleu1", "bert_f1", "token_f1", "char_bleu1_upstream", "exact_match_upstream",
                "token_f1_upstream", "bertscore_f1_upstream"):
        assert 0.0 <= metrics[key] <= 1.0 + 1e-6, key
    rows = load_predictions(tmp_path)
    encode = model.tokenizer.encode  # the same vocabulary as the f1 tokenizer folder
    assert [r["scores"]["token_f1_upstream"] for r in rows] == pytest.approx(
        [token_f1_ids(encode(r["prediction"]), encode(r["gold"])) for r in rows], abs=1e-6)
    assert rescore(tmp_path, protocol, records)["token_f1_upstream"] == pytest.approx(metrics["token_f1_upstream"])
    sources = json.loads((tmp_path / "metrics.json").read_text())["sources"]
    assert sources["token_f1_upstream"]["settings"] == {"f1_tokenizer": str(root / "decoder")}
    assert all(r["mode"] == "generate" for r in load_predictions(tmp_path))


def test_pmc_vqa_scores_choices(trained, tmp_path):
    model, _, records, _ = trained
    choices = ["liver", "lung", "brain", "heart"]
    mc = [VQARecord(r.id, r.image, "what organ is shown?", r.answer, None, choices, r.meta)
          for r in records if r.answer_type == "open"]
    metrics = evaluate(model, mc, "pmc_vqa", tmp_path, batch_size=2, progress=False)
    rows = load_predictions(tmp_path)
    direct = model.score_choices([r.image for r in mc], [r.question for r in mc], [choices] * len(mc))
    for row, probs in zip(rows, direct):
        assert row["mode"] == "score" and row["candidates"] == choices
        assert math.isclose(sum(row["choice_probs"]), 1.0, abs_tol=1e-5)
        assert row["choice_probs"] == pytest.approx(probs, abs=1e-6)
        assert row["choice_index"] == max(range(4), key=lambda k: probs[k])
        assert row["prediction"] == choices[row["choice_index"]]
    assert metrics["mc_accuracy"] == sum(r["scores"]["mc_accuracy"] for r in rows) / len(rows)
    with pytest.raises(ValueError, match="likelihood"):
        evaluate(model, mc, "pmc_vqa", tmp_path / "x", closed_mode="generate", progress=False)


def test_llava_med_substring_vs_strict():
    gold = ["no", "no", "yes", "yes", "no"]
    preds = ["normal", "no", "yes, there is", "no", "there is no mass"]
    records = [VQARecord(str(i), None, "is it abnormal?", g, "closed") for i, g in enumerate(gold)]
    rows = [{"id": str(i), "prediction": p} for i, p in enumerate(preds)]
    metrics = P.compute_metrics("llava_med", records, rows)
    assert metrics["closed_accuracy_substring"] == pytest.approx(4 / 5)  # "normal" and "there is no mass" count
    assert metrics["closed_accuracy_llava_med"] == pytest.approx(4 / 5)  # LLaVA-Med v1.0.0's code agrees here
    assert metrics["closed_accuracy_strict"] == pytest.approx(2 / 5)
    assert "open_recall" not in metrics


def test_report_protocol_and_pmc_gold_letters():
    refs = ["no acute cardiopulmonary process", "heart size is normal", "small left pleural effusion", "clear lungs"]
    preds = ["no acute process", "heart size normal", "left effusion", "lungs are clear"]
    records = [VQARecord(str(i), None, "findings?", r, "open") for i, r in enumerate(refs)]
    protocol = P.get_protocol("report", n_resamples=50)
    metrics = P.compute_metrics(protocol, records, [{"prediction": p} for p in preds])
    for key in ("bleu1", "bleu4", "rouge_l"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert metrics == P.compute_metrics(protocol, records, [{"prediction": p} for p in preds])
    letter = VQARecord("x", None, "q", "B", None, ["A: cat", "B: dog", "C: cow", "D: pig"])
    assert P.gold_choice_index(letter) == 1
    assert P.gold_choice_index(VQARecord("y", None, "q", "cow", None, ["A: cat", "B: dog", "C: cow"])) == 2
    assert sorted(P.list_protocols()) == ["llava_med", "lmms_eval_slake", "med_flamingo", "medevalkit_pathvqa",
                                          "medevalkit_pmc_vqa", "medevalkit_slake", "medevalkit_vqa_rad", "pmc_vqa",
                                          "prefix_vqa", "report"]


def test_evaluate_leaves_the_callers_rng_alone(trained, tmp_path):
    model, _, records, _ = trained
    torch.manual_seed(123)
    before = torch.get_rng_state()
    evaluate(model, records, "prefix_vqa", tmp_path / "a", closed_mode="generate", max_new_tokens=4, do_sample=True,
             progress=False, plots=False)
    assert torch.equal(torch.get_rng_state(), before)  # evaluate seeds its own block, not the caller's generator
    torch.manual_seed(456)  # and the caller's state does not leak in: sampling reproduces from `seed` alone
    evaluate(model, records, "prefix_vqa", tmp_path / "b", closed_mode="generate", max_new_tokens=4, do_sample=True,
             progress=False, plots=False)
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()


def test_report_protocol_writes_the_bleu_signature(trained, tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    model, _, records, _ = trained
    protocol = P.get_protocol("report", n_resamples=20)
    for name in ("a", "b"):
        metrics = evaluate(model, records, protocol, tmp_path / name, max_new_tokens=4, progress=False, plots=False)
    signature = json.loads((tmp_path / "a" / "metrics.json").read_text())["overall"]["bleu_signature"]
    assert signature == metrics["bleu_signature"]
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:none|smooth:none|")
    assert f"version:{sacrebleu.__version__}" in signature and signature.endswith("|pretok:prefixvqa.word_tokens")
    assert f"`{signature}`" in (tmp_path / "a" / "report.md").read_text()
    # a string among the numbers stays out of the numeric tables
    table = compare([tmp_path / "a", tmp_path / "b"])
    assert "bleu_signature" not in table and "| bleu4 |" in table
    assert "| `bleu_signature`" not in (tmp_path / "a" / "report.md").read_text()


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from prefixvqa.eval.plots import result_plots as _plots
    from prefixvqa.sweep import plot_learning_curve
    from prefixvqa.train.trainer import plot_history

    original = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        predictions = [{"gold": "yes", "prediction": "no", "answer_type": "closed", "confidence": 0.7},
                       {"gold": "lung", "prediction": "lung", "answer_type": "open", "confidence": 0.9}]
        rows = [{"exact_match": 0.0}, {"exact_match": 1.0}]
        breakdown = {"answer_type": {"closed": {"n": 1, "exact_match": 0.0}, "open": {"n": 1, "exact_match": 1.0}}}
        written = _plots(tmp_path, P.get_protocol("prefix_vqa"), predictions, rows, breakdown)
        summary = [{"n_train": n, "mean": 0.5, "min": 0.4, "max": 0.6, "std": 0.1} for n in (4, 16)]
        plot_learning_curve(summary, "exact_match", tmp_path / "curve.png")
        plot_history([{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "eval", "step": 1, "value": 0.5}],
                     tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(original)
    assert written == ["per_type_accuracy.png", "confusion_closed.png", "confidence_hist.png"]
    for name in (*written, "curve.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written, "curve.png", "loss.png"])  # no temp files


@pytest.mark.parametrize("question, candidates", [
    ("Is this an axial, sagittal, or coronal image?", ["axial", "sagittal", "coronal"]),
    ("Is the lesion on the left, right, or both?", ["left", "right", "both"]),
    ("Is the abnormality focal or diffuse?", ["focal", "diffuse"]),
    ("Is this an MRI or a CT scan?", ["MRI", "CT"]),
    ("Is this a pneumonia vs. pleural effusion?", None),  # phrase options of unknown extent: generated
    ("Is the mass hyper dense or hypo dense?", None),
    ("Is the lesion on the left or right of the midline?", ["left", "right"]),
    ("Is there a fracture?", ["yes", "no"]),
    ("Any evidence of epidural or subdural hematoma?", ["yes", "no"]),  # existential: yes/no, not options
    ("Are there epidural or subdural bleeds as well?", ["yes", "no"]),
    ("Does the liver look normal?", ["yes", "no"]),
    ("Which side is the lesion on?", None),  # neither: generated
    ("In which lobe are the lesions?", None),
])
def test_closed_candidates_follow_the_question_never_the_gold(question, candidates):
    for gold in ("yes", "axial", "bilateral frontal lobes"):
        assert P.candidates_for(VQARecord("q", None, question, gold, "closed")) == candidates
    assert P.candidates_for(VQARecord("q", None, question, "x", "closed", ["a", "b"])) == ["a", "b"]
    assert P.candidates_for(VQARecord("q", None, question, "x", "closed"), "yes_no") == ["yes", "no"]


def test_real_vqa_rad_closed_questions_can_be_answered_right():
    """On the released VQA-RAD file, a scored closed question almost always has its gold among its candidates; every
    one of the 105 closed questions whose answer is not yes/no used to get ["yes", "no"] and could never be right."""
    data = json.loads((REALDATA / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    closed = [VQARecord(str(r["qid"]), None, r["question"], str(r["answer"]), "closed") for r in data
              if r["answer_type"] == "CLOSED"]
    scored = [r for r in closed if P.candidates_for(r) is not None]
    reachable = [r for r in scored if normalize_answer(r.answer) in map(normalize_answer, P.candidates_for(r))]
    not_yes_no = [r for r in closed if normalize_answer(r.answer) not in ("yes", "no")]
    assert len(closed) == 1297 and len(not_yes_no) == 105
    assert len(reachable) / len(scored) > 0.98 and len(scored) / len(closed) > 0.9
    assert sum(P.candidates_for(r) == ["yes", "no"] for r in not_yes_no) <= 5


@pytest.mark.parametrize("name, mode", [("llava_med", "generate"), ("prefix_vqa", "generate"),
                                        ("med_flamingo", "generate"), ("pmc_vqa", "score")])
def test_protocols_answer_as_their_source_did(name, mode):
    protocol = P.get_protocol(name)
    assert protocol.closed_mode == mode
    assert ("generation" in protocol.description) == (mode == "generate")


def test_closed_mode_values_are_spelled_once():
    from prefixvqa.eval.errors import EvaluationError
    from prefixvqa.eval.protocols import CLOSED_MODES, ClosedMode, plan_items
    from prefixvqa.eval.runner import plan_items as runner_plan_items
    from typing import get_args

    assert CLOSED_MODES == get_args(ClosedMode) == ("score", "generate")
    assert runner_plan_items is plan_items
    records = [VQARecord("c", None, "is there a lesion?", "yes", "closed"), VQARecord("o", None, "what?", "x", "open")]
    assert plan_items(records, P.get_protocol("llava_med"), "score") == [["yes", "no"], None]
    assert plan_items(records, P.get_protocol("llava_med")) == [None, None]
    with pytest.raises(EvaluationError, match="closed_mode must be one of 'score', 'generate'"):
        plan_items(records, P.get_protocol("llava_med"), "rank")
    with pytest.raises(EvaluationError, match="closed_mode"):
        P.get_protocol("llava_med", closed_mode="rank")
    with pytest.raises(KeyError, match="unknown protocol"):
        P.get_protocol("nope")
