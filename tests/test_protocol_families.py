"""MedEvalKit and lmms-eval protocols (values worked out by hand from their code's rules), and one answer set scored
under every protocol (`--protocol all`, rescoring a saved predictions.jsonl under several protocols)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prefixvqa.data.records import VQARecord
from prefixvqa.eval import lmms_eval as LE
from prefixvqa.eval import medevalkit as MK
from prefixvqa.eval import protocols as P
from prefixvqa.eval.hooks import JUDGES, register_judge


def rec(question, answer, answer_type=None, choices=None, **meta):
    """A record without an image (scoring never reads it)."""
    return VQARecord(meta.pop("id", question), None, question, answer, answer_type, choices, meta)


def preds(*texts):
    return [{"prediction": t} for t in texts]


# ------------------------------------------------------------------------------------------------ MedEvalKit prompts
def test_medevalkit_prompts_are_its_text_exactly():
    assert MK.prompt_for("vqa_rad", rec("Is there a mass?", "Yes")) == \
        "Is there a mass?\nPlease output 'yes' or 'no'(no extra output)."  # VQA-RAD lower-cases the gold first
    assert MK.prompt_for("vqa_rad", rec("Where is it?", "Left lung")) == \
        "Where is it?\nPlease answer the question concisely."
    # PathVQA compares the gold as stored: "Yes" is not in ["yes", "no"]
    assert MK.prompt_for("pathvqa", rec("Is it?", "Yes")) == "Is it?\nPlease answer the question concisely."
    assert MK.prompt_for("pathvqa", rec("Is it?", "no")).endswith("\nPlease output 'yes' or 'no'(no extra output).")
    assert MK.prompt_for("slake", rec("Which organ?", "Liver", "open", q_lang="en")) == \
        "Which organ?\nPlease answer the question concisely."
    assert MK.prompt_for("slake", rec("Is it a CT?", "Yes", "closed", q_lang="en")) == \
        "Is it a CT?\nAnswer the question using a single word or phrase."
    assert MK.prompt_for("slake", rec("这是什么?", "肝", "closed", q_lang="zh")) == "这是什么?\n请用一个单词或者短语回答该问题。"
    assert MK.prompt_for("slake", rec("这是什么?", "肝", "open", q_lang="zh")) == "这是什么?\n请简要回答该问题。"
    pmc = rec("What imaging?", "MRI", "closed", ["CT", "MRI", "X-ray", "PET"], answer_label="B")
    assert MK.prompt_for("pmc_vqa", pmc) == ("\nQuestion: What imaging?\nOptions: \nA:CT\nB:MRI\nC:X-ray\nD:PET\n"
                                              "Answer with the option's letter from the given choices directly.")
    # the options are in the text, so the template does not list them again
    from prefixvqa.eval.hooks import prompted

    asked = prompted([pmc], "medevalkit_pmc_vqa")[0]
    assert asked.choices is None and asked.question.startswith("\nQuestion: What imaging?")


# ----------------------------------------------------------------------------------- MedEvalKit parsing and judging
def test_medevalkit_answer_extraction():
    assert MK.extract_boxed("so \\boxed{x{y}} and \\boxed{Left}.") == "Left"
    assert MK.extract_boxed("a \\boxed{x{y}} b") == "x{y}" and MK.extract_boxed("no box") == "None"
    assert MK.pre_extract("\\boxed{ Left }") == "Left" and MK.pre_extract("<answer>Lung</answer> ok") == "Lung"
    assert MK.parse_response("<answer>Lung</answer>") == "lung"
    assert MK.parse_response("The answer is: Left.") == ": left."  # "answer is" first, then "answer:" is gone
    assert MK.parse_response("Final answer: no") == " no"


@pytest.mark.parametrize("gold, response, correct", [
    ("yes", "Yes", True),
    ("no", "None", True),  # "none" holds "no" and not "yes"
    ("no", "There is nothing.", True),  # "nothing" holds "no"
    ("no", "Absent.", False),
    ("yes", "Yes, there is no lesion.", False),  # holds both
    ("no", "The answer is no.", True),
    ("no", "Not seen", True),  # "not" holds "no"
    ("yes", "yes\nyes", True),
])
def test_medevalkit_yes_no_rule(gold, response, correct):
    assert MK.judge_judgement(gold, response) is correct


def test_medevalkit_other_closed_rule():
    assert MK.judge_close_end("Left Lung", "left lung.")
    assert not MK.judge_close_end("left lung", "left lungs") and not MK.judge_close_end("left", " left")


def test_medevalkit_open_scores_by_hand():
    out = MK.judge_open_end("Left lung", "The left lung")
    # tokens: ["the", "left", "lung"] vs ["left", "lung"]; no brevity penalty (3 > 2)
    assert out["em"] == 0.0
    assert out["bleu1"] == pytest.approx(2 / 3)
    assert out["bleu2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5)
    assert 0 < out["bleu3"] < 1e-100 and 0 < out["bleu4"] < 1e-70  # nltk's unsmoothed zero count: float min, not 0
    assert out["rouge1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1 + 1e-8), abs=1e-15)
    assert out["rouge2"] == pytest.approx(2 * (1 / 2) / (1 / 2 + 1 + 1e-8), abs=1e-15)
    assert out["rougel"] == out["rouge1"]
    assert (out["token_precision"], out["token_recall"], out["token_f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert MK.judge_open_end("liver", "Liver")["em"] == 1.0
    assert MK.rouge("", "liver") == {"rouge1": 0.0, "rouge2": 0.0, "rougel": 0.0}  # upstream raises here


def test_medevalkit_rouge_equals_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    scorer = rouge.Rouge()
    for hyp, ref in [("a b. c", "a c"), ("b a", "a b"), ("x y z x. y", "x z. z y"), ("the left. lung", "left lung"),
                     ("right frontal lobe", "frontal lobe right")]:
        upstream = scorer.get_scores(hyp, ref)[0]
        mine = MK.rouge(hyp, ref)
        assert [mine["rouge1"], mine["rouge2"], mine["rougel"]] == \
            [upstream["rouge-1"]["f"], upstream["rouge-2"]["f"], upstream["rouge-l"]["f"]]


@pytest.mark.parametrize("response, correct", [
    ("B", True), ("b.", True), ("MRI", True), ("B: MRI", True), ("The answer is C", False), ("(B)", True),
    ("C\n\nbecause", False), ("I think\n\nB. MRI", True),
])
def test_medevalkit_multiple_choice(response, correct):
    assert MK.judge_multi_choice(["A:CT", "B:MRI", "C:X-ray", "D:PET"], "B", response) is correct


# ----------------------------------------------------------------------------------------- MedEvalKit aggregation
def vqa_rad_items():
    records = [rec("Is there a mass?", "yes", "closed", dataset="vqa_rad"),
               rec("Is it normal?", "no", "closed", dataset="vqa_rad"),
               rec("Where?", "left lung", "open", dataset="vqa_rad"),
               rec("Which organ?", "Liver", "open", dataset="vqa_rad")]
    return records, preds("Yes", "none", "The left lung", "liver")


def test_medevalkit_vqa_rad_averages_as_cal_metrics():
    records, predictions = vqa_rad_items()
    m = P.compute_metrics("medevalkit_vqa_rad", records, predictions)
    assert m["mek_accuracy"] == 3 / 4 and m["mek_closed_accuracy"] == 1.0  # "none" counts for "no" upstream
    assert m["mek_open_accuracy"] == 1 / 2 and m["n_mek_open_accuracy"] == 2
    assert m["mek_open_acc_printed"] == 1 / 2 / 2  # its file divides the open acc by the open count again
    assert m["mek_open_token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert m["mek_open_bleu1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert "mek_judge_correct" not in m and "judge" not in m


@pytest.fixture
def fake_judge():
    asked = []

    def judge(messages):
        asked.extend(messages)
        return ["<think>same</think>\n<judge>0</judge>" if "left" in m[0]["content"].split("user's answer:")[1]
                else "<judge>1</judge>" for m in messages]

    register_judge("fake", judge, overwrite=True)
    yield asked
    JUDGES.pop("fake", None)


def test_medevalkit_judge_is_off_by_default_and_named_when_used(fake_judge):
    records, predictions = vqa_rad_items()
    assert P.get_protocol("medevalkit_vqa_rad").judge is None
    m = P.compute_metrics(P.get_protocol("medevalkit_vqa_rad", judge="fake"), records, predictions)
    # VQA-RAD: open items take the verdict (left lung -> 0 = correct, liver -> 1); closed keep the rule
    assert m["judge"] == "fake" and m["mek_open_accuracy"] == 1 / 2 and m["mek_accuracy"] == 3 / 4
    assert len(fake_judge) == 2  # only the open items are judged
    content = fake_judge[0][0]["content"]
    assert content.startswith("\nYour task is to determine whether the user's answer is correct")
    assert "The question is: Where?\n\nThe standard answer: left lung\n\nThe user's answer: the left lung\n" in content
    assert "<think>{your concise think step}</think>\n<judge>{0/1}</judge>" in content
    assert content.endswith("<judge>0</judge>\n    ")
    with pytest.raises(P.EvaluationError, match="no LLM judge"):
        P.get_protocol("medevalkit_pmc_vqa", judge="fake")
    with pytest.raises(P.EvaluationError, match="unknown judge 'nope'"):
        P.compute_metrics(P.get_protocol("medevalkit_vqa_rad", judge="nope"), records, predictions)


def test_medevalkit_judge_counts_as_each_dataset_file_does(fake_judge):
    path = [rec("Is it?", "yes", "closed", dataset="pathvqa"), rec("Where?", "left", "open", dataset="pathvqa")]
    m = P.compute_metrics(P.get_protocol("medevalkit_pathvqa", judge="fake"), path, preds("yes", "left"))
    assert m["mek_closed_accuracy"] == 0.0 and m["mek_accuracy"] == 1 / 2  # PathVQA resets closed counts to 0
    slake = [rec("Is it?", "left", "closed", dataset="slake"), rec("Where?", "left", "open", dataset="slake")]
    m = P.compute_metrics(P.get_protocol("medevalkit_slake", judge="fake"), slake, preds("left", "left"))
    # SLAKE judges every item and adds the verdict to a closed item's rule count: right = 1 + 1 + 1 over 2 items
    assert m["mek_closed_accuracy"] == 2.0 and m["mek_accuracy"] == 3 / 2 and m["mek_judge_correct"] == 1.0


def test_medevalkit_slake_keeps_case_and_pmc_vqa_letters():
    slake = [rec("Is it?", "Yes", "closed", dataset="slake"), rec("Organ?", "liver", "open", dataset="slake")]
    m = P.compute_metrics("medevalkit_slake", slake, preds("yes", "Liver "))
    # "Yes" is not in ["yes", "no"]: exact rule, which lower-cases both; open em compares unstripped text
    assert m["mek_closed_accuracy"] == 1.0 and m["mek_open_em"] == 0.0
    pmc = [rec("Q1", "MRI", "closed", ["CT", "MRI"], answer_label="B", dataset="pmc_vqa"),
           rec("Q2", "CT", "closed", ["CT", "MRI"], dataset="pmc_vqa")]  # gold letter from the choices
    assert P.compute_metrics("medevalkit_pmc_vqa", pmc, preds("B", "B"))["mek_accuracy"] == 1 / 2


# --------------------------------------------------------------------------------------------------- lmms-eval
@pytest.mark.parametrize("text, normalised", [
    ("Yes.", "yes"), ("X-Ray", "xray"), ("x ray", "xray"), ("Left (lung)", "left"), ("是的", "yes"),
    ("  Heart  ", "heart"), ("异常", "no"), ("True", "yes"), ("right  lung!", "right lung"), ("肝脏（左）", "肝脏"),
    ("T2-weighted", "t2 weighted"),
])
def test_lmms_eval_normalisation(text, normalised):
    assert LE.normalize_answer(text) == normalised


def test_lmms_eval_slake_prompt_and_breakdowns():
    assert LE.prompt_for(rec(" What is this? ", "x", q_lang="en")) == \
        "What is this?\nAnswer the question using a single word or phrase."
    assert LE.prompt_for(rec("这是什么?", "x", q_lang="zh")) == "这是什么?\n请用一个词或短语回答问题。"
    records = [rec("a", "Yes", "closed", modality="CT", content_type="Abnormality", dataset="slake"),
               rec("b", "Liver", "open", modality="MRI", content_type="Organ", dataset="slake"),
               rec("c", "X-Ray", "open", modality="X-Ray", content_type="Modality", dataset="slake"),
               rec("d", "No", "closed", modality="CT", content_type="Abnormality", dataset="slake")]
    m = P.compute_metrics("lmms_eval_slake", records, preds("yes.", "the liver", "xray", "nope"))
    assert m["lmms_slake_accuracy"] == 3 / 4 and m["lmms_slake_closed_accuracy"] == 1.0
    assert m["lmms_slake_open_accuracy"] == 1 / 2 and m["lmms_slake_ct_accuracy"] == 1.0
    assert m["lmms_slake_mri_accuracy"] == 0.0 and m["lmms_slake_xray_accuracy"] == 1.0
    assert m["lmms_slake_abnormality_accuracy"] == 1.0 and m["lmms_slake_organ_accuracy"] == 0.0
    assert "lmms_slake_size_accuracy" not in m  # upstream prints 0.0 for a group without items


@pytest.mark.parametrize("name", ["medevalkit_vqa_rad", "medevalkit_slake", "medevalkit_pathvqa",
                                  "medevalkit_pmc_vqa", "lmms_eval_slake"])
def test_family_protocols_name_their_source_commit(name):
    protocol = P.get_protocol(name)
    commit = MK.COMMIT if name.startswith("medevalkit") else LE.COMMIT
    assert len(commit) == 40 and f"@ {commit}" in protocol.source and protocol.prompt and protocol.scorer
    assert protocol.closed_mode == "generate" and protocol.datasets


# ------------------------------------------------------------------------------------ one answer set, every protocol
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random adapter (answers are arbitrary; only how they are shared and scored matters) and VQA-RAD-like
    records with images."""
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from PIL import Image

    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import build_decoder, tiny_overrides

    root = tmp_path_factory.mktemp("families")
    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(build_decoder(root / "decoder", "gpt2"))))
    model.save_pretrained(root / "adapter")
    rows = []
    for i, (question, answer, kind) in enumerate([("Is there a mass?", "yes", "closed"), ("Is it normal?", "no",
                                                  "closed"), ("Where is the lesion?", "left lung", "open")]):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / f"im{i}.png")
        rows.append({"id": f"q{i}", "image": f"im{i}.png", "question": question, "answer": answer,
                     "answer_type": kind})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"format": "generic", "path": str(root / "data.jsonl"), "dataset": "vqa_rad"}
    from prefixvqa.data import load_records

    return model.eval(), root, spec, list(load_records(spec))


