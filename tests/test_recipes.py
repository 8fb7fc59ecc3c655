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


# ------------------------------------------------------------------------------------- bounded input (issue 18)
def _alias_bomb(levels: int, section: str = "data") -> str:
    """A recipe whose `section` holds a YAML alias bomb: each level repeats the one before 9 times."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    body = "\n".join("    " + line for line in lines)
    return f"model: {{tiny: gpt2}}\n{section}:\n  train:\n    format: synthetic\n{body}\n"


def test_a_small_alias_bomb_is_one_short_line_naming_the_key(tmp_path, capsys):
    """430 bytes that expand to 600,000 values: refused at load, naming the key, in one short line."""
    from prefixvqa.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(6) + "# " + "padding " * 6 + "\n")
    assert len(path.read_bytes()) <= 430
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 300, err[:1][0][:300]
    assert "data.train.a5 expands to 597,871 values through YAML aliases" in err[0]


def test_a_nine_level_alias_bomb_is_refused_quickly_within_bounded_memory(tmp_path):
    """Nine levels (387 million values) under a 1 GB address-space allowance: refused in seconds, one line."""
    import subprocess
    import sys
    import time

    from helpers import subprocess_env

    path = tmp_path / "bomb9.yaml"
    path.write_text(_alias_bomb(9))
    driver = ("import re, resource, sys\n"
              "import prefixvqa.train.recipe\n"
              "from prefixvqa.cli import main\n"
              "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
              "sys.exit(main(['train', sys.argv[1]]))\n")
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", driver, str(path)], capture_output=True, text=True, timeout=300,
                         env=subprocess_env(), cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-1500:]
    line = run.stderr.strip().splitlines()[-1]
    assert len(line) < 300 and "data.train.a8 expands to" in line and "at most 10,000" in line
    assert time.time() - t0 < 120 and not (tmp_path / "runs").exists()  # refused before the output folder is made


@pytest.mark.parametrize("text", [
    "train: {epochs: *x3}", "train: {mixed_precision: *x3}", "train: {lr: {mapper: *x3}}", "train: {trainable: *x3}",
    "model: *x3", "data: *x3", "data: {train: {format: synthetic}, *x3 : 1}", "stages: [{name: *x3}]",
    "stages: [{name: *x3, epochs: 0}]", "stages: [{name: a, start_from: *x3}]", "train: *x3", "train: {lr: *x3}",
])
def test_values_in_recipe_errors_are_shortened(tmp_path, text):
    """A value just under the alias budget (7,381 values) or a 1 MB string, named in a validation error: one short
    line."""
    from prefixvqa.config import ConfigError

    bomb = ("x0: &x0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"x{i}: &x{i} [{','.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 4)))
    for value in (bomb, f"x3: &x3 '{'y' * 1_000_000}'\n")[:1 if text == "stages: [{name: *x3}]" else 2]:
        path = tmp_path / "r.yaml"
        path.write_text("description: {" + value.replace("\n", ", ").rstrip(", ") + "}\n" + text + "\n")
        with pytest.raises((ConfigError, __import__("yaml").YAMLError)) as caught:
            load_recipe(path)
        message = str(caught.value)
        assert len(message) < 700 and "\n" not in message.strip(), message[:700]


def test_a_synthetic_data_spec_error_is_shortened():
    from prefixvqa.data.records import DataError
    from prefixvqa.train.recipe import load_split

    big = [["lol"] * 9] * 900
    with pytest.raises(DataError, match="synthetic data spec") as caught:
        load_split({"format": "synthetic", "n": 2, "junk": big})
    assert len(str(caught.value)) < 400


def test_training_into_the_adapter_folder_it_starts_from_is_refused(tmp_path, capsys):
    """Output folder = the adapter folder (or a folder inside it): refused for that reason, before the lock file or
    any checkpoint is written into the adapter, which stays loadable."""
    import yaml

    from prefixvqa.cli import main
    from prefixvqa.fileio import verify_manifest
    from prefixvqa.train.recipe import build_model

    adapter = tmp_path / "adapter"
    build_model({"tiny": "gpt2"}, tmp_path).save_pretrained(adapter)
    before = sorted(p.name for p in adapter.rglob("*"))
    for out, word in ((adapter, "is"), (adapter / "run2", "lies inside"), (tmp_path / "." / "adapter", "is")):
        path = tmp_path / "continue.yaml"
        path.write_text(yaml.safe_dump({"model": {"adapter": str(adapter)},
                                        "data": {"train": {"format": "synthetic", "n": 4}},
                                        "train": {"output_dir": str(out), "epochs": 1, "progress": False}}))
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"prefixvqa train: error: train.output_dir {out} {word} the adapter folder the run starts "
                       f"from (model.adapter={adapter}): the run would write into it; choose another "
                       f"output_dir"), err
        assert sorted(p.name for p in adapter.rglob("*")) == before  # no lock file, no run2/
        verify_manifest(adapter)
