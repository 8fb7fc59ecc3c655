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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import AdapterConfig, ConfigError, apply_override, coerce
from ..errors import shorten
from ..rng import seeded
from .checkpoint import check_output_dir, run_lock
from .stopping import stop_signals
from .config import TrainConfig, literal_values
from .trainer import TrainResult, train

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from ..model import MedVQAAdapter

__all__ = ["Recipe", "load_recipe", "run_recipe", "apply_sets", "load_split", "build_model", "recipe_config",
           "check_output_apart"]

STAGE_KEYS = ("name", "data", "template", "tuning", "start_from")  # the rest are TrainConfig fields (trainable too)
TOP_KEYS = ("model", "data", "train", "stages", "smoke", "description", "name")
DATA_KEYS = ("train", "eval", "test")


@dataclass
class Recipe:
    """A parsed, validated recipe (see the module doc for the schema): everything is checked at load, before any
    model is built, so a typo fails in a second rather than after the first stage trained. Plain data: `to_dict`
    round-trips it, `with_sets` derives variants (smoke runs, sweeps)."""

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
            raise ConfigError(f"recipe model: unknown key(s) {shorten(unknown)}")
        _check_data_keys(self.data, "recipe data")
        TrainConfig.from_dict(self.train)  # fail at load time, not after the model is built
        for i, stage in enumerate(self.stages or []):
            if not isinstance(stage, dict) or not stage.get("name") or not isinstance(stage["name"], str):
                raise ConfigError(f"recipe stages[{i}]: each stage needs a name (a string), got "
                                  f"{shorten(stage.get('name') if isinstance(stage, dict) else stage)}")
            _check_stage(stage, self.train, i)
        names = [s["name"] for s in self.stages or []]
        if len(set(names)) != len(names):
            raise ConfigError(f"recipe stages: duplicate stage names {shorten(names)}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-ready data (a deep copy: editing it leaves the recipe alone)."""
        out = {"model": self.model, "data": self.data, "train": self.train, "smoke": self.smoke}
        if self.stages is not None:
            out["stages"] = self.stages
        return copy.deepcopy(out)

    def with_sets(self, sets: dict[str, Any] | list[str]) -> Recipe:
        """A copy with --set style overrides ("a.b=value" strings or a {"a.b": value} dict) applied."""
        return _from_dict(apply_sets(self.to_dict(), sets), self.path, " after overrides")


def _check_data_keys(data: Any, where: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {list(DATA_KEYS)} to data specs, got {shorten(data)}")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {shorten(unknown)}; expected some of {list(DATA_KEYS)}")


def _check_stage(stage: dict[str, Any], train: dict[str, Any], index: int) -> None:
    """Everything about a curriculum stage that can be checked without data or models, at recipe load."""
    where = f"recipe stages[{index}] ({shorten(stage['name'])})"
    if stage.get("start_from", "best") not in ("best", "last"):
        raise ConfigError(f"{where}: start_from must be 'best' or 'last', got {shorten(stage.get('start_from'))}")
    _check_data_keys(stage.get("data"), f"{where} data")
    for section in ("template", "tuning"):
        if stage.get(section) is not None:
            if not isinstance(stage[section], dict):
                raise ConfigError(f"{where}: {section} must be a mapping of {section} fields")
            try:
                AdapterConfig().replace(**{section: stage[section]})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    try:
        TrainConfig.from_dict({**train, **_stage_train(stage)})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _declared_type(key: str) -> Any:
    """The TrainConfig type a dotted --set key refers to ("train.epochs", "stages.1.lr.mapper"), or None."""
    parts = key.split(".")
    if parts[0] == "train" and len(parts) >= 2:
        name, rest = parts[1], parts[2:]
    elif parts[0] == "stages" and len(parts) >= 3 and parts[2] not in STAGE_KEYS:
        name, rest = parts[2], parts[3:]
    else:
        return None
    hint = typing.get_type_hints(TrainConfig).get(name)
    if hint is None or not rest:
        return hint
    args = typing.get_args(hint)
    return args[1] if typing.get_origin(hint) is dict and len(rest) == 1 and len(args) == 2 else None


def _parse_set(item: str) -> tuple[str, Any]:
    """KEY=VALUE -> (key, value): YAML, except that a training field is read as its declared type (so
    `train.mixed_precision=no` is the string "no", and `train.epochs=abc` is refused naming the key)."""
    if "=" not in item:
        raise ConfigError(f"--set {shorten(item)}: expected KEY=VALUE (e.g. train.epochs=3)")
    key, text = (part.strip() for part in item.split("=", 1))
    try:
        value = safe_yaml(text, f"--set {key}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {shorten(text)} is not a valid YAML value ({_yaml_problem(exc)})") from None
    hint = _declared_type(key)
    if hint is None:
        return key, value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return key, None
    if any(isinstance(v, str) for option in options for v in literal_values(option) or ()):
        return key, text  # a choice field (TrainConfig checks the value): "no" stays "no"
    if str in options and not isinstance(value, (dict, list)) and not (bool in options and isinstance(value, bool)):
        return key, text
    return key, coerce(value, hint, f"--set {key}")


MAX_NODES = 10_000  # values a recipe may hold with its YAML aliases expanded (the largest shipped one holds ~100)


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing (ConfigError naming ``where`` and the key) a document whose aliases expand
    it past MAX_NODES values, that refers to itself, or that nests too deep to read: an alias bomb of a few hundred
    bytes would otherwise expand to millions of values wherever it is copied or formatted. The count is taken on the
    parsed node graph (an alias is one shared node), before any Python value is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, where: str) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded; 0 while being counted

    def size(node: yaml.Node, path: str) -> int:
        if id(node) in sizes:
            if sizes[id(node)] == 0:
                raise ConfigError(f"{where}: {path or 'the document'} refers to itself through a YAML alias")
            return sizes[id(node)]
        sizes[id(node)] = 0
        total = 1
        for key, child in _children(node):
            total += size(child, f"{path}.{key}" if path and not key.startswith("[") else f"{path}{key}")
        sizes[id(node)] = total
        return total

    total = size(root, "")
    if total <= MAX_NODES:
        return
    path, node = "", root  # name the deepest key that alone is over the limit (the largest one)
    while isinstance(node, yaml.MappingNode):
        big = [(key, child) for key, child in _children(node) if sizes[id(child)] > MAX_NODES]
        if not big:
            break
        key, node = max(big, key=lambda pair: sizes[id(pair[1])])
        path = f"{path}.{key}" if path else key
    raise ConfigError(f"{where}: {path or 'the document'} expands to {sizes[id(node)]:,} values through YAML aliases "
                      f"(at most {MAX_NODES:,} are allowed in a recipe)")


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """(name in a message, node) of each key and value of a mapping or each item of a sequence."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", child) for i, child in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    out = []
    for key, value in node.value:
        name = str(key.value) if isinstance(key, yaml.ScalarNode) else "(a complex key)"
        name = name if len(name) <= 60 else name[:57] + "..."
        out += [(f"{name} (key)", key), (name, value)]
    return out


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def apply_sets(data: dict[str, Any], sets: dict[str, Any] | list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of a recipe dict with `--set` overrides ("a.b=value" strings or a {"a.b": value} dict) applied by the
    one override engine (`config.apply_override`, not strict: the recipe is validated as a whole afterwards)."""
    data = copy.deepcopy(data)
    for key, value in (sets.items() if isinstance(sets, dict) else map(_parse_set, sets)):
        apply_override(data, key, value, strict=False)
    return data