@pytest.mark.slow
def test_protocol_all_answers_once_per_prompt_and_writes_one_table(tiny, tmp_path):
    from prefixvqa.eval.multi import evaluate_protocols, rescore_protocols
    from prefixvqa.eval.reports import load_predictions, round_floats

    from prefixvqa.eval.metrics import default_similarity_model_path

    model, root, _, records = tiny
    out = tmp_path / "cmp"
    local = {"f1_tokenizer": str(root / "decoder"), "bertscore_model": str(default_similarity_model_path()),
             "bertscore_layer": 6}  # offline stand-ins for GPT-2's tokenizer and bert-base-uncased
    result = evaluate_protocols(model, records, "all", out, max_new_tokens=3, progress=False, plots=False,
                                upstream_metrics=True, protocol_options=local)
    sets = {s["prompt"]: s["protocols"] for s in result["answer_sets"]}
    assert sets == {None: ["llava_med", "med_flamingo", "prefix_vqa", "report"],
                    "medevalkit_vqa_rad": ["medevalkit_vqa_rad"]}
    assert {"pmc_vqa", "medevalkit_slake", "lmms_eval_slake", "medevalkit_pmc_vqa"} <= set(result["skipped"])
    first = load_predictions(out / "llava_med")
    for name in ("med_flamingo", "prefix_vqa", "report"):  # the same answers, not generated again
        rows = load_predictions(out / name)
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in first]
        assert json.loads((out / name / "manifest.json").read_text())["answers_from"] == "llava_med"
    assert json.loads((out / "prefix_vqa" / "metrics.json").read_text())["sources"]["token_f1_upstream"][
        "settings"] == {"f1_tokenizer": str(root / "decoder")}  # the options reached every protocol
    mek = load_predictions(out / "medevalkit_vqa_rad")
    assert mek[0]["asked"] == "Is there a mass?\nPlease output 'yes' or 'no'(no extra output)."
    assert "asked" not in first[0]
    saved = json.loads((out / "comparison.json").read_text())
    for name, entry in saved["protocols"].items():
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert entry["metrics"] == metrics["overall"] and entry["source"] == P.get_protocol(name).source
    assert json.loads((out / "medevalkit_vqa_rad" / "metrics.json").read_text())["source"].startswith(
        "alibaba-damo-academy/MedEvalKit @ 9b12e3b")
    table = (out / "comparison.md").read_text()
    assert "| 1 | medevalkit_vqa_rad | 0 | medevalkit_vqa_rad |" in table and "`mek_accuracy`" in table
    assert "Lingshu, Hulu-Med, MedMO tables (MedEvalKit)" in table and "Left out" in table

    # rescoring one saved answer set under several protocols equals scoring each separately
    names = ["llava_med", "prefix_vqa", "medevalkit_vqa_rad", "report"]
    rescored = rescore_protocols(out / "prefix_vqa", names, upstream_metrics=True, **local)
    for name in names:
        alone = P.compute_metrics(P.get_protocol(name, upstream_metrics=True, **local), records, first)
        assert rescored["protocols"][name]["metrics"] == alone
    for name in ("llava_med", "prefix_vqa", "report"):
        assert round_floats(rescored["protocols"][name]["metrics"]) == saved["protocols"][name]["metrics"]
    assert rescored["protocols"]["medevalkit_vqa_rad"]["prompt_matches"] is False  # answered with another prompt
    assert "**other prompt**" in rescored["markdown"]

    # rerunning into the comparison folder is allowed; a folder of the user's is refused before answering
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not a protocol comparison folder"):
        evaluate_protocols(model, records, ["llava_med"], tmp_path / "mine", progress=False, plots=False)


@pytest.mark.slow
def test_cli_protocol_list_and_rescore(tiny, tmp_path, capsys):
    from prefixvqa.cli import main

    _, root, spec, _ = tiny
    out = tmp_path / "cli"
    assert main(["eval", "--adapter", str(root / "adapter"), "--data", json.dumps(spec), "--out", str(out),
                 "--protocol", "llava_med,medevalkit_vqa_rad"]) == 0
    printed = capsys.readouterr().out
    assert "# Protocol comparison" in printed and (out / "comparison.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["llava_med", "medevalkit_vqa_rad"]
    assert main(["eval", "--rescore", str(out / "llava_med"), str(tmp_path / "re"), "--protocol", "all"]) == 0
    assert "`medevalkit_vqa_rad`" in capsys.readouterr().out and (tmp_path / "re" / "comparison.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--rescore", str(out / "llava_med"), "--protocol", "llava_med,nope"])
    assert exit_info.value.code == 2 and "unknown protocol 'nope'" in capsys.readouterr().err
