"""Released vision-language checkpoints as their authors lay them out: what is where, read from the checkpoint's own
config (never from its name). The decoder loader, the transformers tower and `MedVQAAdapter.from_vlm`
(prefixvqa/vlm_import.py) ask here.

    llava        haotian-liu/LLaVA and LLaVA-Med v1.5 (`model_type` llava / llava_llama / llava_mistral): one
                 checkpoint whose language model has the plain LlamaForCausalLM / MistralForCausalLM names, the
                 projector beside it (`model.mm_projector.*`), the tower named by `mm_vision_tower` (its own repo)
    llava_lora   a LoRA release of that layout (LLaVA-Rad): `adapter_config.json` + LoRA weights over a base LM
                 (`base_model_name_or_path`), the projector in `non_lora_trainables.bin`; merged as LLaVA's builder
                 merges it (`merge_and_unload`)
    llava_hf     transformers' LlavaForConditionalGeneration (`vision_config` + `text_config`): language model,
                 tower and `multi_modal_projector` in one checkpoint (old `language_model.*` names or v5 `model.*`)
    gemma3       transformers' Gemma3ForConditionalGeneration (MedGemma; `model_type` gemma3 with `vision_config` +
                 `text_config`): SigLIP tower, the pooling `multi_modal_projector`, the Gemma 3 language model, whose
                 image tokens attend to each other both ways (`IMAGE_ATTENTION`)

Released files are safetensors where the release has them; a release that ships only PyTorch `.bin` files is read
with `torch.load(weights_only=True)` (tensors only, no code), with a printed line saying so. prefixvqa itself writes
safetensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import PrefixVQAError

__all__ = ["LayoutError", "read_config", "checkpoint_file", "detect_layout", "read_tensors", "text_config",
           "decoder_kwargs", "merge_release_lora", "tower_state", "LLAVA_TEXT_TYPES", "PROJECTOR_KEYS",
           "IMAGE_ATTENTION", "COMPOSITE_LAYOUTS"]

#: LLaVA's model_type -> the transformers language model its weights are (llava_arch.py's LlavaLlama/Mistral classes)
LLAVA_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
#: config keys that belong to LLaVA's multimodal wrapper, not to the language model's config
_WRAPPER_KEYS = re.compile(r"^(mm_|image_|tune_mm|freeze_mm|use_mm|unfreeze_mm|tokenizer_|vision_tower)")
#: where each layout keeps its projector, as regexes on the normalised tensor names -> the mapper's layer index
PROJECTOR_KEYS = {"llava": (r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", {None: 0, "0": 0, "2": 2}),
                  "llava_hf": (r"^(?:model\.)?multi_modal_projector\.linear_(\d)\.(weight|bias)$", {"1": 0, "2": 2}),
                  "gemma3": (r"^(?:model\.)?multi_modal_projector\.(mm_input_projection_weight|mm_soft_emb_norm)"
                             r"(\.weight)?$", {})}
#: layouts that hold tower, projector and language model in one transformers checkpoint (`vision_config` +
#: `text_config`), their language model's tensors under `language_model.model.*` (old) or `model.language_model.*`
COMPOSITE_LAYOUTS = ("llava_hf", "gemma3")
#: how a layout's language model attends over image tokens, where it differs from causal: Gemma 3 lets the tokens of
#: one image attend to each other both ways (transformers builds it from token_type_ids; prefixvqa from image_mask)
IMAGE_ATTENTION = {"gemma3": "bidirectional"}


class LayoutError(PrefixVQAError, ValueError):
    """A checkpoint whose layout is unknown or incomplete; the message names the file and the missing key."""


def checkpoint_file(source: str, filename: str, revision: str | None = None, *, required: bool = True
                    ) -> Path | None:
    """A file of a checkpoint folder or hub repo (offline: from the cache only); None when absent and not required."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
        if path.is_file():
            return path
    else:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(source, filename, revision=revision))
        except Exception as exc:  # noqa: BLE001 (not found, offline, gated: all mean "not here")
            if required:
                raise LayoutError(f"{source}: cannot read {filename} ({type(exc).__name__}: {exc})") from None
            return None
    if required:
        raise LayoutError(f"{local / filename}: file not found")
    return None


def read_config(source: str, revision: str | None = None, filename: str = "config.json") -> tuple[dict, Path]:
    """The checkpoint's own config dict and the file it came from."""
    path = checkpoint_file(source, filename, revision)
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc})") from None


def require(config: dict, path: Path, *keys: str) -> None:
    """Every key must be in the config; else one error naming the file and the missing keys."""
    missing = [k for k in keys if k not in config]
    if missing:
        kind = "Gemma 3" if config.get("model_type") == "gemma3" else "LLaVA"
        raise LayoutError(f"{path}: missing key(s) {missing} of a {kind}-layout config")


def detect_layout(source: str, revision: str | None = None) -> str:
    """The layout of a checkpoint, from its config.json (and, for a LoRA release, its adapter_config.json)."""
    config, path = read_config(source, revision)
    model_type = config.get("model_type")
    if model_type is None:
        raise LayoutError(f"{path}: missing key 'model_type'; cannot tell which layout this checkpoint has")
    if "vision_config" in config and "text_config" in config and model_type == "llava":
        return "llava_hf"
    if model_type == "gemma3":
        require(config, path, "vision_config", "text_config", "mm_tokens_per_image")
        return "gemma3"
    if model_type in LLAVA_TEXT_TYPES:
        require(config, path, "mm_vision_tower", "mm_projector_type", "mm_hidden_size")
        if checkpoint_file(source, "adapter_config.json", revision, required=False) is not None:
            return "llava_lora"
        return "llava"
    raise LayoutError(f"{path}: model_type={model_type!r} is not a layout prefixvqa imports (LLaVA: "
                      f"{sorted(LLAVA_TEXT_TYPES)} with mm_* keys; transformers' llava with vision_config; gemma3)")


