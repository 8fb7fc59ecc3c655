"""The Python API answers deterministically and as a reloaded adapter does (issue #18, "silent wrong results"), on
tiny models: inference runs in eval mode and gives the caller's mode back; a bf16 run leaves no autocast behind; a
template longer than the decoder's context is clamped and prompts shortened to fit; 4-bit weights are counted at
their real size; the API and a recipe seed the mapper and LoRA initialisation the same way."""

from __future__ import annotations

import random
import types
import warnings

import numpy as np
import pytest
import torch

from prefixvqa import MedVQAAdapter
from prefixvqa.config import AdapterConfig, ConfigError
from prefixvqa.data.synthetic import colour_records
from prefixvqa.testing import QUANT_SIZES, build_decoder, tiny_overrides

PRESET = "van_sonsbeek_gpt2xl"  # GPT-2, mapper dropout 0.5 and LoRA dropout 0.1, beam search
FAST = {"progress": False, "tensorboard": False, "plot": False}
RECORDS = colour_records(4)
IMAGES, QUESTIONS = [r.image for r in RECORDS], [r.question for r in RECORDS]
CHOICES = [["red", "blue", "green"]] * len(RECORDS)


def perturb_trainable(model: MedVQAAdapter) -> None:
    """Move every trainable tensor off its init (LoRA B starts at zero: its dropout would change nothing)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def answers(model: MedVQAAdapter, **kw) -> list[tuple[str, float]]:
    return [(a.text, a.score) for a in model.answer(IMAGES, QUESTIONS, max_new_tokens=4, **kw)]


def modes(model: MedVQAAdapter) -> list[bool]:
    return [m.training for m in model.modules()]


def trained_tensors(model: MedVQAAdapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("mapper.") or "lora_" in n}


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------- eval mode
def test_inference_runs_in_eval_mode_gives_the_callers_mode_back_and_equals_the_reloaded_adapter(tiny_decoders,
                                                                                                 tmp_path):
    model = MedVQAAdapter.from_preset(PRESET, **tiny_overrides(tiny_decoders["gpt2"]))
    assert model.training and model.mapper.training  # a new model trains (nn.Module's default), all of it
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.mapper.modules())
    perturb_trainable(model)
    model.train()
    before = modes(model)
    beams, greedy = answers(model), answers(model, num_beams=1)
    assert answers(model) == beams and answers(model, num_beams=1) == greedy  # dropout off: same answers twice
    probs = model.score_choices(IMAGES, QUESTIONS, CHOICES)
    assert model.score_choices(IMAGES, QUESTIONS, CHOICES) == probs
    features = model.encode_images(IMAGES)
    assert torch.equal(model.encode_images(IMAGES), features)
    batch = model.processor(IMAGES, QUESTIONS, padding_side="left")
    assert [(a.text, a.score) for a in model.generate(**batch, max_new_tokens=4, num_beams=1)] == greedy
    assert modes(model) == before  # every submodule's own mode given back (a frozen encoder stays in eval)
    from prefixvqa.explain import grounding_map
    from prefixvqa.inference import answer_records

    model.mapper.eval()  # a mixed mode: the grounding and evaluation loops give each submodule its own flag back
    mixed = modes(model)
    grounding_map(model, IMAGES[0], QUESTIONS[0], grid=2, max_new_tokens=2)
    rows = answer_records(model, RECORDS[:2], [None, None], 2, {"max_new_tokens": 2}, progress=False)
    assert modes(model) == mixed and len(rows) == 2
    model.train()

    model.save_pretrained(tmp_path / "adapter")
    loaded = MedVQAAdapter.from_pretrained(tmp_path / "adapter")
    assert not any(modes(loaded))  # from_pretrained returns an eval model, as transformers does
    for (text, score), (text2, score2) in zip(beams + greedy, answers(loaded) + answers(loaded, num_beams=1)):
        assert text == text2 and score == pytest.approx(score2, abs=1e-5)
    assert np.allclose(loaded.score_choices(IMAGES, QUESTIONS, CHOICES), probs, atol=1e-6)

    model.eval()  # the caller's eval mode is kept too
    assert answers(model) == beams and not any(modes(model))


# --------------------------------------------------------------------------------------------------------- bf16
def test_after_a_bf16_run_the_in_memory_model_evaluates_at_full_precision_like_the_reloaded_adapter(tiny_decoders,
                                                                                                   tmp_path):
    from prefixvqa.train import TrainConfig, train

    model = MedVQAAdapter.from_preset(PRESET, **tiny_overrides(tiny_decoders["gpt2"]))
    records = colour_records(8)
    result = train(model, records, None, TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4,
                                                    mixed_precision="bf16", **FAST))
    batch = model.processor([r.image for r in records], [r.question for r in records], [r.answer for r in records])

    def eval_loss(m: MedVQAAdapter) -> float:
        m.eval()
        with torch.no_grad():
            return float(m(**batch).loss)

    assert not torch.is_autocast_enabled("cpu")
    reloaded = MedVQAAdapter.from_pretrained(result.last_dir)
    assert eval_loss(model) == pytest.approx(eval_loss(reloaded), abs=1e-6)


# ------------------------------------------------------------------------------------------------------ context
@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory):
    """A tiny GPT-2 with 64 positions: a learned position table that raises IndexError past it."""
    return build_decoder(tmp_path_factory.mktemp("short") / "gpt2", "gpt2", sizes={"n_positions": 64})


@pytest.mark.parametrize("mode", ["lora", "prompt_tuning"])
def test_a_template_longer_than_the_context_is_clamped_and_a_100k_question_trains_and_answers(short_gpt2, tmp_path,
                                                                                             mode, caplog):
    from prefixvqa.train import TrainConfig, train

    over = tiny_overrides(short_gpt2)
    over["template"] = {"max_length": 2048}
    with pytest.warns(UserWarning, match=r"template.max_length=2048 is longer than the decoder's context"):
        model = MedVQAAdapter.from_preset(PRESET, **over, tuning={"mode": mode, "num_virtual_tokens": 10})
    virtual = 10 if mode == "prompt_tuning" else 0
    L = model.processor.image_seq_length
    assert model.config.template.max_length == 64 - virtual - L
    records = colour_records(4)
    records[1].question = "is there a lesion in the image " * 3300  # ~100,000 characters
    assert len(records[1].question) > 100_000
    with caplog.at_level("WARNING"):
        result = train(model, records, None, TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=2,
                                                        **FAST))
    assert result.global_step == 2
    assert f"record {records[1].id}: prompt longer than template.max_length=" in caplog.text
    questions = [r.question for r in records]
    for kw in ({"num_beams": 1}, {"num_beams": 2} if mode == "lora" else {"num_beams": 1}):
        got = model.answer([r.image for r in records], questions, max_new_tokens=200, **kw)
        assert all(a.num_tokens >= 1 for a in got)
    probs = model.score_choices([r.image for r in records], questions, [["red", "blue"]] * 4)
    assert all(abs(sum(p) - 1) < 1e-5 for p in probs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="template.max_length")  # saved clamped: nothing left to clamp
        model.save_pretrained(tmp_path / "adapter")
        MedVQAAdapter.from_pretrained(tmp_path / "adapter").answer([records[1].image], [records[1].question])


def test_a_decoder_context_that_cannot_hold_the_visual_prefix_is_refused(short_gpt2):
    over = tiny_overrides(short_gpt2)
    over["mapper"]["prefix_length"] = 60
    with pytest.raises(ConfigError, match=r"decoder's context \(64 positions\) leaves 4 beside the visual prefix"):
        MedVQAAdapter.from_preset(PRESET, **over)


# ------------------------------------------------------------------------------------------------------- 4-bit
def test_4bit_weights_are_counted_at_their_real_size(tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = build_decoder(tmp_path / "llama", "llama", sizes=QUANT_SIZES["llama"])

    def report(quant: str | None) -> dict:
        over = tiny_overrides(folder)
        over["decoder"]["quantization"] = quant
        return MedVQAAdapter(AdapterConfig().replace(**over)).parameter_report()

    full, packed = report(None), report("4bit")
    assert packed == full
    assert full["decoder"]["total"] > 0


# ------------------------------------------------------------------------------------------------------ seeding
def test_the_api_and_the_recipe_seed_mapper_and_lora_the_same_way(tiny_decoders, tmp_path, monkeypatch):
    from prefixvqa.train import recipe as recipe_mod

    over = tiny_overrides(tiny_decoders["gpt2"])
    random.seed(7)
    torch.manual_seed(7)
    np.random.seed(7)
    states = (random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy())
    first = trained_tensors(MedVQAAdapter.from_preset(PRESET, seed=5, **over))
    torch.manual_seed(123)  # another global state: the build does not depend on it
    second = trained_tensors(MedVQAAdapter(MedVQAAdapter.from_preset(PRESET, **over).config.replace(
        mapper={"in_dim": None, "out_dim": None}), seed=5))
    assert_equal_tensors(first, second)
    assert any("lora_A" in n for n in first)
    with pytest.raises(AssertionError):
        assert_equal_tensors(first, trained_tensors(MedVQAAdapter.from_preset(PRESET, seed=6, **over)))

    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    MedVQAAdapter.from_preset(PRESET, **over)  # the caller's generators are left as they were
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1])
    assert np.array_equal(np.random.get_state()[1], states[2])

    built = {}

    def capture(model, *args, **kwargs):  # the recipe's model, as built, before anything trains
        built["tensors"] = trained_tensors(model)
        return types.SimpleNamespace(best_dir=None, last_dir=None)

    monkeypatch.setattr(recipe_mod, "train", capture)
    recipe = recipe_mod.Recipe(model={"preset": PRESET, "overrides": over},
                               train={"seed": 5, "output_dir": str(tmp_path / "run"), **FAST})
    torch.manual_seed(99)
    recipe_mod.run_recipe(recipe)
    assert_equal_tensors(first, built["tensors"])


def test_a_config_set_on_the_model_reaches_its_processor_as_a_reload_does(tiny_decoders, tmp_path):
    """A curriculum stage sets `model.config` with its own template: the in-memory processor lays prompts out with
    it (opening tokens included), as the processor of the saved and reloaded adapter does."""
    model = MedVQAAdapter.from_preset(PRESET, **tiny_overrides(tiny_decoders["gpt2"]))
    assert model.config.template.name != "plain"
    model.processor.tokenize("is there a lesion?", "yes")  # caches the opening tokens of the old template
    model.config = model.config.replace(template={"name": "plain", "start": "bos"})
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = MedVQAAdapter.from_pretrained(tmp_path / "adapter")
    assert model.processor.template == loaded.processor.template == model.config.template
    assert model.processor.tokenize("is there a lesion?", "yes") == loaded.processor.tokenize("is there a lesion?",
                                                                                                "yes")
    assert model.processor.start_ids == [model.tokenizer.bos_token_id]
    for (text, score), (text2, score2) in zip(answers(model, num_beams=1), answers(loaded, num_beams=1)):
        assert text == text2 and score == pytest.approx(score2, abs=1e-5)
