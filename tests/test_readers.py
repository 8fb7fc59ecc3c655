"""Readers: every dataset layout of the README's "Datasets" table, round trips, errors, hub path — all offline."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from prefixvqa.data import (  # noqa: E402
    READERS,
    DataError,
    VQARecord,
    content_hash,
    dataset_to_records,
    load_records,
    load_vqa_dataset,
    records_to_dataset,
)
from prefixvqa.data.readers import strip_image_tokens  # noqa: E402


# ------------------------------------------------------------------------------------------------------- fixtures
def png_bytes(value: int = 128, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(value))
    return path


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_hf_parquet(path: Path, rows: list[dict]) -> Path:
    """Parquet exactly as `datasets` writes an Image feature: image = struct {bytes, path}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def hf_rows(n: int, prefix: str) -> list[dict]:
    answers = ["yes", "No", "left lung", "3"]
    return [
        {"image": {"bytes": png_bytes(10 * i), "path": f"{prefix}{i}.png"}, "question": f"{prefix} q{i}?",
         "answer": answers[i % 4]}
        for i in range(n)
    ]


def make_hf_release(root: Path) -> Path:
    write_hf_parquet(root / "data" / "train-00000-of-00001.parquet", hf_rows(3, "train"))
    write_hf_parquet(root / "data" / "test-00000-of-00001.parquet", hf_rows(2, "test"))
    return root


VQA_RAD_ITEMS = [
    {"qid": 1, "image_name": "synpic100.jpg", "image_case_url": "https://medpix.example/case1", "image_organ": "HEAD",
     "answer": "Yes", "answer_type": "CLOSED", "question_type": "PRES", "question": "Is there a bleed?",
     "phrase_type": "freeform"},
    {"qid": 2, "image_name": "synpic100.jpg", "image_case_url": "https://medpix.example/case1", "image_organ": "HEAD",
     "answer": 4, "answer_type": "OPEN ", "question_type": "COUNT", "question": "How many lesions?",
     "phrase_type": "para"},
    {"qid": 3, "image_name": "synpic200.jpg", "image_case_url": "https://medpix.example/case2", "image_organ": "CHEST",
     "answer": "right", "answer_type": "OPEN", "question_type": "POS", "question": "Which side?",
     "phrase_type": "test_freeform"},
    {"qid": 4, "image_name": "synpic200.jpg", "image_case_url": "https://medpix.example/case2", "image_organ": "CHEST",
     "answer": "no", "answer_type": "CLOSED", "question_type": "ABN", "question": "Is it normal?",
     "phrase_type": "test_para"},
]


def make_vqa_rad_osf(root: Path, items: list[dict] = VQA_RAD_ITEMS) -> Path:
    for name in {item["image_name"] for item in items}:
        write_png(root / "VQA_RAD Image Folder" / name)
    write_json(root / "VQA_RAD Dataset Public.json", items)
    return root


