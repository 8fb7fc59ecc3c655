"""One adapter-folder reader and one feature-cache key rule (issue 22, items 3 and 4).

* An adapter written by a newer minor release loads the same way (same warning, same tensors) through the API
  (`from_pretrained`), the web app's `AdapterSet` (directly and from a hub) and resume (`load_weights_into`, what the
  trainer calls); a newer major release is refused by all of them with the same error.
* `prefixvqa cache-features` on an adapter whose encoder was trained never writes into the base encoder's namespace,
  and a later frozen-encoder run never reads those features.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa._version import __version__
from prefixvqa.adapter_io import CONFIG_NAME, AdapterFolder, AdapterLoadError
from prefixvqa.config import AdapterConfig
from prefixvqa.fileio import write_manifest
from prefixvqa.testing import tiny_overrides

IMAGES = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
QUESTIONS = ["is there a lesion?", "which organ?"]


def _bump(version: str, part: int) -> str:
    """This package's version with its major (0) or minor (1) number raised by one."""
    numbers = [int(x) for x in version.split(".")[:3]] + [0] * (3 - len(version.split(".")[:3]))
    numbers[part] += 1
    return ".".join(str(n) for n in numbers[:part + 1] + [0] * (2 - part))


NEWER_MINOR, NEWER_MAJOR = _bump(__version__, 1), _bump(__version__, 0)


def _perturbed(cfg: AdapterConfig, seed: int, encoder: bool = False) -> MedVQAAdapter:
    """A model with trained-looking weights (LoRA B starts at zero: untouched, an adapter would equal its base)."""
    model = MedVQAAdapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    groups = model.parameter_groups()
    with torch.no_grad():
        for _, p in groups["lora"] + groups["mapper"] + (groups["encoder"] if encoder else []):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_decoders):
    """Two LoRA adapters on one tiny base (one of them written again as if by newer releases)."""
    root = tmp_path_factory.mktemp("adapter_io")
    cfg = AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"]))
    first = _perturbed(cfg, 1).save_pretrained(root / "first")
    second = _perturbed(cfg, 2).save_pretrained(root / "second")
    return {"root": root, "cfg": cfg, "first": first, "second": second}


def as_if_written_by(folder: Path, version: str, where: Path) -> Path:
    """A copy of ``folder`` whose config says another prefixvqa wrote it, with a field this version does not know
    (a newer minor release may add optional fields); the manifest is rewritten, so the copy verifies."""
    copy = where / f"{folder.name}-v{version}"
    shutil.copytree(folder, copy)
    data = json.loads((copy / CONFIG_NAME).read_text())
    data["version"] = version
    data["mapper"]["future_option"] = 1
    (copy / CONFIG_NAME).write_text(json.dumps(data))
    write_manifest(copy)
    return copy


