"""`MedVQAAdapter.from_vlm`: a released vision-language checkpoint as an ordinary adapter.

The layout is read from the checkpoint's own config (prefixvqa/vlm_layouts.py); the result's encoder is the
checkpoint's tower (transformers backend), its mapper holds the projector's weights, its decoder is the checkpoint's
language model (the base the adapter names, with revision and fingerprint), and its template is the checkpoint's
conversation format:

    LLaVA (llava / llava_llama), LLaVA-Rad   Vicuna v1 ("USER: <image>\\nQ ASSISTANT:"), LLaVA's `conv_vicuna_v1`
    LLaVA-Med v1.5 (llava_mistral)           Mistral instruct ("[INST] <image>\\nQ [/INST]"), `conv_mistral_instruct`
    MedGemma / Gemma 3 (gemma3)              Gemma's chat turns with the image between <start_of_image> and
                                             <end_of_image> as Gemma3Processor expands it (prompts.py `gemma3`)

Feature selection follows the config's `mm_vision_select_layer` / `mm_vision_select_feature`, preprocessing its
`image_aspect_ratio` (pad: LLaVA's expand2square), `mm_use_im_start_end` the two delimiter vectors (the checkpoint's
`<im_start>` / `<im_end>` embedding rows). Everything else of `AdapterConfig` can be overridden
(`from_vlm(path, tuning={"r": 16}, decoder={"quantization": "4bit"})`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .config import AdapterConfig
from .vlm_layouts import (LLAVA_TEXT_TYPES, PROJECTOR_KEYS, LayoutError, detect_layout, non_lora_tensors, read_config,
                          read_tensors, require)

if TYPE_CHECKING:
    from .model import MedVQAAdapter

__all__ = ["from_vlm", "vlm_config", "load_release_weights", "LORA_TARGETS"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # LLaVA: every linear
_TEMPLATES = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}  # the language model's conversation format
_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "mlp2x_gelu"}  # LLaVA's mm_projector_type -> mapper.kind


def vlm_config(source: str, revision: str | None = None, layout: str | None = None) -> AdapterConfig:
    """The AdapterConfig that rebuilds the released checkpoint `source` (local folder or hub id)."""
    layout = layout or detect_layout(source, revision)
    config, path = read_config(source, revision)
    if layout == "llava_hf":
        return _hf_config(source, revision, config, path)
    if layout == "gemma3":
        from .vlm_gemma3 import gemma3_config

        return gemma3_config(source, revision, config, path)
    require(config, path, "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer")
    text_type = LLAVA_TEXT_TYPES[config["model_type"]]
    projector = _PROJECTORS.get(config["mm_projector_type"])
    if projector is None:
        raise LayoutError(f"{path}: mm_projector_type={config['mm_projector_type']!r} is not one of "
                          f"{sorted(_PROJECTORS)}")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise LayoutError(f"{path}: mm_vision_select_feature={feature!r} is not 'patch' or 'cls_patch'")
    encoder = {"backend": "transformers", "name": config["mm_vision_tower"], "features": "patches",
               "layer": _block(config["mm_vision_select_layer"], path), "keep_cls": feature == "cls_patch",
               "image_aspect_ratio": "pad" if config.get("image_aspect_ratio") == "pad" else "square"}
    if "vision_tower_config" in config:  # LLaVA-Rad's open_clip tower: a model config file + a checkpoint
        encoder.update(backend="open_clip_file", **_open_clip_tower(source, config, path))
    if layout == "llava_lora":
        adapter, adapter_path = read_config(source, revision, "adapter_config.json")
        require(adapter, adapter_path, "base_model_name_or_path")
        decoder = {"name": adapter["base_model_name_or_path"], "layout": "llava_lora", "release": source}
        tuning = {"mode": "lora", "r": 64, "alpha": 128, "dropout": 0.05, "target_modules": LORA_TARGETS}
    else:
        decoder = {"name": source, "revision": revision, "layout": "llava"}
        tuning = {"mode": "lora", "r": 128, "alpha": 256, "dropout": 0.05, "target_modules": LORA_TARGETS}
    return AdapterConfig.from_dict({
        "encoder": encoder, "mapper": {"kind": projector}, "decoder": {**decoder, "dtype": "bfloat16"},
        "tuning": tuning, "generation": {"max_new_tokens": 1024},
        "template": {"name": _TEMPLATES[text_type], "image_position": "before_question", "max_length": 2048,
                     "image_start_end": bool(config.get("mm_use_im_start_end", False))},
        "name": f"from_vlm:{layout}", "description": f"imported from {source} ({layout} layout)"})


#: the tower config LLaVA-Rad's OpenCLIPVisionTower downloads from its release when the configured path is absent
LLAVA_RAD_TOWER_CONFIG = "biomedclipcxr_518.json"


def _open_clip_tower(source: str, config: dict, path: Any) -> dict[str, Any]:
    """`name` / `pretrained` of an open_clip tower given by file (LLaVA-Rad's OpenCLIPVisionTower): the path the config
    names when it exists here, else the file in the release (folder or hub repo), as LLaVA-Rad falls back to its
    release repo (the config: the file of that name, else `biomedclipcxr_518.json`, the name LLaVA-Rad downloads)."""
    from pathlib import Path

    require(config, path, "vision_tower_checkpoint")
    folder = Path(source).expanduser()

    def where(ref: str, fallback: str | None = None) -> str:
        if Path(ref).expanduser().is_file():
            return ref
        if not folder.is_dir():
            return f"{source}/{fallback or Path(ref).name}"
        names = [Path(ref).name] + ([fallback] if fallback else [])
        return str(next((folder / n for n in names if (folder / n).is_file()), folder / names[-1]))

    return {"name": where(config["vision_tower_config"], LLAVA_RAD_TOWER_CONFIG),
            "pretrained": where(config["vision_tower_checkpoint"])}


def _block(select_layer: int, path: Any) -> int:
    """LLaVA's `hidden_states[select_layer]` as the block index `encoder.layer` counts (hidden_states[0] is the
    embeddings: a non-negative index k is block k - 1)."""
    if select_layer == 0:
        raise LayoutError(f"{path}: mm_vision_select_layer=0 selects the embeddings, not a block's output")
    return select_layer if select_layer < 0 else select_layer - 1


def _hf_config(source: str, revision: str | None, config: dict, path: Any) -> AdapterConfig:
    """transformers' LlavaForConditionalGeneration: tower, projector and language model in one folder."""
    require(config, path, "vision_config", "text_config")
    strategy = config.get("vision_feature_select_strategy", "default")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise LayoutError(f"{path}: vision_feature_layer={layer!r}: several layers are not imported")
    if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
        raise LayoutError(f"{path}: projector_hidden_act / multimodal_projector_bias other than gelu / true")
    text_type = config["text_config"].get("model_type", "llama")
    return AdapterConfig.from_dict({
        "encoder": {"backend": "transformers", "name": source, "revision": revision, "layout": "llava_hf",
                    "features": "patches", "layer": _block(layer, path), "keep_cls": strategy == "full"},
        "mapper": {"kind": "mlp2x_gelu"}, "decoder": {"name": source, "revision": revision, "layout": "llava_hf",
                                                      "dtype": "bfloat16"},
        "tuning": {"mode": "lora", "r": 128, "alpha": 256, "dropout": 0.05, "target_modules": LORA_TARGETS},
        "template": {"name": _TEMPLATES.get(text_type, "vicuna_v1"), "image_position": "before_question",
                     "max_length": 2048}, "generation": {"max_new_tokens": 1024},
        "name": "from_vlm:llava_hf", "description": f"imported from {source} (llava_hf layout)"})


