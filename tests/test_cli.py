"""The command line: help, one-line errors, and answering with a saved adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from prefixvqa import MedVQAAdapter
from prefixvqa.cli import main
from prefixvqa.config import AdapterConfig
from prefixvqa.testing import TINY_ENCODER


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "prefixvqa.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "cache-features", "answer", "eval", "sweep", "demo"):
        assert command in out.stdout


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["answer", "--adapter", str(tmp_path / "none"), "--image", "x.png", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "adapter folder not found" in err


def test_answer_and_choices(tiny_decoders, tmp_path, capsys):
    cfg = AdapterConfig.from_dict({"encoder": TINY_ENCODER, "decoder": {"name": str(tiny_decoders["gpt2"])}})
    folder = MedVQAAdapter(cfg).save_pretrained(tmp_path / "a")
    Image.new("L", (40, 40), 100).save(tmp_path / "x.png")
    assert main(["answer", "--adapter", str(folder), "--image", str(tmp_path / "x.png"), "is it?",
                 "--max-new-tokens", "2"]) == 0
    assert main(["answer", "--adapter", str(folder), "--image", str(tmp_path / "x.png"), "is it?",
                 "--choices", "yes,no"]) == 0
    out = capsys.readouterr().out
    assert "yes" in out and "no" in out
    assert main(["presets"]) == 0 and "demo_smollm2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- one-line errors
def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code)


RECIPE = {"model": {"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}},
          "data": {"train": {"format": "synthetic", "n": 4}},
          "train": {"epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False, "plot": False}}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _damage(folder: Path, how: str) -> Path:
    """A copy of the adapter without its manifest (saved before manifests existed) and one file damaged."""
    import shutil

    copy = folder.parent / f"{folder.name}-{how}"
    shutil.copytree(folder, copy)
    (copy / "manifest.sha256.json").unlink()
    file = copy / "mapper.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if how == "truncated" else b"\xff" * 8 + data[8:])
    return copy


def _newer(folder: Path, version: str) -> Path:
    import shutil

    copy = folder.parent / f"{folder.name}-v{version}"
    shutil.copytree(folder, copy)
    (copy / "manifest.sha256.json").unlink()
    cfg = json.loads((copy / "prefixvqa_config.json").read_text())
    (copy / "prefixvqa_config.json").write_text(json.dumps({**cfg, "version": version}))
    return copy


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_decoders):
    root = tmp_path_factory.mktemp("cli")
    cfg = AdapterConfig.from_dict({"encoder": TINY_ENCODER, "decoder": {"name": str(tiny_decoders["gpt2"])}})
    adapter = MedVQAAdapter(cfg).save_pretrained(root / "adapter")
    Image.new("L", (40, 40), 100).save(root / "x.png")
    recipe = _write(root / "recipe.yaml", yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"],
                                                                             "output_dir": str(root / "run")}}))
    curriculum = {**RECIPE, "train": {**RECIPE["train"], "output_dir": str(root / "cur")},
                  "stages": [{"name": "first"},
                             {"name": "second", "data": {"train": {"format": "generic",
                                                                   "path": str(root / "missing.jsonl")}}}]}
    return {"root": root, "adapter": adapter, "image": root / "x.png", "recipe": recipe,
            "curriculum": _write(root / "curriculum.yaml", yaml.safe_dump(curriculum)),
            "broken_yaml": _write(root / "broken.yaml", "train:\n  epochs: 2\n  lr: {mapper: 1.0e-3\n"),
            "python_tag": _write(root / "tag.yaml", "train: !!python/object/apply:os.system ['echo pwned']\n"),
            "yaml_lr": _write(root / "lr.yaml", yaml.safe_dump({**RECIPE, "train": {"lr": {"mapper": "fast"}}})),
            "not_json": _write(root / "metrics.txt", "accuracy: 0.5\n")}


# (name, argv built from the fixture, text the one error line must contain)
CLI_ERRORS = [
    ("yaml syntax", lambda e: ["train", str(e["broken_yaml"])], "broken.yaml: line 4"),
    ("python tag", lambda e: ["train", str(e["python_tag"])], "tag.yaml: line 1, column 8: could not determine a "
                                                              "constructor for the tag 'tag:yaml.org,2002:python"),
    ("set wrong type", lambda e: ["train", str(e["recipe"]), "--set", "train.epochs=abc"],
     "--set train.epochs='abc': expected an integer"),
    ("set unknown key", lambda e: ["train", str(e["recipe"]), "--set", "train.epoch=3"], "unknown field(s) ['epoch']"),
    ("set unknown section", lambda e: ["train", str(e["recipe"]), "--set", "trian.epochs=3"],
     "unknown top-level key(s) ['trian']"),
    ("set bad yaml", lambda e: ["train", str(e["recipe"]), "--set", "train.lr={mapper: 1"],
     "--set train.lr: '{mapper: 1' is not a valid YAML value"),
    ("non-numeric lr", lambda e: ["train", str(e["recipe"]), "--set", "train.lr.mapper=fast"],
     "--set train.lr.mapper='fast': expected a number"),
    ("non-numeric lr in yaml", lambda e: ["train", str(e["yaml_lr"])], "train.lr.mapper='fast': expected a number"),
    ("unknown data-spec key", lambda e: ["train", str(e["recipe"]), "--set", "data.train.colour=red"],
     "synthetic data spec"),
    ("unknown reader key", lambda e: ["cache-features", "--preset", "demo_smollm2", "--out", str(e["root"] / "c"),
                                      "--data", json.dumps({"format": "slake", "path": "x", "langs": "en"})],
     "dataset spec for format 'slake': unknown key(s) ['langs']"),
    ("unknown data section", lambda e: ["train", str(e["recipe"]), "--set", "data.validation=x"],
     "recipe data: unknown key(s) ['validation']"),
    ("recipe is a folder", lambda e: ["train", str(e["root"])], "is a folder"),
    ("later stage's data", lambda e: ["train", str(e["curriculum"])], "missing.jsonl"),
    ("damaged safetensors", lambda e: ["answer", "--adapter", str(_damage(e["adapter"], "header")), "--image",
                                       str(e["image"]), "q"], "mapper.safetensors is damaged or truncated"),
    ("truncated safetensors", lambda e: ["answer", "--adapter", str(_damage(e["adapter"], "truncated")), "--image",
                                         str(e["image"]), "q"], "mapper.safetensors is damaged or truncated"),
    ("newer major version", lambda e: ["answer", "--adapter", str(_newer(e["adapter"], "9.0.0")), "--image",
                                       str(e["image"]), "q"], "written by prefixvqa 9.0.0, a newer major version"),
    ("num beams 0", lambda e: ["answer", "--adapter", str(e["adapter"]), "--image", str(e["image"]), "q",
                               "--num-beams", "0"], "argument --num-beams: must be >= 1, got 0"),
    ("cache without data", lambda e: ["cache-features", "--preset", "demo_smollm2", "--out", str(e["root"] / "c")],
     "the following arguments are required: --data"),
    ("unknown protocol", lambda e: ["eval", "--adapter", str(e["adapter"]), "--data", "x.jsonl", "--protocol",
                                    "nope"], "argument --protocol: unknown protocol 'nope'"),
    ("bad data json", lambda e: ["cache-features", "--preset", "demo_smollm2", "--out", str(e["root"] / "c"),
                                 "--data", '{"format": "slake", path}'], "--data is neither a path nor valid JSON"),
    ("compare non-json", lambda e: ["eval", "--compare", str(e["not_json"])], "metrics.txt is not a metrics JSON file"),
    ("bad train sizes", lambda e: ["sweep", str(e["recipe"]), "--train-sizes", "16,lots"],
     "argument --train-sizes: 'lots' in '16,lots'"),
]


@pytest.mark.parametrize("name,argv,expected", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_user_errors_are_one_line_exit_2_naming_the_thing(cli_env, capsys, name, argv, expected):
    code = run_cli(argv(cli_env))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("prefixvqa")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    if name == "later stage's data":
        assert not (cli_env["root"] / "cur" / "first").exists()  # refused before the first stage trained


def test_disk_full_while_saving_is_one_line_naming_the_folder(cli_env, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = cli_env["root"] / "run"
    assert run_cli(["train", str(cli_env["recipe"])]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("prefixvqa train: error:") and "No space left on device" in line and str(out) in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and not (out / "prefixvqa.lock").exists()


def test_set_values_follow_the_field_types(tmp_path):
    from prefixvqa.train.recipe import load_recipe

    path = _write(tmp_path / "r.yaml", yaml.safe_dump(RECIPE))
    recipe = load_recipe(path, ["train.mixed_precision=no", "train.lr.mapper=1e-3", "train.max_steps=null",
                                "train.resume=true", "train.feature_cache=cache", "model.tiny=llama"])
    assert recipe.train["mixed_precision"] == "no" and recipe.train["lr"] == {"mapper": 1e-3}
    assert recipe.train["max_steps"] is None and recipe.train["resume"] is True
    assert recipe.train["feature_cache"] == "cache" and recipe.model["tiny"] == "llama"
    assert load_recipe(path, ["train.resume=runs/x/last"]).train["resume"] == "runs/x/last"


def test_newer_minor_version_loads_with_a_warning_naming_versions_and_fields(cli_env):
    folder = _newer(cli_env["adapter"], "0.9.0")
    cfg = json.loads((folder / "prefixvqa_config.json").read_text())
    cfg["mapper"]["future_option"] = 1
    (folder / "prefixvqa_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"written by prefixvqa 0\.9\.0, newer than .*\['mapper\.future_option'\]"):
        MedVQAAdapter.from_pretrained(folder)
    cfg["version"] = "0.1.0"  # the same version: an unknown field means a damaged file
    (folder / "prefixvqa_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown field"):
        MedVQAAdapter.from_pretrained(folder)


# ----------------------------------------------------------------------------- entry points, version, error policy
def test_python_m_prefixvqa_and_version():
    from prefixvqa._version import __version__

    out = subprocess.run([sys.executable, "-m", "prefixvqa", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"prefixvqa {__version__}"
    out = subprocess.run([sys.executable, "-m", "prefixvqa", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "eval", "fit-check", "presets"))
    out = subprocess.run([sys.executable, "-m", "prefixvqa", "presets"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo_smollm2" in out.stdout


def test_help_starts_without_torch():
    code = ("import sys\nfrom prefixvqa.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_only_prefixvqa_errors_are_one_line_and_debug_shows_every_traceback(monkeypatch, capsys):
    import prefixvqa.cli as cli
    from prefixvqa.config import ConfigError

    def refuse(args):
        raise ConfigError("presets: refused for the test\n(second line)")

    monkeypatch.setattr(cli, "cmd_presets", refuse)
    assert main(["presets"]) == 2
    assert capsys.readouterr().err == "prefixvqa presets: error: presets: refused for the test (second line)\n"
    for argv in (["--debug", "presets"], ["presets", "--debug"]):
        with pytest.raises(ConfigError, match="refused for the test"):
            main(argv)

    def bug(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_presets", bug)
    with pytest.raises(ValueError, match="a bug"):  # a bug keeps its traceback
        main(["presets"])

    def missing(name):
        def run(args):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return run

    monkeypatch.setattr(cli, "cmd_presets", missing("fastapi"))  # an optional package not installed: one line
    assert main(["presets"]) == 2 and "No module named 'fastapi'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_presets", missing("prefixvqa.gone"))  # a module of ours that fails: a bug
    with pytest.raises(ModuleNotFoundError):
        main(["presets"])


def test_choices_and_their_help_come_from_the_registries(monkeypatch, capsys):
    import typing

    from prefixvqa.cli import build_parser
    from prefixvqa.config import DTYPES
    from prefixvqa.data.readers import READERS
    from prefixvqa.eval.protocols import ClosedMode, list_protocols
    from prefixvqa.explain import METHODS
    from prefixvqa.presets import list_presets

    def help_of(*command):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    eval_help, answer_help = help_of("eval"), help_of("answer")
    assert all(name in eval_help for name in [*list_protocols(), *READERS, *typing.get_args(ClosedMode)])
    assert all(name in answer_help for name in METHODS)
    assert all(name in help_of("export") for name in DTYPES)
    assert all(name in help_of("cache-features") for name in list_presets())
    monkeypatch.setitem(READERS, "my_layout", READERS["generic"])  # a registered reader is a valid --format at once
    args = build_parser().parse_args(["predict", "--adapter", "a", "--data", "d", "--format", "my_layout"])
    assert args.format == "my_layout" and args.protocol in list_protocols()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "a", "--out", "o", "--dtype", "float8"])
    assert "argument --dtype: unknown dtype 'float8'" in capsys.readouterr().err