def load_recipe(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (safe loader: no Python tags) and apply `--set a.b=value` overrides."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a YAML file (e.g. recipes/demo.yaml)")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), f"recipe {path}") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    _from_dict(data, str(path), "")
    return _from_dict(apply_sets(data, list(sets)), str(path), " after --set")


def _from_dict(data: dict[str, Any], path: str | None, where: str) -> Recipe:
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"recipe {path or ''}{where}: unknown top-level key(s) {shorten(unknown)}; expected some of "
                          f"{list(TOP_KEYS)}")
    for key in ("model", "data", "train", "smoke"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"recipe {path or ''}{where}: '{key}' must be a mapping, got {shorten(data[key])}")
    if data.get("stages") is not None and not isinstance(data["stages"], list):
        raise ConfigError(f"recipe {path or ''}{where}: 'stages' must be a list of stages")
    kept = {k: v for k, v in data.items() if k not in ("description", "name") and v is not None}
    return Recipe(**kept, path=path)


# --------------------------------------------------------------------------------------------------------- data
def load_split(spec: Any) -> list[VQARecord]:
    """Records of one data SPEC: `{format: synthetic, ...}` here, everything else via readers.load_records."""
    if spec is None:
        return []
    if isinstance(spec, dict) and spec.get("format") == "synthetic":
        from ..data.synthetic import synthetic_split

        try:
            return synthetic_split(**{k: v for k, v in spec.items() if k != "format"})
        except TypeError as exc:  # an unknown or misspelt key
            from ..data.records import DataError

            raise DataError(f"synthetic data spec {shorten(spec)}: {exc}") from None
    from ..data.readers import load_records

    return load_records(spec)  # Records: keeps the list of bad items skipped, which the run reports


