"""Every preset builds offline with tiny overrides; a full-size preset fails fast naming what it needs."""

import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.presets import list_presets, preset_config, preset_info
from prefixvqa.testing import tiny_overrides
from prefixvqa.vision import ModelNotAvailableError

PUBLISHED = {"van_sonsbeek_gpt2xl", "van_sonsbeek_biogpt", "van_sonsbeek_biomedlm", "clipcap_gpt2", "llava_med_7b",
             "llava_rad_7b", "medvint_td_7b", "med_flamingo_resampler_7b", "demo_smollm2"}


def test_presets_listed():
    assert PUBLISHED <= set(MedVQAAdapter.list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds_tiny(name, tiny_decoders):
    info = preset_info(name)
    model = MedVQAAdapter.from_preset(name, **tiny_overrides(tiny_decoders[info["family"]]))
    full = preset_config(name)
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
