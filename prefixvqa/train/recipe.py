"""YAML recipes: model + data + training settings, optionally a multi-stage curriculum, plus a `smoke:` variant.

Schema (every key optional except where noted)::

    model:                      # exactly one of preset / config / adapter
      preset: llava_med         #   a named preset from adapters/ ...
      config: {...}             #   ... or a full AdapterConfig dict ...
      adapter: path/to/adapter  #   ... or a saved adapter folder to continue from
      overrides: {...}          # AdapterConfig overrides (section dicts or "a.b"/"a__b" keys)
      tiny: gpt2                # build a tiny offline decoder of this family + the tiny encoder (smoke runs)
    data:
      train: SPEC               # anything prefixvqa.data.readers.load_records accepts, or {format: synthetic, ...}
      eval: SPEC
    train: {TrainConfig fields}
    stages:                     # optional curriculum; each stage starts from the previous stage's saved adapter
      - name: align
        data: {train: SPEC, eval: SPEC}   # default: the top-level data
        trainable: [mapper]
        template: {name: plain}           # template section override
        tuning: {mode: full}              # tuning section override (frozen -> any, lora -> full allowed)
        lr: {mapper: 1e-3}
        start_from: best                  # which checkpoint of the previous stage to start from: best | last
        epochs: 1                         # ... and any other TrainConfig field
    smoke:                      # --set style overrides applied by run_recipe(smoke=True): tiny, offline, fast
      model.tiny: gpt2
      data.train: {format: synthetic, n: 8}

Synthetic data SPEC: {format: synthetic, n: 16, seed: 0, kind: vqa | caption | instruct | closed}; images are
generated in memory (PNG bytes) with a learnable rule (the colour decides the answer). `kind: lesions` gives the
lesion task of prefixvqa.data.synthetic.lesion_records instead ({n, seed, image_size, kinds, split}).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import AdapterConfig, ConfigError, apply_override
from .trainer import TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from ..model import MedVQAAdapter

__all__ = ["Recipe", "load_recipe", "run_recipe", "apply_sets", "load_split", "build_model"]

STAGE_KEYS = ("name", "data", "template", "tuning", "start_from")  # the rest are TrainConfig fields (trainable too)


@dataclass
class Recipe:
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] | None = None
    smoke: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        sources = [k for k in ("preset", "config", "adapter") if self.model.get(k) is not None]
        if len(sources) > 1:
            raise ConfigError(f"recipe model: give one of preset/config/adapter, got {sources}")
        unknown = sorted(set(self.model) - {"preset", "config", "adapter", "overrides", "tiny"})
        if unknown:
            raise ConfigError(f"recipe model: unknown key(s) {unknown}")
        TrainConfig.from_dict(self.train)  # fail at load time, not after the model is built
        for i, stage in enumerate(self.stages or []):
            if not isinstance(stage, dict) or not stage.get("name"):
                raise ConfigError(f"recipe stages[{i}]: each stage needs a name")
            TrainConfig.from_dict({**self.train, **_stage_train(stage)})
        names = [s["name"] for s in self.stages or []]
        if len(set(names)) != len(names):
            raise ConfigError(f"recipe stages: duplicate stage names {names}")

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "data": self.data, "train": self.train, "smoke": self.smoke}
        if self.stages is not None:
            out["stages"] = self.stages
        return copy.deepcopy(out)

    def with_sets(self, sets: dict[str, Any] | list[str]) -> Recipe:
        """A copy with --set style overrides ("a.b=value" strings or a {"a.b": value} dict) applied."""
        data = apply_sets(self.to_dict(), sets)
        return Recipe(**data, path=self.path)


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.epochs=3)")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_sets(data: dict[str, Any], sets: dict[str, Any] | list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set nested keys by dotted path; list items by index ("stages.0.epochs"); missing dicts are created."""
    data = copy.deepcopy(data)
    pairs = sets.items() if isinstance(sets, dict) else map(_parse_set, sets)
    for key, value in pairs:
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_index(node, part, key)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _index(node: list, part: str, key: str) -> int:
    try:
        i = int(part)
        node[i]
        return i
    except (ValueError, IndexError):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}") from None