def _weight_files(source: str, revision: str | None) -> list[Path]:
    """The checkpoint's weight files: safetensors (sharded through an index or single), else PyTorch .bin files."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = checkpoint_file(source, index_name, revision, required=False)
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [checkpoint_file(source, s, revision) for s in shards]
        path = checkpoint_file(source, single, revision, required=False)
        if path is not None:
            return [path]
    raise LayoutError(f"{source}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one released file: safetensors, or (a release without safetensors) a PyTorch file read with
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    print(f"prefixvqa: reading {path} with torch.load(weights_only=True): the release has no safetensors file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only's refusal (an UnpicklingError) or a damaged file: one line naming it
        raise LayoutError(f"{path}: holds objects other than tensors, which prefixvqa does not unpickle (it reads "
                          f"released PyTorch files with weights_only=True only): {str(exc).splitlines()[0]}") from None


def read_tensors(source: str, pattern: str, revision: str | None = None, files: list[Path] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose (normalised) names match the regex `pattern`. LoRA-release names are
    normalised as LLaVA's builder does: `base_model.` dropped, then `model.` once when names start `model.model.`."""
    regex, out = re.compile(pattern), {}
    for path in files or _weight_files(source, revision):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if regex.search(k)})
        else:
            tensors = normalise_release_names(load_tensor_file(path))
            out.update({k: v for k, v in tensors.items() if regex.search(k)})
    return out


def normalise_release_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`non_lora_trainables` names as LLaVA's builder rewrites them before loading."""
    tensors = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in tensors.items()}
    if any(k.startswith("model.model.") for k in tensors):
        tensors = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
    return tensors


def text_config(layout: str, source: str, revision: str | None = None) -> Any:
    """The language model's transformers config inside a checkpoint of that layout."""
    from transformers import AutoConfig

    config, path = read_config(source, revision)
    if layout in COMPOSITE_LAYOUTS:
        require(config, path, "text_config")
        text = dict(config["text_config"])
        if layout == "gemma3":  # a released Gemma3Config may leave text_config's model_type to its default
            text.setdefault("model_type", "gemma3_text")
        if "model_type" not in text:
            raise LayoutError(f"{path}: missing key 'text_config.model_type'")
        return AutoConfig.for_model(**text)
    require(config, path, "model_type")
    model_type = LLAVA_TEXT_TYPES.get(config["model_type"])
    if model_type is None:
        raise LayoutError(f"{path}: model_type={config['model_type']!r} is not one of {sorted(LLAVA_TEXT_TYPES)}")
    keep = {k: v for k, v in config.items() if not _WRAPPER_KEYS.match(k) and not k.startswith("_")
            and k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(model_type, **keep)


def decoder_kwargs(cfg: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that read the language model out of the checkpoint `cfg.name` of `cfg.layout`."""
    if cfg.layout == "llava_lora":
        return {}  # `name` is the base LM itself; the release's LoRA is merged after loading
    kwargs: dict[str, Any] = {"config": text_config(cfg.layout, cfg.name, cfg.revision)}
    if cfg.layout in COMPOSITE_LAYOUTS:  # old (language_model.model.*) and v5 (model.language_model.*) names
        kwargs["key_mapping"] = {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
                                 r"^model\.language_model\.": "model."}
    return kwargs


def merge_release_lora(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """The base LM with a LoRA release merged in (llava_lora), as LLaVA's builder loads it: the release's
    non-LoRA language-model tensors (resized embeddings, if any) loaded first, then its LoRA merged."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapter_cfg, adapter_path = read_config(cfg.release, None, "adapter_config.json")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        weights = checkpoint_file(cfg.release, name, None, required=False)
        if weights is not None:
            break
    else:
        raise LayoutError(f"{adapter_path.parent}: no adapter_model.safetensors or adapter_model.bin")
    extra = non_lora_tensors(cfg.release)
    own = {k: v for k, v in extra.items() if "mm_projector" not in k and "vision_tower" not in k}
    if own:
        missing = [k for k in own if k not in model.state_dict()]
        if missing:
            raise LayoutError(f"{cfg.release}/non_lora_trainables.bin: tensors {missing[:3]} are not in the base LM")
        model.load_state_dict(own, strict=False)
    fields = {k: v for k, v in adapter_cfg.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
    peft_model = get_peft_model(model, LoraConfig(**fields))
    set_peft_model_state_dict(peft_model, load_tensor_file(weights))
    return peft_model.merge_and_unload()


def non_lora_tensors(release: str) -> dict[str, torch.Tensor]:
    """A LoRA release's `non_lora_trainables` (projector and any other trained non-LoRA tensors), names normalised."""
    for name in ("non_lora_trainables.safetensors", "non_lora_trainables.bin"):
        path = checkpoint_file(release, name, None, required=False)
        if path is not None:
            return normalise_release_names(load_tensor_file(path))
    raise LayoutError(f"{release}: no non_lora_trainables.bin (the projector of a LLaVA LoRA release)")


def tower_state(source: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """The vision tower's tensors inside a llava_hf / gemma3 checkpoint, named as its own model class names them."""
    tensors = read_tensors(source, r"^(model\.)?vision_tower\.", revision)
    if not tensors:
        raise LayoutError(f"{source}: no vision_tower.* tensors in its weight files")
    return {re.sub(r"^(model\.)?vision_tower\.", "", k): v for k, v in tensors.items()}