def warned(call, *args, **kwargs):
    """(result, the UserWarning messages the call gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def peft_state(decoder, name: str = "default") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(decoder, adapter_name=name)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def version_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "written by prefixvqa" in m]


def test_newer_minor_release_loads_the_same_through_api_app_and_resume(saved, tmp_path):
    from prefixvqa.adapter_set import AdapterSet
    from prefixvqa.adapter_io import load_weights_into

    newer = as_if_written_by(saved["second"], NEWER_MINOR, tmp_path)
    api, api_warn = warned(MedVQAAdapter.from_pretrained, newer)
    expected = version_warnings(api_warn)
    assert len(expected) == 1 and f"written by prefixvqa {NEWER_MINOR}, newer than this prefixvqa" in expected[0]
    assert "mapper.future_option" in expected[0]

    group = AdapterSet.load(saved["first"], name="first")  # the app's set: `add` reads the folder for `serve`
    name, app_warn = warned(group.add, newer, name="newer")
    assert version_warnings(app_warn) == expected
    slot = group.slots[name]
    assert_same(slot.mapper.state_dict(), api.mapper.state_dict())
    assert_same(peft_state(group.model.decoder, slot.peft_name), peft_state(api.decoder))
    assert slot.config == api.config
    answers = [(a.text, round(a.score, 4)) for a in group.answer(name, IMAGES, QUESTIONS, max_new_tokens=3)]
    assert answers == [(a.text, round(a.score, 4)) for a in api.answer(IMAGES, QUESTIONS, max_new_tokens=3)]
    with group.using(name) as active:  # the slot's processor knows the decoder's context as the API model's does
        assert (active.processor.context_length, active.processor.answer_room) == \
            (api.processor.context_length, api.processor.answer_room) and api.processor.context_length

    resumed = MedVQAAdapter(saved["cfg"])  # resume: the run's own model, the checkpoint's trained tensors
    _, resume_warn = warned(load_weights_into, resumed, newer)
    assert version_warnings(resume_warn) == expected
    assert_same(resumed.mapper.state_dict(), api.mapper.state_dict())
    assert_same(peft_state(resumed.decoder), peft_state(api.decoder))


def test_newer_minor_release_joins_the_app_from_a_hub(saved, tmp_path):
    from prefixvqa.app import load_adapters
    from prefixvqa.hub import Hub

    newer = as_if_written_by(saved["second"], NEWER_MINOR, tmp_path)
    hub = Hub(tmp_path / "hub")
    ref = hub.push(newer, name="newer")
    assert hub.missing_bases(hub.entry(ref)[2]) == ""  # an unknown field is not a missing base model
    adapters, messages = warned(load_adapters, str(saved["first"]), str(tmp_path / "hub"))
    assert ref in adapters.names
    assert any(f"written by prefixvqa {NEWER_MINOR}, newer than" in m for m in messages)


def test_newer_major_release_is_refused_the_same_way_everywhere(saved, tmp_path):
    from prefixvqa.adapter_set import AdapterSet
    from prefixvqa.adapter_io import load_weights_into

    newer = as_if_written_by(saved["second"], NEWER_MAJOR, tmp_path)
    errors = []
    group = AdapterSet.load(saved["first"], name="first")
    for call in (lambda: MedVQAAdapter.from_pretrained(newer), lambda: group.add(newer, name="newer"),
                 lambda: load_weights_into(MedVQAAdapter(saved["cfg"]), newer)):
        with pytest.raises(AdapterLoadError, match=f"written by prefixvqa {NEWER_MAJOR}, a newer major version") as e:
            call()
        errors.append(str(e.value))
    assert len(set(errors)) == 1, errors
    assert group.names == ["first"]


def test_every_loader_checks_the_manifest(saved, tmp_path):
    from prefixvqa.adapter_set import AdapterSet
    from prefixvqa.adapter_io import load_weights_into

    damaged = tmp_path / "damaged"
    shutil.copytree(saved["second"], damaged)
    data = bytearray((damaged / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "adapter_model.safetensors").write_bytes(bytes(data))
    group = AdapterSet.load(saved["first"], name="first")
    for call in (lambda: MedVQAAdapter.from_pretrained(damaged), lambda: group.add(damaged, name="damaged"),
                 lambda: load_weights_into(MedVQAAdapter(saved["cfg"]), damaged)):
        with pytest.raises(AdapterLoadError, match="adapter_model.safetensors does not match its sha256"):
            call()


def test_the_set_loads_strictly(saved, tiny_decoders, tmp_path):
    """A folder whose tensors do not fit is refused by the set as by from_pretrained, and nothing is half added."""
    from prefixvqa.adapter_set import AdapterSet

    other = AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"]), tuning={"r": 4})
    folder = _perturbed(other, 3).save_pretrained(tmp_path / "r4")
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["tuning"]["r"] = 8  # the config no longer matches the saved LoRA tensors
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    write_manifest(folder)
    group = AdapterSet.load(saved["first"], name="first")
    peft_names = set(group.model.decoder.peft_config)
    with pytest.raises(AdapterLoadError, match="r=4 but the config builds r=8"):
        MedVQAAdapter.from_pretrained(folder)
    with pytest.raises(AdapterLoadError, match="r=4 but the config builds r=8"):
        group.add(folder, name="r4")
    assert set(group.model.decoder.peft_config) == peft_names and group.names == ["first"]
    assert AdapterFolder.open(folder).config.tuning.r == 8


# ------------------------------------------------------------------------------------------------ feature cache
def test_cache_features_of_a_trained_encoder_never_meet_the_base_encoders(saved, tiny_decoders, tmp_path, capsys):
    from prefixvqa.cli import main
    from prefixvqa.data.cache import FeatureCache, cache_features, encoder_key
    from prefixvqa.data.synthetic import colour_records
    from prefixvqa.fewshot import feature_cache

    over = tiny_overrides(tiny_decoders["gpt2"])
    trained_cfg = AdapterConfig().replace(**{**over, "encoder": {**over["encoder"], "freeze": False}})
    folder = _perturbed(trained_cfg, 4, encoder=True).save_pretrained(tmp_path / "trained-encoder")
    root, records = tmp_path / "features", colour_records(4)
    lines = []
    for r in records:
        (tmp_path / f"{r.id}.png").write_bytes(r.image)
        lines.append(json.dumps({"id": r.id, "image": str(tmp_path / f"{r.id}.png"), "question": r.question,
                                 "answer": r.answer}) + "\n")
    (tmp_path / "data.jsonl").write_text("".join(lines))
    assert main(["cache-features", "--adapter", str(folder), "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(root)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cached"] == 4 and stats["reused"] == 0

    frozen = MedVQAAdapter(saved["cfg"])  # the same base encoder, untouched
    base = FeatureCache.for_model(frozen, root)
    assert Path(stats["root"]) != base.dir and len(base) == 0  # nothing written under the base encoder's key
    trained = MedVQAAdapter.from_pretrained(folder)
    assert encoder_key(trained) != frozen.base_fingerprints["encoder"] == encoder_key(frozen)
    assert feature_cache(trained, root).dir == Path(stats["root"])  # few-shot and the CLI: one rule
    again = cache_features(frozen, records, root)  # a later frozen-encoder run encodes afresh
    assert again["reused"] == 0 and again["cached"] == 4 and again["root"] == str(base.dir)
    with torch.no_grad():
        want = frozen.encode_pixels(torch.stack([frozen.processor.transform(frozen.processor.load_record_image(r))
                                                 for r in records])).numpy()
    feats, kept = base.features(frozen, records)
    assert kept == [0, 1, 2, 3] and torch.allclose(feats, torch.from_numpy(want), atol=1e-5)


def test_an_encoder_trained_then_frozen_is_not_the_base_encoder(saved, tmp_path):
    """A curriculum may freeze an encoder an earlier stage trained: `changed_parts` keeps it off the base key."""
    from prefixvqa.data.cache import FeatureCache, encoder_key

    model = MedVQAAdapter(saved["cfg"])
    base = encoder_key(model)
    model.set_trainable("encoder", "mapper")
    model.freeze_encoder(True)
    assert model.config.encoder.freeze and encoder_key(model) != base
    assert FeatureCache.for_model(model, tmp_path).encoder_fingerprint != base
