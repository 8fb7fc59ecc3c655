"""Recipes: --set overrides, smoke runs, and a 3-stage LLaVA-Med-like curriculum with per-stage trainable groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from prefixvqa.config import ConfigError  # noqa: E402
from prefixvqa.train import recipe as recipe_mod  # noqa: E402
from prefixvqa.train.recipe import apply_sets, load_recipe, run_recipe  # noqa: E402

CURRICULUM = {
    "model": {"config": {"mapper": {"kind": "linear"}, "encoder": {"features": "patches"},
                         "template": {"name": "llava_med_v1"}}},
    "data": {"train": "/data/llava_med/instruct.json", "eval": None},
    "train": {"batch_size": 4, "epochs": 1, "progress": False, "tensorboard": False, "plot": False,
              "lr": {"mapper": 5e-3, "lora": 5e-3}},
    "stages": [
        {"name": "align", "trainable": ["mapper"], "template": {"name": "plain"},
         "data": {"train": "/data/llava_med/alignment.json"}},
        {"name": "instruct", "trainable": ["mapper", "lora"], "start_from": "last"},
        {"name": "vqa", "trainable": ["mapper", "lora"], "data": {"train": "/data/vqa_rad/train.json"},
         "metric": "accuracy", "max_new_tokens": 4},
    ],
    "smoke": {"model.tiny": "gpt2", "data.train": {"format": "synthetic", "n": 4, "kind": "instruct"},
              "stages.0.data.train": {"format": "synthetic", "n": 4, "kind": "caption"},
              "stages.2.data": {"train": {"format": "synthetic", "n": 4, "kind": "closed"},
                                "eval": {"format": "synthetic", "n": 2, "kind": "closed", "seed": 1}}},
}


def test_sets_are_yaml_parsed_and_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(CURRICULUM))
    recipe = load_recipe(path, ["train.epochs=2", "stages.1.lr={lora: 1.0e-4}", "train.output_dir=x"])
    assert recipe.train["epochs"] == 2 and recipe.stages[1]["lr"] == {"lora": 1e-4}
    assert apply_sets({"a": [{"b": 1}]}, {"a.0.b": 2}) == {"a": [{"b": 2}]}
    with pytest.raises(ConfigError):
        load_recipe(path, ["train.schedule=sometimes"])
    with pytest.raises(ConfigError):
        load_recipe(path, ["stages.7.epochs=1"])
    with pytest.raises(ConfigError):
        load_recipe(path, ["noequals"])


def test_three_stage_curriculum_smoke(tmp_path, monkeypatch):
    path = tmp_path / "llava_med_tiny.yaml"
    path.write_text(yaml.safe_dump({**CURRICULUM, "train": {**CURRICULUM["train"], "output_dir": str(tmp_path)}}))
    changes: dict[str, set[str]] = {}
    original = recipe_mod.train

    def spy(model, train_records, eval_records, cfg):
        before = {g: {n: p.detach().clone() for n, p in ps} for g, ps in model.parameter_groups().items()}
        result = original(model, train_records, eval_records, cfg)
        after = dict(model.parameter_groups())
        changes[Path(cfg.output_dir).name] = {g for g, ps in after.items()
                                              if any(not torch.equal(before[g][n], p) for n, p in ps)}
        return result

    monkeypatch.setattr(recipe_mod, "train", spy)
    result = run_recipe(load_recipe(path), smoke=True)
    assert list(result.stages) == ["align", "instruct", "vqa"]
    assert changes == {"align": {"mapper"}, "instruct": {"mapper", "lora"}, "vqa": {"mapper", "lora"}}
    for name in ("align", "instruct", "vqa"):
        assert (tmp_path / name / "last" / "adapter_model.safetensors").is_file()
    assert result.final_dir == tmp_path / "vqa" / "best"
    from prefixvqa.model import MedVQAAdapter

    final = MedVQAAdapter.from_pretrained(result.final_dir)
    assert final.config.template.name == "llava_med_v1"
    assert [r["metric"] for r in result.stages["vqa"].history if r["kind"] == "eval"] == ["accuracy"]


def _logits(model, records):
    model.eval()
    with torch.no_grad():
        batch = model.processor([r.image for r in records], [r.question for r in records], [r.answer for r in records])
        return model(**batch).logits


def test_retune_keeps_the_function_and_refuses_lossy_switches(tmp_path):
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.data.synthetic import colour_records
    from prefixvqa.train.recipe import build_model, retune

    torch.manual_seed(0)
    model = build_model({"tiny": "gpt2", "config": {"tuning": {"mode": "frozen"}}}, tmp_path)
    records = colour_records(3)
    before = _logits(model, records)
    assert not any(p.requires_grad for _, p in model.parameter_groups()["decoder"])

    retune(model, {"mode": "lora", "r": 4, "alpha": 8})  # frozen -> lora: LoRA's zero-initialised B changes nothing
    assert model.config.tuning.mode == "lora" and model.parameter_groups()["lora"]
    torch.testing.assert_close(_logits(model, records), before)
    with torch.no_grad():  # stand-in for a trained stage: non-zero LoRA updates
        for name, p in model.parameter_groups()["lora"]:
            p.add_(torch.randn_like(p) * 0.2)
    tuned = _logits(model, records)
    assert not torch.allclose(tuned, before)

    with pytest.raises(ConfigError, match="'lora' to 'frozen'"):  # would drop the trained LoRA from the adapter
        retune(model, {"mode": "frozen"})

    retune(model, {"mode": "full"})  # lora -> full: LoRA merged into the weights first, nothing lost
    assert model.config.tuning.mode == "full" and not model.parameter_groups()["lora"]
    decoder = model.parameter_groups()["decoder"]
    assert decoder and all(p.requires_grad for _, p in decoder)
    torch.testing.assert_close(_logits(model, records), tuned, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "full")
    reloaded = MedVQAAdapter.from_pretrained(tmp_path / "full")
    assert reloaded.config.tuning.mode == "full"
    torch.testing.assert_close(_logits(reloaded, records), tuned, rtol=1e-4, atol=1e-5)


def test_curriculum_switches_tuning_between_stages(tmp_path):
    """frozen decoder (align) -> LoRA (instruct) -> full fine-tuning (vqa), each stage starting from the last."""
    from prefixvqa.model import MedVQAAdapter

    recipe = {
        "model": {"tiny": "gpt2", "config": {"tuning": {"mode": "frozen"}}},
        "data": {"train": {"format": "synthetic", "n": 4, "kind": "closed"}},
        "train": {"output_dir": str(tmp_path), "batch_size": 4, "epochs": 1, "progress": False,
                  "tensorboard": False, "plot": False, "lr": {"mapper": 5e-3, "lora": 5e-3, "decoder": 1e-3}},
        "stages": [
            {"name": "align", "trainable": ["mapper"]},
            {"name": "instruct", "trainable": ["mapper", "lora"], "tuning": {"mode": "lora", "r": 4}},
            {"name": "vqa", "trainable": ["mapper", "decoder"], "tuning": {"mode": "full"}},
        ],
    }
    path = tmp_path / "switch.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_recipe(load_recipe(path))
    modes = {name: MedVQAAdapter.from_pretrained(tmp_path / name / "last").config.tuning.mode
             for name in ("align", "instruct", "vqa")}
    assert modes == {"align": "frozen", "instruct": "lora", "vqa": "full"}
    assert (tmp_path / "instruct" / "last" / "adapter_model.safetensors").is_file()
    final = MedVQAAdapter.from_pretrained(result.final_dir)
    assert final.config.tuning.mode == "full"


def test_stage_checkpoints_store_what_the_stage_trained(tmp_path):
    """LLaVA-Med's curriculum in full mode: an align stage that trains only the mapper writes no copy of the frozen
    decoder (it is rebuilt from its base model, checked by fingerprint); the stage that fine-tunes the decoder
    stores it; a later mapper-only stage still stores it, since rebuilding needs the decoder an earlier stage
    trained."""
    from safetensors import safe_open

    from prefixvqa.model import MedVQAAdapter

    recipe = {
        "model": {"tiny": "gpt2", "config": {"tuning": {"mode": "full"}}},
        "data": {"train": {"format": "synthetic", "n": 4, "kind": "closed"}},
        "train": {"output_dir": str(tmp_path), "batch_size": 4, "epochs": 1, "progress": False,
                  "tensorboard": False, "plot": False, "lr": {"mapper": 5e-3, "decoder": 1e-3}},
        "stages": [{"name": "align", "trainable": ["mapper"]},
                   {"name": "instruct", "trainable": ["mapper", "decoder"]},
                   {"name": "polish", "trainable": ["mapper"]}],
    }
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(path))

    def parts(stage: str) -> set[str]:
        with safe_open(str(tmp_path / stage / "last" / "mapper.safetensors"), "pt") as f:
            return {k.split(".")[0] for k in f.keys()}

    assert parts("align") == {"mapper"}
    assert parts("instruct") == parts("polish") == {"mapper", "decoder"}
    align = MedVQAAdapter.from_pretrained(tmp_path / "align" / "last")  # the decoder comes from its base model
    instruct = MedVQAAdapter.from_pretrained(tmp_path / "instruct" / "last")
    polish = MedVQAAdapter.from_pretrained(tmp_path / "polish" / "last")
    name, trained = next((n, p) for n, p in instruct.decoder.named_parameters() if n.endswith("c_attn.weight"))
    assert torch.equal(dict(polish.decoder.named_parameters())[name], trained)
    assert not torch.equal(dict(align.decoder.named_parameters())[name], trained)