def slake_item(qid: int, lang: str, answer: str = "Lung", answer_type: str = "OPEN") -> dict:
    return {"img_id": qid % 2, "img_name": f"xmlab{qid % 2}/source.jpg", "question": f"Q{qid} in {lang}?",
            "answer": answer, "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type,
            "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(root: Path) -> Path:
    for i in range(2):
        write_png(root / "imgs" / f"xmlab{i}" / "source.jpg")
    write_json(root / "train.json", [slake_item(0, "en"), slake_item(1, "zh"), slake_item(2, "en", "Yes", "CLOSED")])
    write_json(root / "validate.json", [slake_item(10, "en")])
    write_json(root / "test.json", [slake_item(20, "en"), slake_item(21, "zh")])
    return root


PMC_FIELDS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def make_pmc(root: Path) -> Path:
    write_png(root / "images" / "PMC1_fig1.jpg")
    write_png(root / "images" / "PMC2_fig3.jpg")
    rows = [
        {"Figure_path": "PMC1_fig1.jpg", "Question": "What imaging modality is shown?", "Answer": "CT",
         "Choice A": " A:CT", "Choice B": " B:MRI ", "Choice C": " C:X-ray", "Choice D": " D:PET", "Answer_label": "A"},
        {"Figure_path": "PMC2_fig3.jpg", "Question": "Which organ is enlarged?", "Answer": " Liver ",
         "Choice A": " A: Spleen", "Choice B": " B:Kidney", "Choice C": " C:Liver", "Choice D": " D:Heart",
         "Answer_label": "C"},
    ]
    write_csv(root / "test_clean.csv", rows, PMC_FIELDS)
    return root


LLAVA_ITEMS = [
    {"id": "cap1", "image": "fig1.png",
     "conversations": [{"from": "human", "value": "<image>\nDescribe the image concisely."},
                       {"from": "gpt", "value": "Axial CT of the abdomen."}]},
    {"id": "chat7", "image": "fig2.png", "domain": {"ct": True},
     "conversations": [{"from": "human", "value": "What is shown?\n<image>"},
                       {"from": "gpt", "value": "A chest radiograph."},
                       {"from": "human", "value": "Any effusion?"},
                       {"from": "gpt", "value": "Small left effusion."}]},
    {"id": "vqa3", "image": "fig1.png", "answer_type": "CLOSED",
     "conversations": [{"from": "human", "value": "<image>\nIs this an MRI?"}, {"from": "gpt", "value": "no"}]},
    {"id": "text9", "conversations": [{"from": "human", "value": "What is a CT scan?"},
                                      {"from": "gpt", "value": "An X-ray tomography."}]},
]


def make_llava(root: Path) -> Path:
    write_png(root / "images" / "fig1.png")
    write_png(root / "images" / "fig2.png")
    return write_json(root / "llava_med_instruct.json", LLAVA_ITEMS)


REPORT_ROWS = [
    {"id": "s1", "image": "p1/s1.png", "findings": "No focal consolidation.", "impression": "Normal chest.",
     "indication": "Cough."},
    {"id": "s2", "image": "p2/s2.png", "findings": "", "impression": "No acute process.", "indication": ""},
    {"id": "s3", "image": "p3/s3.png", "findings": "Cardiomegaly.", "impression": "", "indication": "Dyspnea."},
]


def make_reports(root: Path) -> Path:
    for row in REPORT_ROWS:
        write_png(root / "files" / row["image"])
    return write_csv(root / "reports.csv", REPORT_ROWS)


GENERIC_ROWS = [
    {"image": "a.png", "question": "Is this normal?", "answer": "yes", "answer_type": "CLOSED", "choices": ""},
    {"image": "b.png", "question": "Which organ?", "answer": "liver", "answer_type": "open",
     "choices": "liver|kidney|spleen"},
]


# --------------------------------------------------------------------------------------------------------- VQA-RAD
def test_vqa_rad_osf_fields_and_phrase_type_split(tmp_path: Path) -> None:
    root = make_vqa_rad_osf(tmp_path / "vqarad")
    records = load_records({"format": "vqa_rad", "path": str(root)})
    assert [r.id for r in records] == ["1", "2", "3", "4"]
    first, second = records[0], records[1]
    assert first.image == str((root / "VQA_RAD Image Folder" / "synpic100.jpg").resolve())
    assert (first.question, first.answer, first.answer_type) == ("Is there a bleed?", "Yes", "closed")
    assert second.answer == "4" and second.answer_type == "open"  # JSON number answer, "OPEN " normalised
    assert first.meta["organ"] == "HEAD" and first.meta["question_type"] == "PRES"
    assert first.meta["image_case_url"].endswith("case1") and first.meta["image_name"] == "synpic100.jpg"
    assert [r.meta["split"] for r in records] == ["train", "train", "test", "test"]
    assert [r.id for r in load_records({"format": "vqa_rad", "path": root, "split": "test"})] == ["3", "4"]
    assert [r.id for r in load_records({"format": "vqa_rad", "path": root}, split="train")] == ["1", "2"]


@pytest.mark.parametrize("fmt", ["vqa_rad", "pathvqa"])
def test_hf_parquet_release(tmp_path: Path, fmt: str) -> None:
    root = make_hf_release(tmp_path / fmt)
    train = load_records({"format": fmt, "path": root, "split": "train"})
    test = load_records({"format": fmt, "path": root / "data" / "test-00000-of-00001.parquet", "split": "test"})
    assert len(train) == 3 and len(test) == 2
    assert isinstance(train[0].image, bytes) and Image.open(io.BytesIO(train[0].image)).size == (8, 8)
    assert [r.answer_type for r in train] == ["closed", "closed", "open"]  # yes / No / free text
    assert train[0].meta["image_name"] == "train0.png" and train[0].meta["split"] == "train"
    assert train[0].meta["dataset"] == fmt and test[1].question == "test q1?"
    assert len(load_records({"format": fmt, "path": root})) == 5


# ----------------------------------------------------------------------------------------------------------- SLAKE
def test_slake_language_filter_and_fields(tmp_path: Path) -> None:
    root = make_slake(tmp_path / "Slake1.0")
    train = load_records({"format": "slake", "path": root, "split": "train"})
    assert [r.id for r in train] == ["0", "2"]
    record = train[1]
    assert record.image == str((root / "imgs" / "xmlab0" / "source.jpg").resolve())
    assert (record.answer, record.answer_type) == ("Yes", "closed")
    expected = {"location": "Lung", "organ": "Lung", "modality": "CT", "content_type": "Organ", "base_type": "vqa",
                "q_lang": "en", "triple": ["vhead", "_", "_"], "split": "train", "image_name": "xmlab0/source.jpg"}
    assert {k: record.meta[k] for k in expected} == expected
    assert [r.id for r in load_records({"format": "slake", "path": root, "split": "train", "q_lang": "zh"})] == ["1"]
    assert len(load_records({"format": "slake", "path": root, "split": "train", "q_lang": "both"})) == 3
    assert [r.meta["split"] for r in load_records({"format": "slake", "path": root}, split="val")] == ["validation"]
    assert len(load_records({"format": "slake", "path": root})) == 4  # all splits, English
    with pytest.raises(ValueError, match="q_lang"):
        load_records({"format": "slake", "path": root, "q_lang": "fr"})


# --------------------------------------------------------------------------------------------------------- PMC-VQA
def test_pmc_vqa_choices_stripped_and_answer_from_label(tmp_path: Path) -> None:
    root = make_pmc(tmp_path / "pmc")
    records = load_records({"format": "pmc_vqa", "path": root, "split": "test_clean"})
    assert records[0].choices == ["CT", "MRI", "X-ray", "PET"] and records[0].answer == "CT"
    assert records[1].choices == ["Spleen", "Kidney", "Liver", "Heart"] and records[1].answer == "Liver"
    assert records[1].meta["answer_label"] == "C" and records[1].meta["answer_raw"] == "Liver"
    assert records[1].image == str((root / "images" / "PMC2_fig3.jpg").resolve())
    assert records[0].id == "test_clean/0" and records[0].answer_type == "closed"


# ----------------------------------------------------------------------------------------------------------- LLaVA
def test_llava_one_record_per_conversation_with_history_and_image_position(tmp_path: Path) -> None:
    path = make_llava(tmp_path / "llava")
    records = load_records({"format": "llava", "path": path, "image_root": tmp_path / "llava" / "images"})
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["cap1", "chat7", "vqa3", "text9"]
    caption = by_id["cap1"]
    assert caption.question == "Describe the image concisely." and caption.image_position == "before_question"
    assert caption.history == []
    chat = by_id["chat7"]  # one sequence: the first exchange is history, the image was after its question
    assert (chat.question, chat.answer) == ("Any effusion?", "Small left effusion.")
    assert chat.history == [("What is shown?", "A chest radiograph.")] and chat.image_position == "after_question"
    assert [tuple(t) for t in chat.turns] == [("What is shown?", "A chest radiograph."),
                                              ("Any effusion?", "Small left effusion.")]
    assert (chat.meta["n_turns"], chat.meta["source_id"], chat.meta["domain"]) == (2, "chat7", {"ct": True})
    assert chat.image == str((tmp_path / "llava" / "images" / "fig2.png").resolve())
    assert by_id["vqa3"].answer_type == "closed" and by_id["vqa3"].answer == "no"
    assert by_id["text9"].image is None and by_id["text9"].image_position is None
    each = load_records({"format": "llava", "path": path, "image_root": tmp_path / "llava" / "images",
                         "per_turn": True})
    assert [r.id for r in each] == ["cap1", "chat7#0", "chat7#1", "vqa3", "text9"]
    first, second = each[1], each[2]
    assert first.history == [] and first.question == "What is shown?" and first.meta["turn"] == 0
    assert second.history == [("What is shown?", "A chest radiograph.")] and second.meta["turn"] == 1
    assert second.image_position == first.image_position == "after_question"


def test_strip_image_tokens_positions() -> None:
    assert strip_image_tokens("<image>\nWhat?") == ("What?", [0])
    assert strip_image_tokens("What?\n<image>") == ("What?", [5])
    assert strip_image_tokens("Left <image> right") == ("Left  right", [5])
    assert strip_image_tokens("no token") == ("no token", [])


# --------------------------------------------------------------------------------------------------------- reports
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"s1": "No focal consolidation.", "s3": "Cardiomegaly."}),
        ({"target": "impression"}, {"s1": "Normal chest.", "s2": "No acute process."}),
        ({"target": "both"}, {"s1": "FINDINGS: No focal consolidation.\nIMPRESSION: Normal chest.",
                              "s2": "IMPRESSION: No acute process.", "s3": "FINDINGS: Cardiomegaly."}),
    ],
)
def test_reports_targets(tmp_path: Path, options: dict, expected: dict) -> None:
    path = make_reports(tmp_path / "mimic")
    records = load_records({"format": "report", "path": path, "image_root": tmp_path / "mimic" / "files", **options})
    assert {r.id: r.answer for r in records} == expected
    assert all(r.question == "Describe the findings of the chest X-ray." for r in records)
    assert records[0].meta["indication"] == "Cough." and records[0].meta["task"] == "report"