# -------------------------------------------------------------------------------------------------------- model
def build_model(spec: dict[str, Any], workdir: Path, seed: int | None = None) -> MedVQAAdapter:
    """The recipe's model: preset/config/adapter plus overrides; `tiny: FAMILY` swaps in tiny offline models. A new
    model's mapper and LoRA are initialised as `MedVQAAdapter(config, seed=seed)` does (what `from_preset` does), so
    a recipe and the Python API give the same adapter for the same seed; None draws from the caller's generators."""
    from ..model import MedVQAAdapter

    if spec.get("adapter"):
        if spec.get("tiny"):
            raise ConfigError("recipe model: 'tiny' cannot be combined with 'adapter' (its base models are fixed)")
        return MedVQAAdapter.from_pretrained(spec["adapter"], **dict(spec.get("overrides") or {}))
    from ..vlm_import import load_release_weights

    model = MedVQAAdapter(recipe_config(spec, workdir), seed=seed)
    load_release_weights(model)  # a released checkpoint (decoder.layout): its projector, as from_vlm loads it
    return model


def recipe_config(spec: dict[str, Any], workdir: Path) -> AdapterConfig:
    """The AdapterConfig a recipe's model section describes, without loading any weights (fit-check reads it).

    `tiny: FAMILY` builds the tiny offline decoder folder under `workdir/_tiny/` (a few kB) and points at it."""
    overrides = dict(spec.get("overrides") or {})
    tiny: dict[str, Any] = {}
    if spec.get("tiny"):
        if spec.get("adapter"):
            raise ConfigError("recipe model: 'tiny' cannot be combined with 'adapter' (its base models are fixed)")
        from ..testing import build_decoder, tiny_overrides

        folder = workdir / "_tiny" / str(spec["tiny"])
        if not (folder / "config.json").is_file():
            from ..fileio import atomic_dir

            # every rank may build it: each writes its own temporary folder, the first complete one is kept
            with atomic_dir(folder, overwrite=False) as tmp:
                build_decoder(tmp, str(spec["tiny"]))  # seeded on its own: the caller's RNG stream is not shifted
        tiny = tiny_overrides(folder)
    if spec.get("adapter"):
        import json

        from ..adapter_io import CONFIG_NAME, compatible_config, resolve_adapter

        path = resolve_adapter(spec["adapter"]) / CONFIG_NAME
        cfg = AdapterConfig.from_dict(compatible_config(json.loads(path.read_text()), str(path)))
    elif spec.get("preset"):
        from ..presets import preset_config

        cfg = preset_config(spec["preset"])
    else:
        cfg = AdapterConfig.from_dict(spec.get("config") or {})
    cfg = cfg.replace(**overrides) if overrides else cfg
    return _apply_tiny(cfg, tiny) if tiny else cfg


