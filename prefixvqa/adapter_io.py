"""Adapter folders: the unit that is saved, shared and loaded.

    prefixvqa_config.json      everything needed to rebuild (with base-model fingerprints and library version)
    mapper.safetensors         mapper tensors, plus encoder/decoder tensors only when those were trained
    adapter_config.json        peft's own files for the LoRA / soft-prompt part, so
    adapter_model.safetensors  `peft.PeftModel.from_pretrained(base_lm, folder)` loads it without prefixvqa
    README.md                  model card
    calibration.json           optional: confidence temperatures fitted on validation data (prefixvqa.calibration)
    image_summary.safetensors  optional: the training images' encoder-feature summary and its out-of-distribution
                               threshold (prefixvqa.ood); adapters saved without one load without the signal
    manifest.sha256.json       sha256 and size of every file above, verified on load

Saving writes a temporary sibling folder and renames it into place, so an interrupted save never leaves a
half-written adapter. Loading is strict: every difference is an error that names the file and the key.

`AdapterFolder` is the one reader: `MedVQAAdapter.from_pretrained` (`load_adapter`), `AdapterSet.add` (the web app,
`serve`) and resume (`load_weights_into`) all open a folder through it, so the version rule (`compatible_config`), the
manifest check (`check_integrity`) and strict loading (keys, shapes, base-model fingerprints) hold for every caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import PrefixVQAError
from .calibration import CALIBRATION_NAME, Calibration
from .config import AdapterConfig, ConfigError
from .fileio import (MANIFEST_NAME, IntegrityError, OverwriteRefused, atomic_dir, safetensors_errors, save_safetensors,
                     verify_manifest, write_manifest)
from .data.processor import PROCESSOR_NAME, MedVQAProcessor
from .ood import SUMMARY_NAME, ImageSummary, OODError, summary_for_save

if TYPE_CHECKING:
    from torch import nn

    from .config import TemplateConfig, TuningConfig
    from .model import MedVQAAdapter

CONFIG_NAME = "prefixvqa_config.json"
TENSORS_NAME = "mapper.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
INSIDE = "adapter:"  # decoder.name scheme: a folder inside the adapter folder (a merged export), like "pkg:"


class AdapterLoadError(PrefixVQAError, ValueError):
    """An adapter folder does not match what it claims or what it is loaded onto; the message says what differs."""


PART_PREFIX = {"mapper": "mapper.", "encoder": "encoder.visual.", "decoder": "decoder."}  # in the model's names


def stored_parts(model: "MedVQAAdapter") -> list[str]:
    """Non-peft parts an adapter folder holds: the mapper; the encoder when it is not frozen; the decoder's base
    weights in `full` mode only when they may differ from the base model (trained now or by an earlier curriculum
    stage, LoRA merged in, or loaded from a folder that stored them). A full-mode decoder that only sat frozen
    while the mapper trained is rebuilt from its base model (checked by fingerprint) instead of being copied."""
    parts = ["mapper"]
    if not model.config.encoder.freeze:
        parts.append("encoder")
    if model.config.tuning.method.trains_decoder and ("decoder" in model.changed_parts or
                                                      any(p.requires_grad for p in model.decoder.parameters())):
        parts.append("decoder")
    return parts


def trained_state(model: "MedVQAAdapter", state_dict: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The tensors `mapper.safetensors` holds (see `stored_parts`), from the live model or a gathered state dict."""
    state = model.state_dict() if state_dict is None else state_dict
    # clone: tied weights (e.g. GPT-2's lm_head and wte) share storage, which safetensors refuses to write
    return {f"{part}.{k[len(PART_PREFIX[part]):]}": v.detach().cpu().contiguous().clone()
            for part in stored_parts(model) for k, v in state.items() if k.startswith(PART_PREFIX[part])}