def test_reports_instruction_with_indication(tmp_path: Path) -> None:
    path = make_reports(tmp_path / "iu")
    records = load_records({"format": "report", "path": path, "image_root": tmp_path / "iu" / "files",
                            "instruction": "Write the findings.", "with_indication": True})
    assert records[0].question == "Write the findings. Indication: Cough."
    assert records[0].image == str((tmp_path / "iu" / "files" / "p1" / "s1.png").resolve())


# --------------------------------------------------------------------------------------------------------- generic
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_generic_tables(tmp_path: Path, suffix: str) -> None:
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "imgs" / name)
    path = tmp_path / f"my_set{suffix}"
    (write_jsonl if suffix == ".jsonl" else write_csv)(path, GENERIC_ROWS)
    records = load_records(str(path), image_root=tmp_path / "imgs")  # a bare path means the generic reader
    assert [r.id for r in records] == ["my_set/0", "my_set/1"]
    assert records[0].answer_type == "closed" and records[0].choices is None
    assert records[1].choices == ["liver", "kidney", "spleen"] and records[1].answer_type == "open"
    assert records[1].image == str((tmp_path / "imgs" / "b.png").resolve())


# ------------------------------------------------------------------------------------------- dataset round trip, hash
def sample_records() -> list[VQARecord]:
    return [
        VQARecord("a", "/data/x.png", "Q?", "yes", "CLOSED", None, {"dataset": "d", "history": [{"q": 1}]}),
        VQARecord("b", png_bytes(3), "Which?", "B", None, ["A", "B"], {"image_name": "b.png"}),
        VQARecord("c", None, "Text only?", "sure", "open", [], {}),
        VQARecord("d", "/data/y.png", "And now?", "smaller", None, None, {},
                  history=[("What is shown?", "A mass.")], image_position="after_question"),
    ]