def _apply_tiny(cfg: AdapterConfig, tiny: dict[str, Any]) -> AdapterConfig:
    """Tiny models keep the recipe's mapper/tuning/template choices; model sizes must follow the tiny parts."""
    data = cfg.to_dict()
    for key, value in tiny.items():
        apply_override(data, key, value)
    data["mapper"].update(in_dim=None, out_dim=None)
    data["tuning"]["target_modules"] = None  # the tiny family's default LoRA targets
    return AdapterConfig.from_dict(data)


def _retune_allowed(old: Any, new: Any) -> bool:
    """A stage may keep its tuning, leave a decoder that holds nothing trained (frozen), or switch to a mode that can
    follow the previous one (LoRA/DoRA -> full, merged first); changed settings of a trained mode would drop weights."""
    if old == new:
        return True
    holds_nothing = not (old.method.uses_peft_files or old.method.trains_decoder)
    return holds_nothing or (old.mode != new.mode and new.method.can_follow(old.method))


def _allowed_switches() -> str:
    from ..tuning import TUNING_MODES

    pairs = [f"{old!r} -> {new!r}" for new, m in TUNING_MODES.items() for old in m.follows if old != new]
    return "same tuning, or " + ", ".join(pairs)


def retune(model: MedVQAAdapter, tuning: dict[str, Any]) -> None:
    """Switch the decoder's tuning between stages without losing trained weights an adapter folder must keep."""
    from ..decoder import apply_tuning

    new_cfg = model.config.replace(tuning=tuning)
    old, new = model.config.tuning, new_cfg.tuning
    if old == new:
        return
    if _retune_allowed(old, new):
        base = old.method.merged_base(model.decoder)
        folded = base is not model.decoder  # peft's wrapper was merged away: its trained deltas are in the weights
        model.decoder = apply_tuning(base, new, quantized=bool(model.config.decoder.quantization),
                                     checkpointing=model.config.decoder.gradient_checkpointing)
        model.config = new_cfg
        if folded:
            model.changed_parts.add("decoder")  # the trained LoRA now lives in the decoder's weights
        return
    raise ConfigError(f"curriculum: switching tuning from {old.mode!r} to {new.mode!r} (or changing LoRA settings) "
                      f"would drop trained decoder weights from the saved adapter; allowed: {_allowed_switches()} "
                      "(LoRA/DoRA merged first)")


# ----------------------------------------------------------------------------------------------------------- run
def _stage_train(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in STAGE_KEYS}


@dataclass
class RecipeResult:
    """What `run_recipe` leaves: each stage's TrainResult, the adapter folder to use, and the trained model (so a
    caller such as the sweep or the CLI can evaluate it without loading the folder again)."""

    stages: dict[str, TrainResult]  # a single-stage recipe has one entry named "train"
    final_dir: Path | None  # the adapter to use: the last stage's best (or last) checkpoint
    model: Any = None
    template: dict[str, Any] | None = None  # the recipe model's template, which stages without their own use


def prepare_stage(recipe: Recipe, stage: dict[str, Any], model: MedVQAAdapter | None, previous: TrainResult | None,
                  base_template: dict[str, Any], out: Path) -> tuple[MedVQAAdapter, TrainConfig, dict[str, Any]]:
    """One curriculum stage's model (from the previous stage's adapter), TrainConfig and data specs."""
    name = stage["name"]
    start = stage.get("start_from", "best")  # checked at recipe load
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


def _stage_seed(recipe: Recipe, stage: dict[str, Any]) -> int:
    return int({**recipe.train, **_stage_train(stage)}.get("seed", 0))


