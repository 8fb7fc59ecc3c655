"""The published dataset files themselves (../shared/realdata, see its SOURCES.md): every reader on the released
layout gives the published counts, bad items are skipped by name and reported by the run, LLaVA conversations train
as one sequence with every answer supervised, and answer / score_choices / eval run on the real VQA-RAD images."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from prefixvqa import MedVQAAdapter
from prefixvqa.data import DataError, Records, load_records
from prefixvqa.data.processor import IGNORE
from test_core import make_config

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
SLAKE = REAL / "slake" / "Slake1.0"
VQA_RAD = REAL / "vqa_rad"
DATA_RAD = REAL / "vqa_rad_mevf" / "data_RAD"
RETINA = REAL / "llava_med_retina" / "ddr_instruct_1K.json"
LLAVA_MED_EVAL = REAL / "llava_med" / "data" / "eval" / "llava_med_eval_qa50_qa.jsonl"
IU_XRAY = REAL / "iu_xray"
NO_IMAGES = {"check_images": False}  # these releases come without their image folders


# ------------------------------------------------------------------------------------------------ published counts
COUNTS = [
    ({"format": "slake", "path": SLAKE, "split": "train"}, 4918, 1),  # 4,919 English items less the empty answer
    ({"format": "slake", "path": SLAKE, "split": "train", "q_lang": "both"}, 9834, 1),
    ({"format": "slake", "path": SLAKE, "split": "validate"}, 1053, 0),
    ({"format": "slake", "path": SLAKE, "split": "validate", "q_lang": "zh"}, 1046, 0),
    ({"format": "vqa_rad", "path": VQA_RAD}, 2248, 0),
    ({"format": "vqa_rad", "path": VQA_RAD, "split": "train"}, 1797, 0),
    ({"format": "vqa_rad", "path": VQA_RAD, "split": "test"}, 451, 0),
    ({"format": "vqa_rad", "path": DATA_RAD}, 2248, 0),
    ({"format": "vqa_rad", "path": DATA_RAD, "split": "train"}, 1797, 0),
    ({"format": "vqa_rad", "path": DATA_RAD, "split": "test"}, 451, 0),
    ({"format": "vqa_rad", "path": DATA_RAD / "testset.json"}, 451, 0),
    ({"format": "vqa_rad", "path": DATA_RAD, "split": "train", "frame_questions": True}, 3064, 0),  # as MEVF trains
    ({"format": "llava", "path": RETINA}, 1000, 0),
    ({"format": "llava", "path": RETINA, "per_turn": True}, 1642, 0),
    ({"format": "llava", "path": REAL / "iu_xray_llava" / "test_report.json"}, 1251, 0),  # JSON Lines named .json
    ({"format": "llava_med_eval", "path": LLAVA_MED_EVAL}, 193, 0),
]


@pytest.mark.parametrize(("spec", "n", "skipped"), COUNTS,
                         ids=[f"{s['format']}-{Path(s['path']).name}-{s.get('split')}-{i}" for i, (s, _, _) in
                              enumerate(COUNTS)])
def test_published_counts(spec, n, skipped):
    records = load_records({**spec, **NO_IMAGES})
    assert isinstance(records, Records) and len(records) == n and len(records.skipped) == skipped
    assert all(r.question and r.answer and "<image>" not in r.question for r in records)


def test_slake_empty_answer_is_skipped_by_name_logged_and_stops_on_request(caplog):
    with caplog.at_level("WARNING"):
        records = load_records({"format": "slake", "path": SLAKE, "split": "train", **NO_IMAGES})
    (item,) = records.skipped
    assert item.where.endswith("train.json item 1622") and item.id == "1622" and "'answer' is empty" in item.reason
    assert "train.json item 1622 (id 1622)" in caplog.text
    with pytest.raises(DataError, match=r"train\.json item 1622: field 'answer' is empty.*on_bad_record='stop'"):
        load_records({"format": "slake", "path": SLAKE, "split": "train", "on_bad_record": "stop", **NO_IMAGES})


def test_vqa_rad_both_layouts_hold_the_same_test_set_and_splits_come_from_file_names():
    osf = load_records({"format": "vqa_rad", "path": VQA_RAD, "split": "test", **NO_IMAGES})
    mevf = load_records({"format": "vqa_rad", "path": DATA_RAD, "split": "test", **NO_IMAGES})
    assert {(r.meta["image_name"], r.question) for r in osf} == {(r.meta["image_name"], r.question) for r in mevf}
    assert {r.meta["split"] for r in mevf} == {"test"} and {r.meta["phrase_type"] for r in mevf} == {"freeform", "para"}
    assert all(r.image.endswith(os.path.join("data_RAD", "images", r.meta["image_name"])) for r in mevf)
    with pytest.raises(DataError, match=r"testset\.json: this file holds the 'test' split \(from its name\)"):
        load_records({"format": "vqa_rad", "path": DATA_RAD / "testset.json", "split": "train", **NO_IMAGES})
    with pytest.raises(DataError, match="has splits train .* and test .* not 'validation'"):
        load_records({"format": "vqa_rad", "path": DATA_RAD, "split": "validation", **NO_IMAGES})
    train_only = [row for row in json.loads((VQA_RAD / "VQA_RAD Dataset Public.json").read_text())
                  if not row["phrase_type"].startswith("test")]
    with pytest.raises(DataError, match="no records for split 'test'"):  # an empty split is an error, not silence
        load_records({"format": "vqa_rad", "path": train_only, "split": "test", **NO_IMAGES})


# ------------------------------------------------------------------------------------------- conversations, JSONL
def test_llava_conversations_are_one_record_each_with_the_image_where_the_token_stood():
    records = load_records({"format": "llava", "path": RETINA, **NO_IMAGES})
    raw = json.loads(RETINA.read_text())
    assert [len(r.turns) for r in records] == [len(item["conversations"]) // 2 for item in raw]
    follow_ups = sum(len(r.history) for r in records)
    assert follow_ups == 642 and round(follow_ups / sum(len(r.turns) for r in records), 2) == 0.39
    positions = [r.image_position for r in records]
    assert positions.count("before_question") == 485 and positions.count("after_question") == 515
    for record, item in zip(records, raw):
        first = item["conversations"][0]["value"]
        assert (record.image_position == "before_question") == first.startswith("<image>")
        assert all("<image>" not in turn.question for turn in record.turns)
        assert record.answer == item["conversations"][-1]["value"].strip()


def test_json_lines_in_a_json_file_is_detected(tmp_path):
    records = load_records({"format": "llava", "path": REAL / "iu_xray_llava" / "test_report.json", **NO_IMAGES})
    assert records[0].id == "00000" and records[0].answer.startswith("Findings:")
    broken = tmp_path / "broken.json"
    lines = (REAL / "iu_xray_llava" / "test_report.json").read_text().splitlines()[:3]
    broken.write_text("\n".join([lines[0], lines[1][:50], lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"broken\.json line 2: invalid JSON.*read as JSON Lines"):
        load_records({"format": "llava", "path": broken, **NO_IMAGES})


def test_llava_med_eval_file():
    records = load_records({"format": "llava_med_eval", "path": LLAVA_MED_EVAL, **NO_IMAGES})
    raw = [json.loads(line) for line in LLAVA_MED_EVAL.read_text().splitlines()]
    assert not any("<image>" in r.question for r in records)
    assert [r.id for r in records] == [str(item["question_id"]) for item in raw]
    assert [r.answer for r in records] == [item["gpt4_answer"].strip() for item in raw]
    assert {r.image_position for r in records} == {"after_question"}  # "...?\n<image>" in every question
    assert sum(r.meta["question_type"] == "detailed_description" for r in records) == 50
    assert records[0].meta["modality"] == ["gross", "histology"] and records[0].meta["image_name"] == raw[0]["image"]


# ---------------------------------------------------------------------------------------------------------- IU X-ray
@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_iu_xray_kaggle_layout_joins_projections_by_uid(view):
    records = load_records({"format": "iu_xray", "path": IU_XRAY, "view": view, **NO_IMAGES})
    with (IU_XRAY / "indiana_projections.csv").open() as fh:
        files: dict[str, list[str]] = {}
        for row in csv.DictReader(fh):
            if row["projection"].lower() == view:
                files.setdefault(row["uid"], []).append(row["filename"])
    with (IU_XRAY / "indiana_reports.csv").open() as fh:
        reports = [row for row in csv.DictReader(fh) if row["findings"].strip() and row["uid"] in files]
    assert [r.id for r in records] == [row["uid"] for row in reports]
    for record, row in zip(records, reports):
        assert Path(record.image).name == files[row["uid"]][0] and record.answer == row["findings"].strip()
        assert record.meta["exam"] == row["image"] and record.meta["view"] == view
    assert Path(records[0].image).parent == IU_XRAY / "images" / "images_normalized"


def test_iu_xray_missing_images_point_to_the_projections_file_and_image_root(tmp_path):
    with pytest.raises(DataError, match=r"not found: item 0: .*1_IM-0001-4001\.dcm\.png.*indiana_projections\.csv "
                                        r"\(column 'filename'\), resolved against image_root=.*images_normalized"):
        load_records({"format": "iu_xray", "path": IU_XRAY})
    with pytest.raises(DataError, match=r"'image' column describes the exam \('Xray Chest PA and Lateral'\).*"
                                        r"format 'iu_xray'.*indiana_projections\.csv"):
        load_records({"format": "report", "path": IU_XRAY / "indiana_reports.csv"})


# -------------------------------------------------------------------------------------------- the processor, models
@pytest.fixture(scope="module")
def llava_model(tiny_decoders):
    return MedVQAAdapter(make_config(tiny_decoders["llama"], "linear",
                                     template={"name": "llava_med_v1", "max_length": 2048}))


def _spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    return spans


def _closed(proc, answer: str) -> str:
    """An answer as its template closes a turn: LLaVA-Med's "\\n###" (no EOS), Vicuna's EOS."""
    from prefixvqa import prompts

    name = proc.template.name
    return prompts.answer_text(name, answer) + (proc.tokenizer.eos_token if prompts.ends_with_eos(name) else "")


@pytest.mark.parametrize("template", ["llava_med_v1", "vicuna_v1"])
def test_conversation_label_mask_supervises_every_answer_and_nothing_else(tiny_decoders, template):
    model = MedVQAAdapter(make_config(tiny_decoders["llama"], "linear", template={"name": template,
                                                                                  "max_length": 2048}))
    proc, tok = model.processor, model.tokenizer
    records = [r for r in load_records({"format": "llava", "path": RETINA, **NO_IMAGES}) if len(r.turns) >= 3][:4]
    batch = proc.pad([proc.tokenize_record(r, r.answer) for r in records])
    L = proc.image_seq_length
    for row, record in enumerate(records):
        labels, ids = batch["labels"][row].tolist(), batch["input_ids"][row].tolist()
        spans = _spans(labels)
        assert len(spans) == len(record.turns)  # one supervised span per assistant turn, holding exactly its answer
        assert [tok.decode(span).strip() for span in spans] == [_closed(proc, t.answer).strip() for t in record.turns]
        assert all(labels[i] == ids[i] for i, label in enumerate(labels) if label != IGNORE)
        unsupervised = batch["attention_mask"][row].bool() & ~batch["image_mask"][row]
        unsupervised &= batch["labels"][row] == IGNORE
        prompt = tok.decode(batch["input_ids"][row][unsupervised].tolist())
        assert all(turn.question in prompt for turn in record.turns)  # questions are read, never trained
        image = batch["image_mask"][row].nonzero().flatten().tolist()
        assert len(image) == L and image == list(range(image[0], image[0] + L))  # one image, in the first turn
        before = tok.decode(ids[:image[0]])
        assert (record.turns[0].question in before) == (record.image_position == "after_question")
        assert record.turns[1].question not in before


def test_long_conversation_drops_middle_exchanges_never_an_answer(llava_model, caplog):
    from prefixvqa.data.processor import MedVQAProcessor

    record = max(load_records({"format": "llava", "path": RETINA, **NO_IMAGES}), key=lambda r: len(r.turns))
    full = llava_model.processor.tokenize_record(record, record.answer)
    size = sum(map(len, full.pieces)) + len(full.answer)
    proc = MedVQAProcessor(llava_model.tokenizer, dataclasses.replace(llava_model.config.template,
                                                                      max_length=size * 2 // 3),
                           llava_model.processor.transform, llava_model.processor.image_seq_length)
    with caplog.at_level("WARNING"):
        short = proc.tokenize_record(record, record.answer)
    assert f"record {record.id}" in caplog.text and "earlier exchange(s) of the conversation dropped" in caplog.text
    spans = _spans(proc.pad([short])["labels"][0].tolist())
    answers = [proc.tokenizer.decode(span).strip() for span in spans]
    closed = [_closed(proc, t.answer).strip() for t in record.turns]
    assert answers[0] == closed[0] and answers[-1] == closed[-1]  # the image turn and the last stay
    assert set(answers) <= set(closed) and len(answers) < len(record.turns)
    assert sum(map(len, short.pieces)) + len(short.answer) <= size * 2 // 3


def test_conversation_trains_on_a_real_image_and_generation_sees_the_history(llava_model):
    fundus = str(REAL / "llava_med_retina" / "color_fundus_image.jpg")
    records = [dataclasses.replace(r, image=fundus)
               for r in load_records({"format": "llava", "path": RETINA, **NO_IMAGES})[:6]]
    batch = llava_model.processor.collate([llava_model.processor.encode_record(r) for r in records])
    assert not batch["errors"] and batch["pixel_values"].shape[0] == 1  # one file shared by every conversation
    loss = llava_model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}).loss
    assert torch.isfinite(loss)
    chat = next(r for r in records if r.history)
    prompt = llava_model.processor.tokenize_record(chat, None)
    text = llava_model.tokenizer.decode([t for piece in prompt.pieces for t in piece])
    assert chat.history[0].answer in text and text.rstrip().endswith("### Assistant:") and not prompt.answer


def test_chat_template_conversation_is_the_tokenizers_own_rendering(llava_model):
    """With template "chat", a conversation's ids are those of the tokenizer's own rendering (ChatML here), the image
    slot where the first question's image goes, and the supervised spans are the answers with their closing EOS."""
    from prefixvqa import prompts
    from prefixvqa.data.processor import MedVQAProcessor

    tok = type(llava_model.tokenizer).from_pretrained(llava_model.tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}" + tok.eos_token
                         + "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    proc = MedVQAProcessor(tok, dataclasses.replace(llava_model.config.template, name="chat", system=None,
                                                    image_position=None), lambda im: im, 2)
    sample = proc.tokenize("is there effusion?", "no", history=[("what is shown?", "a chest x-ray")])
    messages = [{"role": "user", "content": prompts.IMAGE + "\nwhat is shown?"},
                {"role": "assistant", "content": "a chest x-ray"},
                {"role": "user", "content": "is there effusion?"}, {"role": "assistant", "content": "no"}]
    head, tail = tok.apply_chat_template(messages, tokenize=False).split(prompts.IMAGE)
    assert tail.endswith("no" + tok.eos_token + "\n")
    expected = [proc.start_ids + tok(head, add_special_tokens=False)["input_ids"],
                tok(tail.removesuffix("\n"), add_special_tokens=False)["input_ids"]]
    assert [sample.pieces[0], sample.pieces[1] + sample.answer] == expected
    labels = proc.pad([sample])["labels"][0].tolist()
    assert [tok.decode(s) for s in _spans(labels)] == ["a chest x-ray" + tok.eos_token, "no" + tok.eos_token]