def save_adapter(model: "MedVQAAdapter", path: str | Path, card: dict[str, Any] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter folder all or nothing: into a temporary sibling, renamed into place when complete.
    `state_dict` (the model's names, full tensors) replaces the live tensors: what a sharded run gathers.

    An existing `path` is replaced only when it is an adapter (or other folder) prefixvqa saved, i.e. its manifest
    lists every file in it, or an empty folder; a folder holding anything else (a user's files, notes added to an
    adapter) raises `fileio.OverwriteRefused` naming it, before anything is written. A failed write (a full disk)
    raises an OSError naming `path` and leaves the previous adapter as it was."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_adapter_files(model, tmp, card, state_dict)
    return path


def write_adapter_files(model: "MedVQAAdapter", folder: Path, card: dict[str, Any] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter's files (manifest last) into the existing, empty ``folder``: for callers that already write into
    a temporary folder of their own (a training checkpoint adds its trainer state before its one rename)."""
    from ._version import __version__

    cfg = model.config.replace(fingerprints=dict(model.base_fingerprints), version=__version__)
    if model.config.tuning.method.uses_peft_files:  # peft's adapter_config.json + adapter_model.safetensors
        kwargs = {}
        if state_dict is not None:
            kwargs["state_dict"] = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        with safetensors_errors(folder / PEFT_WEIGHTS_NAME):  # peft writes it with safetensors
            model.decoder.save_pretrained(str(folder), **kwargs)
    save_safetensors(trained_state(model, state_dict), folder / TENSORS_NAME,
                     metadata={"format": "pt", "library": "prefixvqa"})
    model.processor.save_pretrained(folder)  # tokenizer files + processor_config.json
    (folder / CONFIG_NAME).write_text(cfg.to_json() + "\n")
    (folder / "README.md").write_text(model_card(cfg, card or {}))
    if card and card.get("metrics"):
        (folder / "metrics.json").write_text(json.dumps(card["metrics"], indent=2, sort_keys=True) + "\n")
    if getattr(model, "calibration", None) is not None:
        model.calibration.save(folder)
    summary = summary_for_save(model)  # recomputed when the encoder changed since (a trained tower)
    if summary is not None:
        summary.save(folder)
    write_manifest(folder)


def save_calibration(folder: str | Path, calibration: Calibration | None,
                     image_summary: ImageSummary | None = None) -> Path:
    """Put `calibration.json` into a saved adapter: the folder is checked, copied with the new file and a new
    manifest into a temporary sibling, and swapped in whole (readers never see a half-updated adapter). Every other
    file of the folder (hidden ones included) is carried over, so the swap loses nothing; only `calibration.json`
    (and `image_summary.safetensors` when ``image_summary`` is given: a refitted threshold) and the manifest are
    rewritten. A folder that is not an adapter (no `prefixvqa_config.json`) is refused
    (`fileio.OverwriteRefused`) before anything is written."""
    import shutil

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise OverwriteRefused(f"{folder} is not an adapter folder (it has no {CONFIG_NAME}): a calibration is saved "
                               f"into adapters only; nothing was written")
    check_integrity(folder)
    replaced = {MANIFEST_NAME} | ({CALIBRATION_NAME} if calibration is not None else set()) | (
        {SUMMARY_NAME} if image_summary is not None else set())
    with atomic_dir(folder, overwrite=True) as tmp:  # True: everything in it is copied across
        for item in folder.iterdir():
            if item.name not in replaced:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if calibration is not None:
            calibration.save(tmp)
        if image_summary is not None:
            image_summary.save(tmp)
        write_manifest(tmp)
    return folder / (CALIBRATION_NAME if calibration is not None else SUMMARY_NAME)


def resolve_adapter(path: str | Path) -> Path:
    """A local folder; a name in the local adapter hub ("name" or "name@version", checked against the hub index);
    or a Hugging Face Hub repo id fetched (or found in the cache) with huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    name = str(path)
    if "/" not in name and not local.exists():
        from .hub import Hub, HubError

        try:
            hub = Hub()
            if name in hub:
                return _with_manifest(hub.resolve(name))  # resolve checked every file against the hub index
        except HubError as exc:
            raise AdapterLoadError(str(exc)) from None
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise AdapterLoadError(f"adapter folder not found: {path}")
    from huggingface_hub import snapshot_download

    from .vision import hub_offline

    try:
        folder = Path(snapshot_download(name, local_files_only=hub_offline()))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not there"
        raise AdapterLoadError(f"adapter {name!r} is neither a local folder nor a reachable/cached hub repo: "
                               f"{exc.__class__.__name__}: {exc}") from None
    return _with_manifest(folder)  # downloaded: it must carry the manifest it was pushed with


def read_config(folder: Path) -> AdapterConfig:
    """The folder's `prefixvqa_config.json` under the version rule (`compatible_config`): what every loader builds
    from, so no loader can accept a config another refuses. A decoder shipped inside the folder (`prefixvqa export
    --merge`) is pointed at its path here."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{folder} is not a prefixvqa adapter: {CONFIG_NAME} is missing")
    try:
        data = json.loads(cfg_path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        cfg = AdapterConfig.from_dict(compatible_config(data, str(cfg_path)))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
        raise AdapterLoadError(f"{cfg_path}: {exc}") from None
    if cfg.decoder.name.startswith(INSIDE):
        cfg = cfg.replace(decoder={"name": str(folder / cfg.decoder.name[len(INSIDE):])})
    return cfg


class AdapterFolder:
    """One adapter folder as every loader reads it: opened once (resolved, checked against its manifest, config read
    under the version rule), then loaded strictly, into a whole model (`load_weights`) or part by part into an
    `AdapterSet` slot (`load_parts`, `load_peft` with a peft adapter name). Build it with `open`."""

    def __init__(self, path: Path, config: AdapterConfig):
        self.path, self.config = Path(path), config

    def __repr__(self) -> str:
        return f"AdapterFolder({str(self.path)!r})"

    @classmethod
    def open(cls, ref: str | Path) -> "AdapterFolder":
        """Resolve ``ref`` (folder, hub name or Hugging Face repo, see `resolve_adapter`), verify it against its
        manifest (`check_integrity`) and read its config (`read_config`): every loader starts here."""
        folder = resolve_adapter(ref)
        check_integrity(folder)
        return cls(folder, read_config(folder))

    # --- base models --------------------------------------------------------------------------------------------
    def check_base(self, model: "MedVQAAdapter", strict: bool = True) -> list[str]:
        """Refuse (or with ``strict=False`` only report) base models whose fingerprints differ from the ones the
        adapter was trained on; returns the differences."""
        saved = self.config.fingerprints
        diffs = [f"{part} base model: adapter was trained on fingerprint {saved[part]}, loaded base has "
                 f"{model.base_fingerprints[part]} ({_source(model.config, part)})"
                 for part in ("encoder", "decoder") if saved.get(part) and saved[part] != model.base_fingerprints[part]]
        if diffs and strict:
            raise AdapterLoadError(f"{self.path}: different base model(s): " + "; ".join(diffs) +
                                   ". Pass strict=False to load anyway.")
        return diffs

    # --- tensors ------------------------------------------------------------------------------------------------
    def read_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of `mapper.safetensors` (model part prefixes: ``mapper.``, ``encoder.``, ``decoder.``)."""
        file = self.path / TENSORS_NAME
        if not file.is_file():
            raise AdapterLoadError(f"{file} is missing")
        return read_safetensors(file)

    def load_parts(self, modules: dict[str, "nn.Module"], parts: list[str],
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Load ``parts`` of `mapper.safetensors` into ``modules`` (part -> module): the file must hold exactly those
        parts' keys with the modules' shapes, else nothing is loaded and the error names the keys."""
        got = self.read_tensors() if tensors is None else tensors
        want = {f"{part}.{k}": v for part in parts for k, v in modules[part].state_dict().items()}
        _compare(self.path / TENSORS_NAME, got, want)
        for part in parts:
            modules[part].load_state_dict({k[len(part) + 1:]: v for k, v in got.items() if k.startswith(part + ".")},
                                          strict=True)

    def load_weights(self, model: "MedVQAAdapter", strict: bool = True) -> None:
        """Everything trained into a built model, strictly: base fingerprints (see `check_base`), then per part the
        mapper (and a trainable encoder) must be there; a full-mode decoder is optional (absent: the base model's
        weights stand), but when present every one of its keys must be; then the peft part."""
        self.check_base(model, strict)
        got = self.read_tensors()
        method = model.config.tuning.method
        parts = ["mapper"] + (["encoder"] if not model.config.encoder.freeze else [])
        if method.trains_decoder and any(k.startswith("decoder.") for k in got):
            parts.append("decoder")
        self.load_parts({"mapper": model.mapper, "encoder": model.encoder.visual, "decoder": model.decoder}, parts, got)
        model.changed_parts.update(p for p in parts if p != "mapper")
        if method.uses_peft_files:
            self.load_peft(model.decoder, model.config.tuning)

    def load_peft(self, decoder: "nn.Module", tuning: "TuningConfig", adapter_name: str | None = None) -> None:
        """The peft part, strictly: peft's saved config must match what ``tuning`` builds, and its tensors the
        adapter's keys and shapes. Without ``adapter_name`` it fills the decoder's own ("default") adapter; with one
        it joins the peft model as a further named adapter (an `AdapterSet`), removed again if it does not fit."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
            if not (self.path / name).is_file():
                raise AdapterLoadError(f"{self.path / name} is missing (tuning.mode={tuning.mode!r})")
        built = (decoder.peft_config["default"] if adapter_name is None
                 else tuning.method.peft_config(decoder.get_base_model(), tuning))
        self._check_peft_config(built)
        file = self.path / PEFT_WEIGHTS_NAME
        got = read_safetensors(file)
        if adapter_name is None:
            _compare(file, got, get_peft_model_state_dict(decoder))
            set_peft_model_state_dict(decoder, got)
            return
        decoder.load_adapter(str(self.path), adapter_name=adapter_name)
        try:
            _compare(file, got, get_peft_model_state_dict(decoder, adapter_name=adapter_name))
        except AdapterLoadError:
            decoder.delete_adapter(adapter_name)
            raise

    def _check_peft_config(self, built: Any) -> None:
        from peft import PeftConfig

        try:
            saved = PeftConfig.from_pretrained(str(self.path))
        except Exception as exc:  # peft raises ValueError, TypeError, JSONDecodeError ... for a damaged config
            raise AdapterLoadError(f"{self.path / PEFT_CONFIG_NAME} cannot be read: {exc.__class__.__name__}: "
                                   f"{exc}") from None
        fields = ("peft_type", "r", "lora_alpha", "target_modules", "num_virtual_tokens", "fan_in_fan_out", "bias")
        for f in fields:
            a, b = getattr(saved, f, None), getattr(built, f, None)
            a, b = (set(a), set(b)) if isinstance(a, (list, set)) and isinstance(b, (list, set)) else (a, b)
            if a != b:
                raise AdapterLoadError(f"{self.path / PEFT_CONFIG_NAME}: {f}={a!r} but the config builds {f}={b!r}")

    # --- the small files ----------------------------------------------------------------------------------------
    def processor(self, transform: Callable[[Any], torch.Tensor],
                  template: "TemplateConfig | None" = None) -> MedVQAProcessor | None:
        """The saved processor (tokenizer, prefix length, template unless ``template`` overrides it), None for a
        folder saved without one; a damaged or mismatching one is an AdapterLoadError naming the file."""
        if not (self.path / PROCESSOR_NAME).is_file():
            return None
        try:
            return MedVQAProcessor.from_pretrained(self.path, transform, template)
        except (json.JSONDecodeError, KeyError) as exc:
            raise AdapterLoadError(f"{self.path / PROCESSOR_NAME} is damaged: {exc.__class__.__name__}: {exc}") \
                from None
        except ValueError as exc:
            raise AdapterLoadError(str(exc)) from None

    def image_summary(self) -> ImageSummary | None:
        """The training images' feature summary (`image_summary.safetensors`), None for an adapter saved without
        one; a damaged one is an AdapterLoadError naming the file."""
        try:
            return ImageSummary.load(self.path)
        except OODError as exc:
            raise AdapterLoadError(str(exc)) from None

    def calibration(self) -> Calibration | None:
        """The fitted confidence temperatures (`calibration.json`), None when the adapter was not calibrated."""
        try:
            return Calibration.load(self.path)
        except ValueError as exc:
            raise AdapterLoadError(str(exc)) from None


def load_adapter(cls: type, path: str | Path, strict: bool = True, **overrides: Any) -> "MedVQAAdapter":
    """Build ``cls`` (MedVQAAdapter) from an adapter folder, hub name or repo: what `from_pretrained` does.

    The folder is read by `AdapterFolder` (manifest, version rule, strict keys and shapes); base models whose
    fingerprints differ from the saved ones are refused unless ``strict=False``. ``overrides`` (config sections,
    e.g. ``decoder={"dtype": "bfloat16"}``) change the config before the model is built."""
    folder = AdapterFolder.open(path)
    cfg = folder.config.replace(**overrides) if overrides else folder.config
    model = cls(cfg)
    folder.load_weights(model, strict=strict)
    processor = folder.processor(model.encoder.preprocess, model.config.template)
    if processor is not None:
        model.processor = processor
    model.calibration = folder.calibration()
    model.image_summary = folder.image_summary()
    return model


def load_weights_into(model: "MedVQAAdapter", folder: str | Path, strict: bool = True) -> None:
    """Load a saved adapter's (or a training checkpoint's) trained tensors into an already built model: resume
    keeps its live base models, processor and calibration. Same reader and checks as `load_adapter`."""
    AdapterFolder.open(folder).load_weights(model, strict=strict)


def _version(text: str, where: str) -> tuple[int, int, int]:
    import re

    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise AdapterLoadError(f"{where}: version {text!r} is not a prefixvqa version (MAJOR.MINOR.PATCH)")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def compatible_config(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Apply the compatibility rule to a config written by another prefixvqa version.

    Same major version and not newer: loads as is (unknown fields are errors: the file is damaged). Newer minor or
    patch of the same major: loads with a warning naming both versions; fields this version does not know are
    dropped, each named (newer versions only add optional fields within a major version). Newer major: refused.
    A config without a version (written before versions were recorded) loads as is.
    """
    import warnings
    from dataclasses import fields as dc_fields

    from ._version import __version__
    from .config import _SECTIONS

    written = str(data.get("version") or "")
    if not written:
        return data
    theirs, ours = _version(written, where), _version(__version__, "prefixvqa")
    if theirs[0] > ours[0]:
        raise AdapterLoadError(f"{where} was written by prefixvqa {written}, a newer major version than this "
                               f"prefixvqa {__version__}: upgrade prefixvqa (pip install -U prefixvqa) to load it")
    if theirs <= ours:
        return data
    data = json.loads(json.dumps(data))
    dropped = []
    for section, kind in _SECTIONS.items():
        known = {f.name for f in dc_fields(kind)}
        for key in sorted(set(data.get(section) or {}) - known):
            data[section].pop(key)
            dropped.append(f"{section}.{key}")
    known_top = {f.name for f in dc_fields(AdapterConfig)}
    for key in sorted(set(data) - known_top):
        data.pop(key)
        dropped.append(key)
    warnings.warn(f"{where} was written by prefixvqa {written}, newer than this prefixvqa {__version__}; loading it"
                  + (f" without the field(s) this version does not know: {dropped}" if dropped else ""), stacklevel=3)
    return data


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged header or a truncated file is an AdapterLoadError naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError ... for damaged files
        raise AdapterLoadError(f"{file} is damaged or truncated (not a readable safetensors file): "
                               f"{exc.__class__.__name__}: {exc}") from None


def _with_manifest(folder: Path) -> Path:
    """A hub or downloaded folder must carry its manifest; loading then verifies it (once, in `check_integrity`)."""
    if not (folder / MANIFEST_NAME).is_file():
        raise AdapterLoadError(f"{folder / MANIFEST_NAME} is missing: an adapter from a hub must carry its manifest")
    return folder


def check_integrity(folder: Path) -> None:
    """Refuse a folder whose files differ from its manifest, or that holds files the manifest does not list (a
    tokenizer reads whatever it finds). A local folder saved before manifests existed only warns (a folder from a hub
    cannot get here without one: `resolve_adapter`)."""
    if not (folder / MANIFEST_NAME).is_file():
        import warnings

        warnings.warn(f"{folder} has no {MANIFEST_NAME}: its files cannot be checked for damage", stacklevel=3)
        return
    try:
        verify_manifest(folder, extra_ok=False)
    except IntegrityError as exc:
        raise AdapterLoadError(str(exc)) from None


def _source(cfg: AdapterConfig, part: str) -> str:
    return cfg.encoder.name if part == "encoder" else cfg.decoder.name


def _compare(file: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
              for k in sorted(set(got) & set(want)) if got[k].shape != want[k].shape]
    problems = [f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                f"shape mismatch {shapes[:5]}" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise AdapterLoadError(f"{file}: " + "; ".join(problems))


def model_card(cfg: AdapterConfig, card: dict[str, Any]) -> str:
    """A short model card: what the adapter is, how it was trained and scored, and what it must not be used for."""
    metrics = card.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return f"""---
library_name: prefixvqa
tags: [prefixvqa, medical-vqa, peft, lora]
base_model: {cfg.decoder.name}
---
# {cfg.name or 'prefixvqa adapter'}

{cfg.description or card.get('description', '')}

| part | setting |
|---|---|
| encoder | {cfg.encoder.backend} `{cfg.encoder.name}` (pretrained: `{cfg.encoder.pretrained}`), {cfg.encoder.features} features |
| mapper | `{cfg.mapper.kind}`, prefix length {cfg.mapper.prefix_length}, {cfg.mapper.in_dim} -> {cfg.mapper.out_dim} |
| decoder | `{cfg.decoder.name}` ({cfg.decoder.dtype}, quantization: {cfg.decoder.quantization}) |
| tuning | `{cfg.tuning.mode}` (r={cfg.tuning.r}, alpha={cfg.tuning.alpha}) |
| template | `{cfg.template.name}` |

## Training data
{card.get('data', 'Not recorded.')}

## Metrics
{('| metric | value |' + chr(10) + '|---|---|' + chr(10) + rows) if rows else 'Not recorded.'}

## Intended use and limits
Research on medical visual question answering. Not a medical device; not for diagnosis or clinical decisions.
Answers can be wrong with high confidence, and performance outside the training data's modalities is unknown.

## Loading
```python
from prefixvqa import MedVQAAdapter
model = MedVQAAdapter.from_pretrained("this-folder")
```
The peft part alone: `peft.PeftModel.from_pretrained(base_lm, "this-folder")`.
"""