def load_stage_data(recipe: Recipe) -> list[tuple[list[VQARecord], list[VQARecord]]]:
    """Each stage's (train, eval) records (one entry for a single-stage recipe), all read before anything trains:
    a missing file or a misspelt spec key of the last stage fails before the first one starts."""
    specs = [{**recipe.data, **(stage.get("data") or {})} for stage in recipe.stages] if recipe.stages \
        else [recipe.data]
    return [(load_split(spec.get("train")), load_split(spec.get("eval"))) for spec in specs]


def check_curriculum(recipe: Recipe, model: MedVQAAdapter) -> None:
    """Before the first stage trains: each stage's tuning switch is allowed from the one before (settings, templates
    and data are checked at load)."""
    tuning = model.config.tuning
    for i, stage in enumerate(recipe.stages or []):
        if stage.get("tuning"):
            new = model.config.replace(tuning=stage["tuning"]).tuning
            if not _retune_allowed(tuning, new):
                raise ConfigError(f"recipe stages[{i}] ({shorten(stage['name'])}): switching tuning from "
                                  f"{tuning.mode!r} to {new.mode!r} would drop trained decoder weights; allowed: "
                                  f"{_allowed_switches()}")
            tuning = new


def check_output_apart(spec: dict[str, Any], out: Path) -> None:
    """Refuse an output folder that is, or lies inside, the adapter folder the recipe's model starts from: the run's
    lock and checkpoints would be written into that adapter (which then no longer verifies) or replace it."""
    if not spec.get("adapter"):
        return
    source = Path(spec["adapter"]).expanduser()
    if not source.is_dir():  # a hub name: resolved (and checked) when the model is built
        return
    source, target = source.resolve(), out.expanduser().resolve()
    if target == source or source in target.parents:
        where = "is" if target == source else "lies inside"
        raise ConfigError(f"train.output_dir {out} {where} the adapter folder the run starts from (model.adapter="
                          f"{spec['adapter']}): the run would write into it; choose another output_dir")


def run_recipe(recipe: Recipe, smoke: bool = False) -> RecipeResult:
    """Run a single-stage or curriculum recipe; `smoke=True` first applies the recipe's `smoke:` overrides.

    The recipe's output folder is locked for the whole run (never the adapter folder it starts from), and SIGTERM or
    Ctrl-C stop it cleanly (see `stopping.py`); every stage is checked (settings, tuning switches, data) before the
    first one trains.
    """
    if smoke:
        if not recipe.smoke:
            raise ConfigError(f"recipe {recipe.path or ''}: no smoke section")
        recipe = recipe.with_sets(recipe.smoke)
    top = TrainConfig.from_dict(recipe.train)
    out = Path(top.output_dir)
    check_output_apart(recipe.model, out)
    for folder in [out, *(out / str(stage["name"]) for stage in recipe.stages or [])]:  # every stage's, up front
        check_output_dir(folder)
    with stop_signals(), run_lock(out):
        stage_data = load_stage_data(recipe)
        model = build_model(recipe.model, out, seed=top.seed)  # mapper, fresh LoRA: seeded as the Python API seeds
        if not recipe.stages:
            result = train(model, *stage_data[0], top)
            return RecipeResult({"train": result}, result.best_dir or result.last_dir, model)
        check_curriculum(recipe, model)
        results: dict[str, TrainResult] = {}
        previous: TrainResult | None = None
        base_template = model.config.to_dict()["template"]
        for stage, (train_recs, eval_recs) in zip(recipe.stages, stage_data):
            with seeded(_stage_seed(recipe, stage)):
                model, cfg, _ = prepare_stage(recipe, stage, model, previous, base_template, out)
            results[stage["name"]] = previous = train(model, train_recs, eval_recs, cfg)
    final = previous.best_dir or previous.last_dir if previous is not None else None
    return RecipeResult(results, final, model, base_template)
