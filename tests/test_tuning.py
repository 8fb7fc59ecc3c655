"""Tuning modes as registered objects (prefixvqa/tuning.py): tests generated from the registry, and DoRA, the mode
added as one class, through its whole life: train, save, strict reload, peft-only load, merge and export."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.config import PARAM_GROUPS, AdapterConfig, ConfigError
from prefixvqa.generation import lora_merged
from prefixvqa.testing import TINY_ENCODER
from prefixvqa.tuning import TUNING_MODES, TuningMode, UnknownTuningMode, default_groups, get_tuning_mode, register

IMAGES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("L", (40, 40), 90)]
QUESTIONS = ["is there a lesion?", "which side?"]
ANSWERS = ["yes", "left lung"]


def make_config(folder, mode: str, mapper: str = "linear", **extra) -> AdapterConfig:
    cfg = {"encoder": {**TINY_ENCODER, "features": "pooled" if mapper == "mlp" else "patches", "layer": -1},
           "mapper": {"kind": mapper, "prefix_length": 3, "heads": 2, "depth": 2},
           "decoder": {"name": str(folder)}, "tuning": {"mode": mode, "num_virtual_tokens": 2, "dropout": 0.0}}
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return AdapterConfig.from_dict(cfg)


def trainable_groups(model: MedVQAAdapter) -> list[str]:
    return [g for g, params in model.parameter_groups().items() if any(p.requires_grad for _, p in params)]


# --- generated from the registry ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TUNING_MODES)
def test_mode_attributes_are_consistent(name):
    """What a new mode must satisfy to be picked up by every file that asks the object."""
    method = get_tuning_mode(name)
    assert method.name == name and isinstance(method, TuningMode)
    assert set(method.groups) <= set(PARAM_GROUPS) - {"encoder", "mapper"}
    assert method.trains_decoder == ("decoder" in method.groups)
    assert (not method.soft_prompt) or method.uses_peft_files  # soft prompts are peft's
    assert (not method.folds_for_inference) or method.uses_peft_files  # it folds peft's LoRA deltas
    assert (not method.shares_base) or (method.uses_peft_files and not method.trains_decoder)
    assert (not method.soft_prompt) or not method.mergeable  # virtual tokens have no weights to fold into
    assert method.can_follow(method) and method.can_follow(get_tuning_mode("frozen"))
    tuning = make_config("gpt2", name, mapper="mlp").tuning  # the config only; nothing is loaded
    assert tuning.method is method and isinstance(method.describe(tuning), str) and method.describe(tuning)


@pytest.mark.parametrize("name", TUNING_MODES)
@pytest.mark.parametrize("frozen_encoder", [True, False])
def test_default_groups_are_what_a_new_model_trains(tiny_decoders, name, frozen_encoder):
    """`default_groups` (read by fit-check, recipes and the trainer) is exactly what a freshly built model trains."""
    cfg = make_config(tiny_decoders["llama"], name, encoder={"freeze": frozen_encoder})
    model = MedVQAAdapter(cfg)
    assert trainable_groups(model) == default_groups(cfg)
    assert ("encoder" in default_groups(cfg)) == (not frozen_encoder)


def test_unknown_mode_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="tuning.mode='ia4' is not one of"):
        AdapterConfig.from_dict({"tuning": {"mode": "ia4"}})
    with pytest.raises(UnknownTuningMode, match="dora"):
        get_tuning_mode("ia4")


def test_a_mode_registered_elsewhere_is_validated_without_editing_other_files(tiny_decoders):
    """A new mode is one class plus `@register`: config validation, the quantisation rule and the default groups
    pick it up; unregistered, it is unknown again."""

    @register
    class TinyFrozen(TuningMode):
        """A second frozen mode that refuses a quantised base."""

        name = "tiny_frozen_for_test"
        quantisable = False

    try:
        cfg = AdapterConfig.from_dict({"tuning": {"mode": "tiny_frozen_for_test"}})
        assert isinstance(cfg.tuning.method, TinyFrozen) and default_groups(cfg) == ["mapper"]
        with pytest.raises(ConfigError, match="cannot run on a quantized decoder"):
            AdapterConfig.from_dict({"tuning": {"mode": "tiny_frozen_for_test"}, "decoder": {"quantization": "4bit"}})
        model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "tiny_frozen_for_test"))
        assert trainable_groups(model) == ["mapper"]
    finally:
        del TUNING_MODES["tiny_frozen_for_test"]
    with pytest.raises(ConfigError, match="is not one of"):
        AdapterConfig.from_dict({"tuning": {"mode": "tiny_frozen_for_test"}})


# --- DoRA end to end ------------------------------------------------------------------------------------------
def decoder_logits(model: MedVQAAdapter, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decoder(input_ids=ids).logits


def train_steps(model: MedVQAAdapter, steps: int = 12) -> list[float]:
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2: Conv1D weights (fan_in_fan_out); Llama: nn.Linear
def test_dora_trains_saves_reloads_loads_in_peft_alone_and_merges(tiny_decoders, tmp_path, family):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from prefixvqa.export import export_merged, merged_decoder

    torch.manual_seed(0)
    model = MedVQAAdapter(make_config(tiny_decoders[family], "dora"))
    layers = [m for m in model.decoder.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.use_dora["default"] for m in layers)
    magnitude = {id(m): m.lora_magnitude_vector["default"].weight.detach().clone() for m in layers}

    # a few steps: the loss falls, and DoRA's own tensors (the magnitudes) train with the LoRA factors
    losses = train_steps(model)
    assert losses[-1] < losses[0] * 0.7
    assert any(not torch.equal(m.lora_magnitude_vector["default"].weight, magnitude[id(m)]) for m in layers)
    model.eval()

    # the inference paths do not fold DoRA into temporary weights (its magnitude is no additive delta); LoRA's are
    lora = MedVQAAdapter(make_config(tiny_decoders[family], "lora")).eval()
    with torch.no_grad(), lora_merged(model), lora_merged(lora):
        assert not any(m.merged_adapters for m in layers)
        assert all(m.merged_adapters for m in lora.decoder.modules() if isinstance(m, LoraLayer))

    # save -> strict reload: identical outputs
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    with torch.no_grad():
        before = model(**batch).logits
    folder = model.save_pretrained(tmp_path / "adapter")
    loaded = MedVQAAdapter.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded.processor(IMAGES, QUESTIONS, ANSWERS)).logits, before)

    # peft alone (no prefixvqa code) reads the folder's decoder part and computes the same logits
    ids = model.tokenizer("is there a lesion in the left lung", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_decoders[family]))
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, decoder_logits(model, ids))

    # merging folds DoRA exactly as peft's own merge_and_unload does, and the plain model computes the same
    merged = merged_decoder(model, torch.float32)
    reference = copy.deepcopy(model.decoder).merge_and_unload()
    ours, theirs = merged.state_dict(), reference.state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, decoder_logits(model, ids), rtol=1e-4, atol=1e-5)

    # export --merge: a frozen plain-transformers adapter with the same supervised logits
    out, caveat = export_merged(model, tmp_path / "merged")
    assert caveat is None
    exported = MedVQAAdapter.from_pretrained(out).eval()
    assert not exported.config.tuning.method.uses_peft_files and not (out / "adapter_model.safetensors").exists()
    with torch.no_grad():
        got = exported(**exported.processor(IMAGES, QUESTIONS, ANSWERS)).logits
    torch.testing.assert_close(got, before, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(str(out / "decoder")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, decoder_logits(model, ids), rtol=1e-4, atol=1e-5)


def test_soft_prompts_are_refused_by_export_through_the_attribute(tiny_decoders, tmp_path):
    from prefixvqa.export import export_merged

    for name, method in TUNING_MODES.items():
        if method.mergeable:
            continue
        model = MedVQAAdapter(make_config(tiny_decoders["llama"], name))
        with pytest.raises(ConfigError, match="soft prompts" if method.soft_prompt else "plain decoder weights"):
            export_merged(model, tmp_path / name)