def projector_state(source: str, layout: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """The projector's tensors, named as the mapper names them (`net.0.weight`, ...)."""
    if layout == "gemma3":
        from .vlm_gemma3 import gemma3_projector_state

        return gemma3_projector_state(source, revision)
    pattern, index = PROJECTOR_KEYS["llava_hf" if layout == "llava_hf" else "llava"]
    import re

    regex = re.compile(pattern)
    found = non_lora_tensors(source) if layout == "llava_lora" else read_tensors(source, pattern, revision)
    out = {}
    for key, value in found.items():
        match = regex.search(key)
        if match:
            out[f"net.{index[match.group(1)]}.{match.group(2)}"] = value.float()
    if not out:
        where = "non_lora_trainables.bin" if layout == "llava_lora" else "weight files"
        raise LayoutError(f"{source}: no projector tensors ({pattern}) in its {where}")
    return out


def from_vlm(cls: type[MedVQAAdapter], source: str, *, revision: str | None = None, seed: int | None = 0,
             **overrides: Any) -> MedVQAAdapter:
    """Build the adapter for a released checkpoint (see the module docstring), then load the projector into its
    mapper (every tensor, exact shapes) and LLaVA's `<im_start>` / `<im_end>` rows into its delimiters."""
    layout = detect_layout(source, revision)
    config = vlm_config(source, revision, layout)
    if overrides:
        config = config.replace(**overrides)
    model = cls(config, seed=seed)
    load_release_weights(model)
    return model


def load_release_weights(model: MedVQAAdapter) -> None:
    """Load the projector of the checkpoint the decoder is read from (`decoder.layout`) into the mapper (every
    tensor, exact shapes) and LLaVA's `<im_start>` / `<im_end>` rows into its delimiters: what `from_vlm` and a
    released-weights preset (`from_preset`) do after building the model."""
    d = model.config.decoder
    if not d.layout:
        return
    source = d.release if d.layout == "llava_lora" else d.name
    mapper = model.mapper.mapper if model.config.template.image_start_end else model.mapper
    state = projector_state(source, d.layout, d.revision)
    expected = mapper.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        raise LayoutError(f"{source}: projector tensors missing {missing} or of another shape {wrong} "
                          f"(mapper.kind={model.config.mapper.kind!r})")
    mapper.load_state_dict({k: state[k] for k in expected})
    if model.config.template.image_start_end:
        _load_delimiters(model, source)


def _load_delimiters(model: MedVQAAdapter, source: str) -> None:
    """`<im_start>` / `<im_end>` as the checkpoint's own embedding rows of those tokens."""
    tok = model.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>")]
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise LayoutError(f"{source}: mm_use_im_start_end is set but its tokenizer has no <im_start>/<im_end>")
    rows = model.decoder.get_input_embeddings().weight[ids]
    with torch.no_grad():
        model.mapper.delimiters.copy_(rows.float())