def load_recipe(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe and apply `--set a.b=value` overrides (values are YAML-parsed)."""
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    unknown = sorted(set(data) - {"model", "data", "train", "stages", "smoke", "description", "name"})
    if unknown:
        raise ConfigError(f"recipe {path}: unknown top-level key(s) {unknown}")
    data = apply_sets(data, list(sets))
    data.pop("description", None), data.pop("name", None)
    return Recipe(**data, path=str(path))


# --------------------------------------------------------------------------------------------------------- data
def load_split(spec: Any) -> list[VQARecord]:
    """Records of one data SPEC: `{format: synthetic, ...}` here, everything else via readers.load_records."""
    if spec is None:
        return []
    if isinstance(spec, dict) and spec.get("format") == "synthetic":
        from ..data.synthetic import synthetic_split

        return synthetic_split(**{k: v for k, v in spec.items() if k != "format"})
    from ..data.readers import load_records

    return load_records(spec)  # Records: keeps the list of bad items skipped, which the run reports


# -------------------------------------------------------------------------------------------------------- model
def build_model(spec: dict[str, Any], workdir: Path) -> MedVQAAdapter:
    """The recipe's model: preset/config/adapter plus overrides; `tiny: FAMILY` swaps in tiny offline models."""
    from ..model import MedVQAAdapter

    overrides = dict(spec.get("overrides") or {})
    tiny: dict[str, Any] = {}
    if spec.get("tiny"):
        from ..testing import build_decoder, tiny_overrides

        folder = workdir / "_tiny" / str(spec["tiny"])
        if not (folder / "config.json").is_file():
            import torch

            with torch.random.fork_rng(devices=[]):  # building must not shift the caller's seeded RNG stream
                build_decoder(folder, str(spec["tiny"]))
        tiny = tiny_overrides(folder)
    if spec.get("adapter"):
        model = MedVQAAdapter.from_pretrained(spec["adapter"], **overrides)
        if tiny:
            raise ConfigError("recipe model: 'tiny' cannot be combined with 'adapter' (its base models are fixed)")
        return model
    if spec.get("preset"):
        from ..presets import preset_config

        cfg = preset_config(spec["preset"])
    else:
        cfg = AdapterConfig.from_dict(spec.get("config") or {})
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg = _apply_tiny(cfg, tiny) if tiny else cfg
    return MedVQAAdapter(cfg)


def _apply_tiny(cfg: AdapterConfig, tiny: dict[str, Any]) -> AdapterConfig:
    """Tiny models keep the recipe's mapper/tuning/template choices; model sizes must follow the tiny parts."""
    data = cfg.to_dict()
    for key, value in tiny.items():
        apply_override(data, key, value)
    data["mapper"].update(in_dim=None, out_dim=None)
    data["tuning"]["target_modules"] = None  # the tiny family's default LoRA targets
    return AdapterConfig.from_dict(data)


def retune(model: MedVQAAdapter, tuning: dict[str, Any]) -> None:
    """Switch the decoder's tuning between stages without losing trained weights an adapter folder must keep."""
    from ..decoder import apply_tuning

    new_cfg = model.config.replace(tuning=tuning)
    old, new = model.config.tuning, new_cfg.tuning
    if old == new:
        return
    if old.mode == "frozen" or (old.mode == "lora" and new.mode == "full"):
        base = model.decoder.merge_and_unload() if old.mode == "lora" else model.decoder
        model.decoder = apply_tuning(base, new, quantized=bool(model.config.decoder.quantization),
                                     checkpointing=model.config.decoder.gradient_checkpointing)
        model.config = new_cfg
        return
    raise ConfigError(f"curriculum: switching tuning from {old.mode!r} to {new.mode!r} (or changing LoRA settings) "
                      "would drop trained decoder weights from the saved adapter; allowed: same tuning, from "
                      "'frozen' to any mode, or 'lora' -> 'full' (LoRA merged first)")


# ----------------------------------------------------------------------------------------------------------- run
def _stage_train(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in STAGE_KEYS}


@dataclass
class RecipeResult:
    stages: dict[str, TrainResult]  # a single-stage recipe has one entry named "train"
    final_dir: Path | None  # the adapter to use: the last stage's best (or last) checkpoint
    model: Any = None
    template: dict[str, Any] | None = None  # the recipe model's template, which stages without their own use


def prepare_stage(recipe: Recipe, stage: dict[str, Any], model: MedVQAAdapter | None, previous: TrainResult | None,
                  base_template: dict[str, Any], out: Path) -> tuple[MedVQAAdapter, TrainConfig, dict[str, Any]]:
    """One curriculum stage's model (from the previous stage's adapter), TrainConfig and data specs."""
    name = stage["name"]
    start = stage.get("start_from", "best")
    if start not in ("best", "last"):
        raise ConfigError(f"stage {name!r}: start_from must be 'best' or 'last', got {start!r}")
    if previous is not None:
        from ..model import MedVQAAdapter

        folder = (previous.best_dir if start == "best" else None) or previous.last_dir
        model = MedVQAAdapter.from_pretrained(folder)
    # a stage's template override holds for that stage only; others use the recipe model's template
    model.config = model.config.replace(template={**base_template, **(stage.get("template") or {})})
    if stage.get("tuning"):
        retune(model, stage["tuning"])
    trainable = stage.get("trainable")
    if trainable is not None and "encoder" in trainable and model.config.encoder.freeze:
        model.config = model.config.replace(encoder={"freeze": False})
    cfg = TrainConfig.from_dict({**recipe.train, **_stage_train(stage), "output_dir": str(out / name),
                                 "lr": {**recipe.train.get("lr", {}), **stage.get("lr", {})}})
    return model, cfg, {**recipe.data, **(stage.get("data") or {})}


def run_recipe(recipe: Recipe, smoke: bool = False) -> RecipeResult:
    """Run a single-stage or curriculum recipe; `smoke=True` first applies the recipe's `smoke:` overrides."""
    if smoke:
        if not recipe.smoke:
            raise ConfigError(f"recipe {recipe.path or ''}: no smoke section")
        recipe = recipe.with_sets(recipe.smoke)
    out = Path(TrainConfig.from_dict(recipe.train).output_dir)
    model = build_model(recipe.model, out)
    if not recipe.stages:
        train_recs, eval_recs = load_split(recipe.data.get("train")), load_split(recipe.data.get("eval"))
        result = train(model, train_recs, eval_recs, TrainConfig.from_dict(recipe.train))
        return RecipeResult({"train": result}, result.best_dir or result.last_dir, model)
    results: dict[str, TrainResult] = {}
    previous: TrainResult | None = None
    base_template = model.config.to_dict()["template"]
    for stage in recipe.stages:
        model, cfg, data = prepare_stage(recipe, stage, model, previous, base_template, out)
        result = train(model, load_split(data.get("train")), load_split(data.get("eval")), cfg)
        results[stage["name"]] = result
        if result.stopped_reason == "non-finite loss":
            raise RuntimeError(f"curriculum stage {stage['name']!r} stopped on a non-finite loss; last good "
                               f"checkpoint in {result.last_dir}")
        previous = result
    final = previous.best_dir or previous.last_dir if previous is not None else None
    return RecipeResult(results, final, model, base_template)