def test_records_dataset_round_trip() -> None:
    records = sample_records()
    ds = records_to_dataset(records)
    assert ds.column_names == ["id", "image", "question", "answer", "answer_type", "choices", "meta", "history",
                               "image_position"]
    assert str(ds.data.schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert str(ds.data.schema.field("meta").type) == "string"
    assert dataset_to_records(ds) == records
    decoded = ds.cast_column("image", datasets.Image())  # the image column is HF's Image layout
    assert decoded[1]["image"].size == (8, 8)
    assert dataset_to_records(decoded) == records


def test_content_hash_is_order_and_content_sensitive_but_root_independent(tmp_path: Path) -> None:
    records = sample_records()
    assert content_hash(records) == content_hash(sample_records())
    assert content_hash(records) != content_hash(records[::-1])
    changed = sample_records()
    changed[0].answer = "no"
    assert content_hash(changed) != content_hash(records)
    for root in ("one", "two"):  # same release under two image roots: same manifest hash
        make_slake(tmp_path / root)
    hashes = {content_hash(load_records({"format": "slake", "path": tmp_path / root})) for root in ("one", "two")}
    assert len(hashes) == 1


def test_load_vqa_dataset(tmp_path: Path) -> None:
    ds = load_vqa_dataset({"format": "slake", "path": make_slake(tmp_path / "s"), "split": "test"})
    assert isinstance(ds, datasets.Dataset) and ds["id"] == ["20"] and json.loads(ds[0]["meta"])["q_lang"] == "en"


# ------------------------------------------------------------------------------------------------------ hub path
def test_hub_spec_through_load_dataset_on_local_files(tmp_path: Path) -> None:
    root = make_hf_release(tmp_path / "path-vqa")
    cache = str(tmp_path / "hf_cache")
    from_folder = load_records({"format": "pathvqa", "hub": str(root), "split": "test", "cache_dir": cache})
    assert [r.question for r in from_folder] == ["test q0?", "test q1?"]
    assert isinstance(from_folder[0].image, bytes) and from_folder[0].answer_type == "closed"
    files = {"train": str(root / "data" / "train-00000-of-00001.parquet"),
             "test": str(root / "data" / "test-00000-of-00001.parquet")}
    every = load_records({"format": "generic", "hub": "parquet", "data_files": files, "cache_dir": cache})
    assert sorted(r.meta["split"] for r in every) == ["test"] * 2 + ["train"] * 3


def test_hub_spec_offline_unknown_dataset_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no-such-org/no-such-set"):
        load_records({"format": "generic", "hub": "no-such-org/no-such-set", "split": "train",
                      "cache_dir": str(tmp_path)})


# ---------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fmt", ["pathvqa", "generic"])
@pytest.mark.parametrize("name", ["train_vqa.pkl", "qas.pickle"])
def test_pickle_is_refused_with_conversion_hint(tmp_path: Path, fmt: str, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95 not read")
    with pytest.raises(DataError, match="refusing to read a Python pickle") as err:
        load_records({"format": fmt, "path": path})
    assert name in str(err.value) and "parquet" in str(err.value)


def test_pickle_disguised_as_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001.parquet"
    path.write_bytes(b"\x80\x05\x95 not read")
    with pytest.raises(DataError, match="pickle"):
        load_records({"format": "pathvqa", "path": tmp_path, "split": "train"})


def test_folder_of_pickles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(DataError, match=r"train_vqa\.pkl: refusing"):
        load_records({"format": "pathvqa", "path": tmp_path})


def _bad_slake(root: Path) -> tuple[Path, dict]:
    make_slake(root)
    items = [slake_item(0, "en"), {k: v for k, v in slake_item(1, "en").items() if k != "answer"}]
    return write_json(root / "train.json", items), {"format": "slake", "path": root, "split": "train"}


def _bad_vqa_rad(root: Path) -> tuple[Path, dict]:
    make_vqa_rad_osf(root, [VQA_RAD_ITEMS[0], {**VQA_RAD_ITEMS[1], "answer_type": "MAYBE"}])
    return root / "VQA_RAD Dataset Public.json", {"format": "vqa_rad", "path": root}


def _bad_pmc(root: Path) -> tuple[Path, dict]:
    make_pmc(root)
    rows = list(csv.DictReader((root / "test_clean.csv").open()))
    rows[1]["Answer_label"] = "E"
    return write_csv(root / "test_clean.csv", rows, PMC_FIELDS), {"format": "pmc_vqa", "path": root,
                                                                   "split": "test_clean"}


def _bad_llava(root: Path) -> tuple[Path, dict]:
    make_llava(root)
    items = [LLAVA_ITEMS[0], {**LLAVA_ITEMS[1], "conversations": LLAVA_ITEMS[1]["conversations"][1:]}]
    path = write_json(root / "llava_med_instruct.json", items)
    return path, {"format": "llava", "path": path, "image_root": root / "images"}


def _bad_report(root: Path) -> tuple[Path, dict]:
    path = write_csv(root / "reports.csv", [{"image": "x.png", "impression": "Fine."}])
    return path, {"format": "report", "path": path, "check_images": False}


def _bad_generic(root: Path) -> tuple[Path, dict]:
    path = root / "set.jsonl"
    root.mkdir(parents=True)
    path.write_text(json.dumps(GENERIC_ROWS[0]) + "\n{broken\n")
    return path, {"format": "generic", "path": path, "check_images": False}


def _bad_pathvqa(root: Path) -> tuple[Path, dict]:
    path = root / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(), "path": "a.png"}], "answer": ["yes"]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "answer": datasets.Value("string")})).to_parquet(str(path))
    return path, {"format": "pathvqa", "path": root, "split": "train"}


