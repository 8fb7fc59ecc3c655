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
    return sorted(_presets())


def preset_info(name: str) -> dict[str, Any]:
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {list_presets()}")
    return presets[name]


def preset_config(name: str, **overrides: Any) -> AdapterConfig:
    """The preset's config with overrides: section dicts are merged (`decoder={...}`), `a__b=v` sets one field."""
    info = preset_info(name)
    base = AdapterConfig.from_dict({"name": name, "description": info.get("description", ""), **info["config"]})
    return base.replace(**overrides) if overrides else base
