"""Data-efficiency sweep on the recipe system's synthetic colour task with tiny offline models."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from prefixvqa.data.records import VQARecord  # noqa: E402
from prefixvqa.sweep import stratified_subset, sweep  # noqa: E402

RECIPE = """
model:
  config: {tuning: {mode: full}}
  tiny: gpt2
data:
  train: {format: synthetic, n: 48, seed: 0, kind: vqa}
  eval: {format: synthetic, n: 16, seed: 1, kind: vqa}
train:
  epochs: 8
  feature_cache: FEATURES
  schedule: constant
  batch_size: 4
  lr: {mapper: 0.01, decoder: 0.003}
  tensorboard: false
  plot: false
  progress: false
  eval_every_epoch: false
"""


def test_stratified_subset_keeps_mix_and_is_seeded():
    records = [VQARecord(str(i), None, "q", "yes" if i % 4 == 0 else "lung", None) for i in range(40)]
    subset = stratified_subset(records, 8, seed=3)
    assert len(subset) == 8 and sum(r.answer == "yes" for r in subset) == 2  # 10 closed / 30 open -> 2 / 6
    assert [r.id for r in subset] == [r.id for r in stratified_subset(records, 8, seed=3)]
    assert [r.id for r in subset] != [r.id for r in stratified_subset(records, 8, seed=4)]
    assert stratified_subset(records, "all", 0) == records


def test_sweep_learning_curve(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("FEATURES", str(tmp_path / "features")))
    from prefixvqa.rng import rng_state

    torch.manual_seed(1234)  # a caller's own stream: the sweep must neither reseed nor advance it
    before = rng_state()
    table = sweep(recipe, train_sizes=[4, "all"], seeds=1, out_dir=tmp_path / "sweep", protocol="llava_med",
                  metric="closed_accuracy_strict")
    assert rng_state() == before  # python, numpy and torch generators as the caller left them
    for name in ("sweep.json", "sweep.md", "learning_curve.png"):
        assert (tmp_path / "sweep" / name).is_file()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["summary"] == table["summary"]
    small, large = table["summary"]
    assert (small["n_train"], large["n_train"]) == (4, 48)
    assert large["mean"] > small["mean"], table["summary"]
    assert (tmp_path / "sweep" / "size-all" / "seed-0" / "eval" / "metrics.json").is_file()


CURRICULUM = """
model:
  config: {tuning: {mode: frozen}}
  tiny: gpt2
data:
  train: {format: synthetic, n: 16, seed: 0, kind: vqa}
  eval: {format: synthetic, n: 8, seed: 1, kind: vqa}
train:
  epochs: 2
  batch_size: 4
  lr: {mapper: 0.01, lora: 0.01}
  tensorboard: false
  plot: false
  progress: false
  eval_every_epoch: false
stages:
  - {name: align, trainable: [mapper], data: {train: {format: synthetic, n: 8, kind: caption}}}
  - {name: vqa, trainable: [mapper, lora], tuning: {mode: lora, r: 4}}
"""


def test_sweep_of_a_curriculum_reuses_earlier_stages(tmp_path, monkeypatch):
    """Earlier stages run once; each run trains the last stage (its tuning switch applied) from their adapter."""
    import prefixvqa.train as train_pkg
    from safetensors.torch import load_file

    recipe = tmp_path / "curriculum.yaml"
    recipe.write_text(CURRICULUM)
    starts = []
    original = train_pkg.train

    def spy(model, train_records, eval_records, cfg):
        if "/size-" in cfg.output_dir:  # a sweep run, not the align stage
            starts.append((model.config.tuning.mode, len(train_records),
                           {k: v.clone() for k, v in model.mapper.state_dict().items()}))
        return original(model, train_records, eval_records, cfg)

    monkeypatch.setattr(train_pkg, "train", spy)
    table = sweep(recipe, train_sizes=[4, "all"], seeds=2, out_dir=tmp_path / "sweep", protocol="llava_med",
                  metric="closed_accuracy_strict")
    assert [s["n_train"] for s in table["summary"]] == [4, 16] and len(table["runs"]) == 4
    stage_dirs = sorted(p.name for p in (tmp_path / "sweep" / "stages").iterdir() if not p.name.startswith("_"))
    assert stage_dirs == ["align"]  # ran once
    aligned = load_file(str(tmp_path / "sweep" / "stages" / "align" / "last" / "mapper.safetensors"))
    assert [(mode, n) for mode, n, _ in starts] == [("lora", 4), ("lora", 4), ("lora", 16), ("lora", 16)]
    for _, _, mapper in starts:
        assert all(torch.equal(mapper[k.removeprefix("mapper.")], v) for k, v in aligned.items())
    assert (tmp_path / "sweep" / "size-all" / "seed-1" / "eval" / "metrics.json").is_file()