def _bad_json_shape(root: Path) -> tuple[Path, dict]:
    make_slake(root)
    return write_json(root / "test.json", {"items": []}), {"format": "slake", "path": root, "split": "test"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_slake, r"train\.json item 1: missing field 'answer'"),
        (_bad_vqa_rad, r"Public\.json item 1: field 'answer_type': unknown answer_type 'MAYBE'"),
        (_bad_pmc, r"test_clean\.csv item 1: field 'Answer_label' must be A, B, C or D"),
        (_bad_llava, r"instruct\.json item 1: conversations\[0\]: expected a 'human' turn"),
        (_bad_report, r"reports\.csv item 0: missing field 'findings'"),
        (_bad_generic, r"set\.jsonl line 2: invalid JSON"),
        (_bad_pathvqa, r"train-00000-of-00001\.parquet item 0: missing field 'question'"),
        (_bad_json_shape, r"test\.json: expected a JSON list"),
    ],
    ids=["slake", "vqa_rad", "pmc_vqa", "llava", "report", "generic", "pathvqa", "json_shape"],
)
def test_malformed_input_names_file_item_and_field(tmp_path: Path, make, message: str, caplog) -> None:
    path, spec = make(tmp_path / "ds")
    with pytest.raises(DataError, match=message) as err:
        load_records({**spec, "on_bad_record": "stop"})
    assert str(path) in str(err.value)
    try:  # by default a bad item is skipped, named in the log and listed; file-level errors still raise
        records = load_records(spec)
    except DataError as again:
        assert re.search(message, str(again))
        return
    assert len(records.skipped) == 1 and re.search(message, f"{records.skipped[0].where}: {records.skipped[0].reason}")
    assert records.skipped[0].where in caplog.text and records


