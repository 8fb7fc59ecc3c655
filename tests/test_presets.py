"""Every preset builds offline with tiny overrides; a full-size preset fails fast naming what it needs."""

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa import prompts
from prefixvqa.mappers import MAPPERS
from prefixvqa.presets import list_presets, preset_config, preset_info, presets_table
from prefixvqa.testing import tiny_overrides
from prefixvqa.vision import ModelNotAvailableError
from prompt_reference import render

PUBLISHED = {"van_sonsbeek_gpt2xl", "van_sonsbeek_biogpt", "van_sonsbeek_biomedlm", "clipcap_gpt2", "clipcap_gpt2_mlp",
             "llava_med_7b",
             "llava_rad_7b", "medvint_td_7b", "med_flamingo_resampler_7b", "demo_smollm2"}


def test_presets_listed():
    assert PUBLISHED <= set(MedVQAAdapter.list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds_tiny(name, tiny_decoders):
    info = preset_info(name)
    full = preset_config(name)
    over = tiny_overrides(tiny_decoders[info["family"]])
    if MAPPERS[full.mapper.kind].pools_grid:  # the tiny tower's 4 x 4 patch grid pools to 2 x 2 tokens
        over["mapper"]["prefix_length"] = 4
    model = MedVQAAdapter.from_preset(name, **over)
    assert (model.config.mapper.kind, model.config.tuning.mode, model.config.template.name) == \
           (full.mapper.kind, full.tuning.mode, full.template.name)
    out = model(**model.processor([Image.new("RGB", (32, 32))], ["is there a lesion?"], ["no"]))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", sorted(PUBLISHED - {"demo_smollm2"}))
def test_full_size_preset_fails_fast_offline(name):
    cfg = preset_config(name)
    with pytest.raises(ModelNotAvailableError) as err:
        MedVQAAdapter(cfg)
    assert cfg.decoder.name in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="available"):
        MedVQAAdapter.from_preset("nope")


SOURCED = [name for name in list_presets() if preset_info(name).get("source")]


def test_every_published_preset_names_its_source():
    assert PUBLISHED - {"demo_smollm2"} <= set(SOURCED) | {"mistral_7b_qlora_2080ti"}
    assert {"clipcap_gpt2_mlp", "van_sonsbeek_biogpt", "medvint_td_7b", "med_flamingo_resampler_7b"} <= set(SOURCED)


#: parameter counts of each source's mapper, from the issue and the upstream code (not from the preset files)
PUBLISHED_PARAMS = {"van_sonsbeek_gpt2xl": 249.1e6, "van_sonsbeek_biogpt": 102.8e6, "van_sonsbeek_biomedlm": 634.4e6,
                    "medvint_td_7b": 131.3e6, "med_flamingo_resampler_7b": 63.0e6, "clipcap_gpt2": 53.6e6,
                    "clipcap_gpt2_mlp": 31.5e6, "llava_med_7b": 4.2e6, "llava_rad_7b": 19.9e6,
                    "llava_med_v15_mistral_7b": 20.98e6, "llava_rad": 19.9e6,
                    "medgemma_4b_it": 2.95e6}  # 1152 x 2560 projection + 1152 norm (Gemma3MultiModalProjector)  # 1024 -> 4096 -> 4096 (mlp2x_gelu, CLIP-L to Mistral)
#: each source's format, written out from its code (LLaVA-Med train.py v0, LLaVA-Rad conv_vicuna_v1, Med-Flamingo
#: demo.py, van Sonsbeek vqaloader.py, MedVInT PMC_QA_Dataset.py); <image> marks the visual prefix
SOURCE_FORMATS = {
    "llava_med_v1": ("Q?", "A", (), "A chat between a curious human and an artificial intelligence assistant. The "
                     "assistant gives helpful, detailed, and polite answers to the human's questions.\n\n### Human: "
                     "<image>\nQ?\n### Assistant: A\n###"),
    "vicuna_v1": ("Q?", "A", (), "A chat between a curious user and an artificial intelligence assistant. The "
                  "assistant gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nQ? "
                  "ASSISTANT: A"),
    "med_flamingo": ("Q2?", "a2", (("Q1?", "a1"),), "You are a helpful medical assistant. You are being provided with "
                     "images, a question about the image and an answer. Follow the examples and answer the last "
                     "question. <image>Question: Q1? Answer: a1.<|endofchunk|><image>Question: Q2? Answer: "
                     "a2.<|endofchunk|>"),
    "prefix_vqa": ("Q?", "A", (), "question: Q? context:<image>answer A"),
}


def test_published_parameter_counts_are_the_sources():
    assert set(PUBLISHED_PARAMS) == set(SOURCED)
    for name, count in PUBLISHED_PARAMS.items():
        assert abs(preset_info(name)["source"]["mapper_params"] - count) <= 0.005 * count, name  # pins: 3-4 digits


@pytest.mark.parametrize("template", sorted(SOURCE_FORMATS))
def test_template_is_its_source_format(template):
    question, answer, shots, expected = SOURCE_FORMATS[template]
    position = "after_question" if template == "prefix_vqa" else "before_question"
    text = render(template, question, answer=answer, shots=shots, position=position)
    assert text.replace(prompts.IMAGE, "<image>") == expected


@pytest.mark.parametrize("name", SOURCED)
def test_full_size_mapper_has_the_published_parameter_count(name):
    """Built alone at the real encoder/decoder widths (on the meta device: no memory), the mapper has its source's
    parameter count, plus only what the preset declares it adds (within 1%)."""
    import open_clip

    from prefixvqa.mappers import build_mapper

    cfg, src = preset_config(name), preset_info(name)["source"]
    own = cfg.encoder.backend == "open_clip" and not cfg.encoder.name.startswith("hf-hub:")
    vision = open_clip.get_model_config(cfg.encoder.name) if own else None
    if vision:  # the stated encoder width is open_clip's own
        want = vision["embed_dim"] if cfg.encoder.features == "pooled" else vision["vision_cfg"]["width"]
        assert src["encoder_width"] == want
    mapper_cfg = dataclasses.replace(cfg.mapper, in_dim=src["encoder_width"], out_dim=src["decoder_width"])
    with torch.device("meta"):
        mapper = build_mapper(mapper_cfg, cfg.template.image_start_end)
    count = sum(p.numel() for p in mapper.parameters())
    expected = src["mapper_params"] + sum(src.get("added_params", {}).values())
    assert abs(count - expected) <= 0.01 * expected, (count, expected)


@pytest.mark.parametrize("name", SOURCED)
def test_template_renders_its_source_format_character_for_character(name):
    cfg, example = preset_config(name), preset_info(name)["example"]
    t = cfg.template
    text = render(t.name, example["question"], answer=example["answer"], position=t.image_position,
                  system=t.system, shots=[tuple(s) for s in example.get("shots", [])],
                  choices=example.get("choices", ()))
    assert text.replace(prompts.IMAGE, "<image>") == example["rendered"]


def test_readme_table_of_presets_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert presets_table() in readme, "README's preset table is stale: paste prefixvqa.presets.presets_table()"
