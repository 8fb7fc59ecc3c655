"""`MedVQAAdapter.from_vlm` on the `gemma3` layout (MedGemma): a tiny random Gemma3ForConditionalGeneration saved as
transformers saves one, with a Gemma-style tokenizer and Gemma3Processor, gives the logits and greedy answers of
transformers' own Gemma3ForConditionalGeneration (pooled image tokens, bidirectional attention within an image,
sliding-window layers); it fine-tunes with LoRA on the real VQA-RAD files and reloads strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_vision_backends import picture  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
QUESTIONS = ["is there a lesion in the chest ?", "which side of the lung ?"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>"]
SIDE, PATCH, TOKENS = 32, 8, 4  # 4 x 4 patches pooled to 2 x 2 image tokens (MedGemma: 64 x 64 -> 16 x 16)


def gemma_tokenizer():
    """A byte-level BPE tokenizer with Gemma's special tokens, BOS added in front (as Gemma's tokenizer does), and
    the attributes Gemma3Processor reads (boi/eoi/image tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from prefixvqa.testing import _CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(_CORPUS[i:] + _CORPUS[:i]) for i in range(len(_CORPUS))], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={
                                       "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                       "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                                       "eot_token": "<end_of_turn>"})


def build_medgemma(folder: Path, sliding_window: int = 12, text: dict | None = None) -> dict:
    """A tiny Gemma3ForConditionalGeneration as google/medgemma-4b-it lays it out (config with vision_config /
    text_config / mm_tokens_per_image, weights by save_pretrained, Gemma3Processor files), scaled down: one sliding
    and one global layer, a SigLIP tower of 2 blocks at 32 px."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    from prefixvqa.rng import seeded

    tok = gemma_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "query_pre_attn_scalar": 16, "sliding_window": sliding_window,
                     "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 256,
                     "bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
                     "pad_token_id": ids["<pad>"], **(text or {})},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": SIDE, "patch_size": PATCH,
                       "vision_use_head": False},
        mm_tokens_per_image=TOKENS, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"])
    with seeded(5):
        model = Gemma3ForConditionalGeneration(config).eval()
        projector = model.model.multi_modal_projector
        with torch.no_grad():  # transformers initialises both to zero: random values make the test see them
            projector.mm_input_projection_weight.normal_(0, 0.3)
            projector.mm_soft_emb_norm.weight.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": SIDE, "width": SIDE}),
                                tokenizer=tok, image_seq_length=TOKENS)
    processor.save_pretrained(str(folder))
    processor.image_processor.save_pretrained(str(folder))  # preprocessor_config.json, as the release ships it
    return {"folder": folder, "model": model, "processor": processor, "tok": tok, "ids": ids}


def reference_prompt(question: str, before: bool = True) -> str:
    """The text Gemma's chat template renders for one user turn with an image (image first unless `before` is False),
    without the BOS the tokenizer adds."""
    body = f"<start_of_image>{question.strip()}" if before else f"{question.strip()}<start_of_image>"
    return f"<start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n"


def imported(folder: Path, **over):
    from prefixvqa.model import MedVQAAdapter

    return MedVQAAdapter.from_vlm(str(folder), **{"decoder": {"dtype": "float32"}, "tuning": {"mode": "frozen"},
                                                  **over}).eval()


@pytest.mark.parametrize("position", ["before_question", "after_question"])
def test_gemma3_layout_equals_transformers_gemma3(tmp_path, position):
    from transformers import AutoImageProcessor, Gemma3ForConditionalGeneration

    release = build_medgemma(tmp_path / "medgemma")
    ref = Gemma3ForConditionalGeneration.from_pretrained(str(release["folder"]), dtype=torch.float32).eval()
    model = imported(release["folder"], template={"image_position": position})
    assert model.config.template.name == "gemma3" and model.config.mapper.kind == "gemma3"
    assert model.num_image_tokens == (SIDE // PATCH) ** 2 and model.processor.image_seq_length == TOKENS
    image, eot = picture(45, 30), release["ids"]["<end_of_turn>"]
    pil = AutoImageProcessor.from_pretrained(str(release["folder"]), backend="pil")
    alone = []
    for question in QUESTIONS:
        inputs = release["processor"](text=reference_prompt(question, position == "before_question"),
                                      images=image, return_tensors="pt")
        batch = model.processor([image], [question])
        # the image's tokens where the processor puts them (prefixvqa writes the image vectors over its own filler id)
        image_slots = inputs["input_ids"] == release["ids"]["<image_soft_token>"]
        assert torch.equal(batch["image_mask"].bool(), image_slots) and int(image_slots.sum()) == TOKENS
        assert torch.equal(batch["input_ids"][~image_slots], inputs["input_ids"][~image_slots])
        assert torch.equal(inputs["token_type_ids"].bool(), image_slots)
        # the PIL image processor (transformers 5's default torchvision one rounds a few pixels 1/255 apart)
        assert torch.equal(batch["pixel_values"], pil(images=image, return_tensors="pt")["pixel_values"])
        torch.testing.assert_close(batch["pixel_values"], inputs["pixel_values"], rtol=0, atol=1 / 127)
        inputs["pixel_values"] = batch["pixel_values"]
        with torch.no_grad():
            want = ref(**inputs).logits
            got = model(**batch, full_logits=True).logits
            causal = ref(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        assert not torch.allclose(causal, want, atol=1e-3)  # a causal image mask would give other logits
        new = ref.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=release["ids"]["<pad>"]
                           )[0, inputs["input_ids"].shape[1]:].tolist()
        if eot in new:
            new = new[:new.index(eot)]
        (answer,) = model.answer([image], [question], max_new_tokens=6)
        assert answer.text == release["tok"].decode(new, skip_special_tokens=True).strip() and answer.num_tokens
        alone.append(answer.text)
    # a batch of prompts of different lengths (left padding masked in the image-attention masks) answers the same
    assert [a.text for a in model.answer([image] * 2, QUESTIONS, max_new_tokens=6)] == alone
    # choice scoring (eval, calibration) continues the prompt's cache: equal to full forwards with the image masks
    from test_core import separate_loglik

    options = ["yes", "no", "both lungs"]
    (shared,) = model.score_choices([image], [QUESTIONS[0]], [options], return_loglik=True)
    assert torch.allclose(torch.tensor(shared), torch.tensor(separate_loglik(model, image, QUESTIONS[0], options)),
                          atol=1e-5)


def test_gemma3_image_tokens_attend_both_ways_and_the_window_applies(tmp_path):
    """The masks themselves: tokens of one image see each other (also later ones), text stays causal, the sliding
    layers' window applies on top, a padding key is never seen."""
    from prefixvqa.vlm_gemma3 import image_attention_masks

    class Cfg:
        sliding_window, _attn_implementation = 3, "sdpa"

    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    image = torch.tensor([[0, 0, 1, 1, 1, 0, 0]]).bool()
    masks = image_attention_masks(Cfg(), mask, image, torch.float32)
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert full[2, 4] and full[4, 2] and not full[1, 2] and full[5, 1] and not full[5, 0] and not full[3, 0]
    assert sliding[2, 4] and not sliding[5, 1] and sliding[5, 3]