def test_few_shot_prompt_with_too_few_images_says_what_is_missing(llava_model):
    shots_dir = REAL / "med_flamingo" / "img"
    images = sorted(str(p) for p in shots_dir.glob("*.jpg"))
    shots = [[("what modality is this?", "ct"), ("which organ?", "lung")]]
    for call in (lambda: llava_model.answer([[images[0]]], ["what is shown?"], shots=shots, max_new_tokens=2),
                 lambda: llava_model.score_choices([[images[0]]], ["is it a ct?"], [["yes", "no"]], shots=shots)):
        with pytest.raises(ValueError, match=r"question 0: its prompt has 3 image slot\(s\) \(2 shot\(s\) \+ the "
                                             r"question\) but 1 image\(s\) were given; .*one image per shot"):
            call()
    answer = llava_model.answer([images[:3]], ["what is shown?"], shots=shots, max_new_tokens=2)[0]
    assert answer.num_tokens >= 1


# ------------------------------------------------------------------------------------- real VQA-RAD images end to end
@pytest.fixture(scope="module")
def vqa_rad_with_images():
    """The 56 test questions whose images the release copy holds (10 of the 315 images)."""
    records = load_records({"format": "vqa_rad", "path": VQA_RAD, "split": "test", **NO_IMAGES})
    return [r for r in records if os.path.isfile(r.image)]