def test_missing_images_reported_by_name_or_deferred(tmp_path: Path) -> None:
    root = make_slake(tmp_path / "s")
    (root / "imgs" / "xmlab0" / "source.jpg").unlink()
    with pytest.raises(DataError, match=r"image file\(s\) not found: item 0: .*xmlab0/source\.jpg"):
        load_records({"format": "slake", "path": root, "split": "train"})
    records = load_records({"format": "slake", "path": root, "split": "train", "check_images": False})
    assert records[0].image.endswith(os.path.join("xmlab0", "source.jpg"))


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs 'format'"):
        load_records({"path": tmp_path / "x.json"})
    with pytest.raises(DataError, match="needs 'format'"):
        load_records({"format": "vqa-rad", "path": tmp_path})
    with pytest.raises(DataError, match="exactly one of 'path' or 'hub'"):
        load_records({"format": "generic"})
    assert set(READERS) == {"vqa_rad", "slake", "pathvqa", "pmc_vqa", "llava", "llava_med_eval", "report", "iu_xray",
                            "generic"}


def test_generic_folder_reads_split_parquet_beside_metadata_json(tmp_path: Path) -> None:
    root = make_hf_release(tmp_path / "snapshot")
    write_json(root / "dataset_infos.json", {"default": {}})  # hub snapshots carry metadata files
    records = load_records({"format": "generic", "path": root, "split": "test"})
    assert [r.id for r in records] == ["test-00000-of-00001/0", "test-00000-of-00001/1"]
    assert records[0].answer_type is None  # generic tables do not derive answer types


