"""Named presets: JSON files in `adapters/` (shipped inside the package as `prefixvqa.presets_data`).

A preset file holds `description`, `paper`, `family` (the decoder's model_type, so tests can build a tiny stand-in)
and `config`, a partial AdapterConfig; defaults fill the rest. Like open_clip's model configs, presets are data.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import AdapterConfig, ConfigError
from .fileio import package_file


def preset_dir() -> Path:
    """`prefixvqa.presets_data` when installed; the repository's `adapters/` folder in a source checkout."""
    try:
        folder = package_file("prefixvqa.presets_data")
    except FileNotFoundError:  # a source checkout: the data package exists only once installed
        folder = None
    if folder is not None and any(folder.glob("*.json")):
        return folder
    return Path(__file__).resolve().parent.parent / "adapters"


@lru_cache(maxsize=None)
def _presets() -> dict[str, dict[str, Any]]:
    out = {}
    for file in sorted(preset_dir().glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"preset file {file}: invalid JSON: {exc}") from None
        if "config" not in data:
            raise ConfigError(f"preset file {file}: missing 'config'")
        out[file.stem] = data
    return out


def list_presets() -> list[str]:
    """Names `MedVQAAdapter.from_preset` and the CLI's `--preset` accept (the preset files' stems), sorted."""
    return sorted(_presets())


def preset_info(name: str) -> dict[str, Any]:
    """The preset file's whole content: `config`, plus the metadata the docs and tests read (`description`,
    `paper`, `family`, `source`, recorded `architecture` for fit-check); an unknown name lists the known ones."""
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {list_presets()}")
    return presets[name]


def preset_config(name: str, **overrides: Any) -> AdapterConfig:
    """The preset's config with overrides: section dicts are merged (`decoder={...}`), `a__b=v` sets one field."""
    info = preset_info(name)
    base = AdapterConfig.from_dict({"name": name, "description": info.get("description", ""), **info["config"]})
    return base.replace(**overrides) if overrides else base


def _setting_summary(cfg: AdapterConfig) -> str:
    """The settings a reader compares with the paper, in one cell."""
    m, t, d = cfg.mapper, cfg.tuning, cfg.decoder
    mapper = {"linear": "Linear", "mlp2x_gelu": "Linear-GELU-Linear"}.get(
        m.kind, f"{m.kind} L={m.prefix_length} depth {m.depth}")
    tuning = t.method.describe(t)
    decoding = f"beam {cfg.generation.num_beams}" if cfg.generation.num_beams > 1 else "greedy"
    return (f"{cfg.encoder.name} {cfg.encoder.features}; {mapper}; `{d.name}`"
            f"{' ' + d.quantization if d.quantization else ''}; {tuning}; template `{cfg.template.name}`; "
            f"{decoding}, {cfg.generation.max_new_tokens} new tokens")


def presets_table() -> str:
    """The README's table of published presets, made from the preset files (a test keeps the README equal to it)."""
    rows = ["| preset | source (repository @ commit: files) | settings | mapper parameters | training | deviations |",
            "|---|---|---|---|---|---|"]
    for name in list_presets():
        info = preset_info(name)
        src = info.get("source")
        if not src:
            continue
        cfg = preset_config(name)
        params = f"{src['mapper_params'] / 1e6:.1f}M" + "".join(
            f" + {n / 1e6:.2f}M ({why})" for why, n in src.get("added_params", {}).items())
        cells = [f"`{name}`", f"{src['repository']} @ {src['commit']}: " + "; ".join(src["files"]),
                 _setting_summary(cfg), params, src["training"], " ".join(src["deviations"]) or "none"]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)