def test_answer_score_choices_and_eval_on_real_vqa_rad_images(tiny_decoders, vqa_rad_with_images, tmp_path):
    from prefixvqa.eval.runner import evaluate

    records = vqa_rad_with_images
    assert len(records) == 56 and len({r.image for r in records}) == 10
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear")).eval()
    picked = records[:4]
    answers = model.answer([r.image for r in picked], [r.question for r in picked], max_new_tokens=3)
    assert len(answers) == 4 and all(a.num_tokens >= 1 for a in answers)
    probs = model.score_choices([r.image for r in picked], [r.question for r in picked], [["yes", "no"]] * 4)
    assert all(abs(sum(p) - 1) < 1e-5 for p in probs)
    metrics = evaluate(model, records, "llava_med", tmp_path / "eval", batch_size=16, max_new_tokens=3,
                       progress=False, plots=False)
    assert metrics
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["num_items"] == 56 and manifest["dataset"] == "vqa_rad" and manifest["split"] == "test"
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 56


def test_skipped_records_are_counted_in_training_and_evaluation_results(tiny_decoders, tmp_path):
    """A copy of the OSF release whose first test item lost its answer (as SLAKE's did): train and eval report it."""
    from prefixvqa.eval.runner import evaluate
    from prefixvqa.train import TrainConfig, train

    folder = tmp_path / "vqa_rad"
    shutil.copytree(VQA_RAD / "VQA_RAD Image Folder", folder / "VQA_RAD Image Folder")
    names = {p.name for p in (folder / "VQA_RAD Image Folder").iterdir()}
    items = [row for row in json.loads((VQA_RAD / "VQA_RAD Dataset Public.json").read_text())
             if row["image_name"] in names][:12]
    items[0] = {**items[0], "answer": " "}
    (folder / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    records = load_records({"format": "vqa_rad", "path": folder})
    assert len(records) == 11 and records.skipped[0].id == str(items[0]["qid"])
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear"))
    result = train(model, records, None, TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4,
                                                     max_steps=1, progress=False, tensorboard=False, plot=False))
    assert [(s["split"], s["id"]) for s in result.skipped_records] == [("train", str(items[0]["qid"]))]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"kind": "data", "train_records": 11, "eval_records": 0, "skipped_records": 1} in rows
    evaluate(model, records, "llava_med", tmp_path / "eval", max_new_tokens=2, progress=False, plots=False)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped_records"] == 1
    listed = json.loads((tmp_path / "eval" / "manifest.json").read_text())["skipped_records"]
    assert listed[0]["reason"] == "field 'answer' is empty"


def test_a_slake_file_is_never_relabelled_as_another_split():
    from prefixvqa.data.readers import read_slake

    path = REAL / "slake" / "Slake1.0" / "validate.json"
    with pytest.raises(DataError, match="holds the 'validation' split"):
        read_slake(path, "test", check_images=False)
    assert len(read_slake(path, "validate", check_images=False)) == 1053