def test_gemma3_incomplete_config_names_file_and_key(tmp_path):
    import json

    from prefixvqa.vlm_layouts import LayoutError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(LayoutError, match=r"config.json: missing key\(s\) \['vision_config', 'mm_tokens_per_image'\] "
                                          r"of a Gemma 3-layout config"):
        imported(tmp_path)


@pytest.mark.slow
def test_gemma3_layout_fine_tunes_on_vqa_rad_saves_and_reloads_strictly(tmp_path):
    from safetensors.torch import load_file

    from prefixvqa.config import ConfigError
    from prefixvqa.export import export_merged
    from test_vlm_import import fine_tune_and_save, reload_answers_equal, vqa_rad_records

    records = vqa_rad_records()
    assert len(records) >= 20  # the real VQA-RAD files of ../shared/realdata
    folder = str(build_medgemma(tmp_path / "medgemma")["folder"])
    model = fine_tune_and_save(folder, records, tmp_path)
    assert set(load_file(str(tmp_path / "adapter" / "mapper.safetensors"))) == {"mapper.mm_input_projection_weight",
                                                                                 "mapper.mm_soft_emb_norm"}
    loaded = reload_answers_equal(model, folder, "gemma3", records, tmp_path)
    with pytest.raises(ConfigError, match="export --merge: decoder.layout='gemma3' attends over image tokens"):
        export_merged(loaded, tmp_path / "export")  # a plain causal-LM folder would lose the image-attention rule


def test_qlora_on_an_imported_gemma3_checkpoint(tmp_path):
    """QLoRA: MedGemma's language model read out of the gemma3 layout in 4-bit NF4; LoRA and the projector train."""
    pytest.importorskip("bitsandbytes")
    from prefixvqa.model import MedVQAAdapter
    from test_vlm_import import assert_qlora_trains

    sizes = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 32}  # bitsandbytes' CPU kernels: 64-blocks
    folder = build_medgemma(tmp_path / "medgemma", text=sizes)["folder"]
    assert_qlora_trains(MedVQAAdapter.from_vlm(str(folder), decoder={"quantization": "4bit", "dtype": "float32"},
                                               tuning={"r": 4, "alpha": 8}, template={"max_length": 64}))
