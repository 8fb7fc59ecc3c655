"""Every recipe in recipes/: it parses, its header documents it, its data specs name real formats, and its `smoke:`
override trains + evaluates offline (tiny models, a handful of generated records) into a reloadable adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from prefixvqa.train.recipe import load_recipe, run_recipe  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
IDS = [p.stem for p in RECIPES]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.plot=false"]


def _data_specs(recipe):
    yield from recipe.data.values()
    for stage in recipe.stages or []:
        yield from (stage.get("data") or {}).values()


def test_recipes_exist():
    names = set(IDS)
    for expected in ("van_sonsbeek_slake", "van_sonsbeek_pathvqa", "van_sonsbeek_vqa_rad",
                     "van_sonsbeek_slake_gpt2xl_2080ti", "clipcap_captioning", "llava_med_curriculum",
                     "llava_rad_reports", "medvint_td_pmc_vqa", "mistral_7b_qlora_2080ti", "demo"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_parses_and_is_documented(path):
    from prefixvqa.data.readers import READERS
    from prefixvqa.presets import preset_config

    text = path.read_text()
    header = text.split("\nmodel:")[0]
    assert header.startswith("#") and "prefixvqa train recipes/" in header and "smoke:" in header
    assert "GPU" in header and "Data layout" in header
    recipe = load_recipe(path)
    assert recipe.smoke and recipe.smoke.get("model.tiny")
    if recipe.model.get("preset"):
        preset_config(recipe.model["preset"])
    for spec in _data_specs(recipe):
        if isinstance(spec, dict):
            assert spec["format"] == "synthetic" or spec["format"] in READERS, spec
    load_recipe(path, ["train.epochs=2"]).with_sets(recipe.smoke)  # the smoke variant validates too


def _smoke(path, tmp_path, sets=(), tiny=None):
    from prefixvqa.model import MedVQAAdapter

    recipe = load_recipe(path, [f"train.output_dir={tmp_path}", *QUIET, *sets])
    if tiny:
        recipe.smoke["model.tiny"] = tiny
    from prefixvqa.rng import rng_state

    before = rng_state()
    result = run_recipe(recipe, smoke=True)
    assert rng_state() == before  # the caller's python/numpy/torch generators are left as they were
    assert result.final_dir is not None and result.final_dir.is_dir()
    assert (result.final_dir / "prefixvqa_config.json").is_file()
    assert (result.final_dir / "mapper.safetensors").is_file()
    for name, stage in result.stages.items():
        assert stage.stopped_reason == "completed", (name, stage.stopped_reason)
    final_stage = list(result.stages)[-1]  # curriculum stages before the last may have no eval data (align)
    assert any(row["kind"] == "eval" for row in result.stages[final_stage].history), "smoke run did not evaluate"
    reloaded = MedVQAAdapter.from_pretrained(result.final_dir)
    assert reloaded.config.template.name == result.model.config.template.name
    return result


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "llava_med_curriculum"],
                         ids=[i for i in IDS if i != "llava_med_curriculum"])
def test_recipe_smoke_trains_evaluates_and_reloads(path, tmp_path):
    _smoke(path, tmp_path)


@pytest.mark.slow
def test_llava_med_curriculum_runs_all_three_stages(tmp_path):
    path = next(p for p in RECIPES if p.stem == "llava_med_curriculum")
    result = _smoke(path, tmp_path)
    assert list(result.stages) == ["align", "instruct", "vqa"]
    for name in ("align", "instruct", "vqa"):
        assert (tmp_path / name / "last" / "prefixvqa_config.json").is_file()
    assert result.final_dir == tmp_path / "vqa" / "best"
    assert [r["metric"] for r in result.stages["vqa"].history if r["kind"] == "eval"] == ["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("preset,tiny", [("van_sonsbeek_biogpt", "biogpt"), ("van_sonsbeek_biomedlm", "gpt2")])
def test_van_sonsbeek_decoder_variants(preset, tiny, tmp_path):
    """The documented decoder variants (`--set model.preset=...`) of the van Sonsbeek recipes."""
    path = next(p for p in RECIPES if p.stem == "van_sonsbeek_slake")
    recipe = load_recipe(path, [f"model.preset={preset}"])
    assert recipe.model["preset"] == preset
    result = _smoke(path, tmp_path, [f"model.preset={preset}"], tiny=tiny)
    assert result.model.config.template.name == "prefix_vqa"