# -------------------------------------------------------------------------------------------------------- registry
def test_registry_entries_say_what_each_format_takes(tmp_path: Path) -> None:
    """Callers ask the registry (options, unlabeled reading) instead of inspecting reader signatures."""
    from prefixvqa.data.readers import ReaderOptions

    common = {"image_root", "check_images", "on_bad_record"}
    assert all(common <= reader.accepts and {"split", "label"}.isdisjoint(reader.accepts)
               for reader in READERS.values())
    assert READERS["slake"].accepts == common | {"q_lang"}
    assert READERS["vqa_rad"].accepts == common | {"frame_questions"}
    assert {"view", "projections", "target"} <= READERS["iu_xray"].accepts and \
        "image_field" not in READERS["iu_xray"].accepts
    assert "image_field" in READERS["report"].accepts and "view" not in READERS["report"].accepts
    assert [name for name, reader in READERS.items() if reader.reads_unlabeled] == ["generic"]
    assert all(isinstance(reader.options(), ReaderOptions) and reader.name == name for name, reader in READERS.items())
    root = make_slake(tmp_path / "s")  # the entry reads when called, with the same options a spec gives
    assert [r.id for r in READERS["slake"](root, "train", q_lang="zh")] == ["1"]
    with pytest.raises(DataError, match=r"dataset spec for format 'slake': unknown key\(s\) \['langs'\]"):
        READERS["slake"](root, "train", langs="zh")


@pytest.mark.parametrize(("spec", "message"), [
    ({"format": "slake", "on_bad_record": "ignore"}, r"on_bad_record must be one of \['skip', 'stop'\], got 'ignore'"),
    ({"format": "report", "target": "summary"}, r"target must be one of \['findings', 'impression', 'both'\]"),
    ({"format": "iu_xray", "view": "oblique"}, r"view must be one of \['frontal', 'lateral'\], got 'oblique'"),
])
def test_option_values_are_checked_before_reading(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_records({**spec, "path": tmp_path / "never-read"})


@pytest.mark.parametrize("field", ["answer_type"])
def test_a_huge_bad_value_in_a_data_file_gives_one_short_line_naming_the_file(tmp_path, field):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "x" * 100_000, "image": "a.png", "question": "q?", "answer": "yes",
                                field: "maybe" * 20_000}) + "\n")
    with pytest.raises(DataError) as err:
        load_records({"format": "generic", "path": str(path)})
    message = str(err.value)
    assert "\n" not in message and len(message) < 600 and "data.jsonl" in message, message[:300]
