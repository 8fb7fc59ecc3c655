"""The processor: the same tokens and labels as the layout the model had before it, one image path for training,
evaluation and the API (record views applied everywhere), prompt shortening that keeps the answer, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter, prompts
from prefixvqa.data.records import VQARecord
from prefixvqa.data.processor import IGNORE, MedVQAProcessor, view_args
from prompt_reference import render
from test_core import IMAGES, make_config

# the named text layouts ("chat" needs a tokenizer with a chat template: test_realdata covers it)
TEMPLATES = [(name, pos) for name, t in prompts.TEMPLATES.items() if not t.uses_tokenizer_template
             for pos in (None, "before_question", "after_question")]


def reference_layout(model, question, answer, L):
    """The layout MedVQAAdapter built by hand before the processor existed: pieces tokenised one by one, BOS first,
    the answer tokenised on its own + EOS, L prefix vectors per image slot, labels on the answer only."""
    t, tok = model.config.template, model.tokenizer
    text = render(t.name, question, position=t.image_position, system=t.system, tokenizer=tok)
    pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts.split_on_images(text)]
    first = next((k for k, p in enumerate(pieces) if p), 0) if prompts.image_before_start(t.name) else 0
    pieces[first] = model.processor.start_ids + pieces[first]  # the opening tokens: see test_start_tokens
    answer_ids = tok(prompts.answer_text(t.name, answer), add_special_tokens=False)["input_ids"]
    answer_ids += [tok.eos_token_id] if prompts.ends_with_eos(t.name) else []
    ids, labels, slots = [], [], []
    for j, piece in enumerate(pieces):
        if j:
            ids += [None] * L
            slots += [True] * L
        ids += piece
        slots += [False] * len(piece)
    labels = [IGNORE] * len(ids) + answer_ids
    return ids + answer_ids, labels, slots + [False] * len(answer_ids)


@pytest.mark.parametrize(("template", "position"), TEMPLATES)
def test_same_tokens_and_labels_as_before(tiny_decoders, template, position):
    model = MedVQAAdapter(make_config(tiny_decoders["llama"], "linear", template={"name": template,
                                                                                  "image_position": position}))
    L = model.processor.image_seq_length
    questions, answers = ["is there a lesion in the lung?", "which side?"], ["yes", "left lung"]
    batch = model.processor(IMAGES, questions, answers)
    for i, (q, a) in enumerate(zip(questions, answers)):
        ids, labels, slots = reference_layout(model, q, a, L)
        n = int(batch["attention_mask"][i].sum())
        assert n == len(ids) and not batch["attention_mask"][i, n:].any()  # right padded
        assert batch["image_mask"][i, :n].tolist() == slots
        assert batch["labels"][i, :n].tolist() == labels
        got = batch["input_ids"][i, :n].tolist()
        assert [g for g, want in zip(got, ids) if want is not None] == [w for w in ids if w is not None]


def test_long_question_is_shortened_never_the_answer(tiny_decoders, caplog):
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], template={"max_length": 24}))
    question = "is there a lesion in the lung " * 40
    with caplog.at_level("WARNING"):
        sample = model.processor.tokenize(question, "left lung", record_id="rec-7")
    answer_ids = model.tokenizer(" left lung", add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    assert sample.answer == answer_ids
    assert sum(map(len, sample.pieces)) + len(sample.answer) <= 24
    assert "rec-7" in caplog.text
    # candidates are scored whole: "left lung", "left kidney" and "left" no longer collapse to one token
    loglik = model.score_choices(IMAGES[:1], [question], [["left lung", "left kidney", "left"]],
                                 return_loglik=True)[0]
    assert len(set(np.round(loglik, 6))) == 3


def test_processor_saved_and_loaded_with_the_adapter(tiny_decoders, tmp_path):
    from prefixvqa.fileio import write_manifest

    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear"))
    folder = model.save_pretrained(tmp_path / "adapter")
    assert (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    loaded = MedVQAAdapter.from_pretrained(folder)
    a, b = model.processor(IMAGES, ["which side?"] * 2, ["left"] * 2), loaded.processor(IMAGES, ["which side?"] * 2,
                                                                                        ["left"] * 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = MedVQAProcessor(loaded.tokenizer, loaded.config.template, lambda im: im, 1)
    (folder / "processor_config.json").write_text((folder / "processor_config.json").read_text().replace(
        loaded.processor.transform_fingerprint(), "0" * 16))
    with pytest.raises(Exception, match="processor_config.json (has|does not match)"):
        MedVQAAdapter.from_pretrained(folder)
    write_manifest(folder)  # an edited folder re-manifested: the structural check speaks
    with pytest.raises(Exception, match="image transform differs"):
        MedVQAAdapter.from_pretrained(folder)
    assert other.image_seq_length == 1


def _dicom_and_nifti(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    from test_images import synthetic_dicom

    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(synthetic_dicom((np.arange(64 * 64).reshape(64, 64) * 3 % 4096).astype(np.uint16)))
    volume = np.stack([np.tile(np.arange(24.0) ** (k + 1), (20, 1)) for k in range(5)], axis=-1)  # differing slices
    nii = tmp_path / "vol.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4)), nii)
    return [VQARecord("d", str(dcm), "is there a lesion?", "yes", "closed", meta={"window": [600, 800]}),
            VQARecord("n", str(nii), "is there a lesion?", "no", "closed", meta={"slice_index": 1})]


def test_training_and_evaluation_decode_records_identically(tiny_decoders, tmp_path, monkeypatch):
    from prefixvqa.eval.runner import evaluate
    from prefixvqa.train import TrainConfig, train

    records = _dicom_and_nifti(tmp_path)
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear"))
    seen: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    phase = ["train"]
    original = MedVQAAdapter.encode_pixels

    def spy(self, pixel_values):  # every path's pixels reach the tower here (training, answering, the OOD score)
        seen[phase[0]].append(pixel_values.clone())
        return original(self, pixel_values)

    monkeypatch.setattr(MedVQAAdapter, "encode_pixels", spy)
    train(model, records, None, TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=2,
                                            progress=False, tensorboard=False, plot=False))
    phase[0] = "eval"
    evaluate(model, records, "llava_med", tmp_path / "eval", batch_size=2, closed_mode="generate", progress=False,
             plots=False)
    trained, evaluated = torch.cat(seen["train"]), torch.cat(seen["eval"])
    api = model.processor.pixel_values([r.image for r in records], [view_args(r) for r in records])
    for row in api:  # every path decoded every record the same way (batch order may differ)
        assert any(torch.equal(row, t) for t in trained) and any(torch.equal(row, e) for e in evaluated)
    plain = model.processor.pixel_values([r.image for r in records])
    assert not torch.equal(plain[0], api[0]) and not torch.equal(plain[1], api[1])  # the views really apply


def test_one_image_for_many_questions_is_encoded_once(tiny_decoders):
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear"))
    image = Image.new("RGB", (40, 40), (10, 200, 30))
    batch = model.processor([image] * 3 + [IMAGES[1]], ["which side?"] * 4, padding_side="left")
    assert batch["pixel_values"].shape[0] == 2 and batch["image_index"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("family", ["gpt2", "biogpt", "llama"])
@pytest.mark.parametrize("start", ["tokenizer", "bos", "none"])
def test_start_tokens(tiny_decoders, family, start):
    """`template.start="tokenizer"` opens with what the tokenizer adds by itself, as the published code tokenised:
    nothing for GPT-2 (van Sonsbeek, ClipCap), the start token for Llama and BioGPT."""
    from prefixvqa.testing import OPENS_WITH_START

    cfg = make_config(tiny_decoders[family]).replace(**{"template.start": start})
    processor = MedVQAAdapter(cfg).processor
    bos = processor.tokenizer.bos_token_id
    expected = {"tokenizer": [bos] if family in OPENS_WITH_START else [], "bos": [bos], "none": []}[start]
    assert processor.start_ids == expected
    sample = processor.tokenize("is there a lesion?", "yes")
    assert sample.pieces[0][:len(expected)] == expected and (expected or sample.pieces[0][:1] != [bos])


def test_one_rule_for_the_same_image_in_calls_and_collated_batches(tiny_decoders, tmp_path):
    """Equal paths or equal encoded bytes (with the same view) are one image, whether given to the processor call or
    collated from records; another view of the same file is another image."""
    import io

    from prefixvqa.data.processor import image_key

    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear"))
    buf = io.BytesIO()
    IMAGES[0].save(buf, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buf.getvalue())
    by_path = [str(path), "".join(str(path))]  # equal strings, not one object
    by_bytes = [buf.getvalue(), bytes(bytearray(buf.getvalue()))]
    for pair in (by_path, by_bytes):
        assert pair[0] is not pair[1] and image_key(pair[0]) == image_key(pair[1])
        batch = model.processor(pair + [IMAGES[1]], ["which side?"] * 3)
        assert batch["pixel_values"].shape[0] == 2 and batch["image_index"].tolist() == [0, 0, 1]
        records = [VQARecord(f"r{k}", im, "which side?", "left") for k, im in enumerate(pair)]
        collated = model.processor.collate([model.processor.encode_record(r) for r in records])
        assert collated["pixel_values"].shape[0] == 1 and collated["image_index"].tolist() == [0, 0]
    assert image_key(str(path), {"frame": 1}) != image_key(str(path))
    assert image_key(IMAGES[0]) == image_key(IMAGES[0]) != image_key(IMAGES[1])  # other objects: identity
