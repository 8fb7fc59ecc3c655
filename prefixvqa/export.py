"""`prefixvqa export ADAPTER --merge --out DIR`: one folder that needs neither peft nor bitsandbytes.

    DIR/decoder/                 a plain transformers model (config.json, model.safetensors, tokenizer): the base
                                 weights with every LoRA (or DoRA) update folded in, in full precision
    DIR/prefixvqa_config.json    tuning.mode "frozen", decoder.name "adapter:decoder" (resolved against DIR on load)
    DIR/mapper.safetensors, processor files, README.md, manifest.sha256.json

Merging works in the linear orientation (out, in) for every layer kind: a bitsandbytes 4-bit/8-bit weight is
dequantised first, a transformers Conv1D (GPT-2) weight is transposed in and out, and the LoRA delta is
`B @ A * scaling`; DoRA then rescales each output row to its learned magnitude, exactly as peft's own merge does.
Which modes can be exported is the mode's `mergeable` attribute (soft prompts cannot). Precision caveat for a
quantised (QLoRA / 8-bit) base: the merged weights are the *dequantised* base plus the delta, so the export
reproduces the adapter as trained (up to the float rounding of the output dtype) but its base weights carry the
quantisation error, not the original full-precision checkpoint's values; merging the delta into the original weights
instead would change the function the LoRA was trained against. Quantising the merged model again would round the
(small) LoRA delta away along with it.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import DTYPES, ConfigError

if TYPE_CHECKING:
    from .model import MedVQAAdapter

DECODER_DIR = "decoder"
PRECISION_CAVEAT = ("merged after dequantising the {quant} base: the merged weights are the dequantised base plus "
                    "the LoRA delta, so they carry the quantisation error of the original checkpoint (they are not "
                    "its full-precision values), and re-quantising the merged model would round the LoRA delta "
                    "away. {how}")
CAVEAT_HOW = {"4bit": "4-bit layers dequantise their weights to compute, so the export computes what the adapter "
                      "computed up to {dtype} rounding.",
              "8bit": "LLM.int8 layers also round their inputs to int8 at run time; the {dtype} export does not, so "
                      "its outputs differ from the 8-bit adapter's by that activation rounding."}


def _bnb_kind(layer: nn.Module) -> str | None:
    weight = getattr(layer, "weight", None)
    name = type(weight).__name__
    return "4bit" if name == "Params4bit" else "8bit" if name == "Int8Params" else None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as float32 (out, in); undoes bitsandbytes' CPU inference packing first."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = layer.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ConfigError("this model has run bitsandbytes' CPU inference kernel, which repacks 4-bit weights with "
                          "bfloat16 statistics (lossy); export from a freshly loaded adapter (`prefixvqa export` "
                          "loads it from its folder)")
    return dequantize_bnb_weight(weight, state=getattr(layer, "state", None)).float()


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as float32 in the (out, in) orientation."""
    from transformers.pytorch_utils import Conv1D

    if _bnb_kind(layer):
        return dequantized_weight(layer)
    weight = layer.weight.detach().float()
    return weight.t() if isinstance(layer, Conv1D) else weight


def _fold_lora(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (float32, (out, in)) with the layer's active LoRA adapters folded in, in the order and by the rule of
    peft's `LoraLayer.merge`: LoRA adds `B @ A * scaling`; DoRA (Liu et al. 2024) then rescales every output row of
    `W + B @ A * scaling` to its learned magnitude, `m * V / ||V||` with the norm over the input dimension."""
    for name in module.active_adapters:
        if name not in getattr(module, "lora_A", {}):
            continue
        a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
        weight = weight + b @ a * module.scaling[name]
        if getattr(module, "use_dora", {}).get(name):
            magnitude = module.lora_magnitude_vector[name].weight.float()
            weight = weight * (magnitude / torch.linalg.norm(weight, dim=1))[:, None]
    return weight


def _plain_model(source: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An uninitialised plain transformers model of `source`'s architecture (no quantisation settings), in `dtype`."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = source.config.__class__.from_dict(source.config.to_dict())
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    with no_init_weights():
        target = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target.tie_weights()
    return target


def merged_decoder(model: "MedVQAAdapter", dtype: torch.dtype) -> nn.Module:
    """A plain transformers causal LM computing what `model.decoder` (+LoRA/DoRA) computes, in `dtype`."""
    from transformers.pytorch_utils import Conv1D

    tuning = model.config.tuning
    method = tuning.method
    if not method.mergeable:
        why = ("learns soft prompts, which have no weights to merge into" if method.soft_prompt else
               "learns nothing that folds into plain decoder weights")
        raise ConfigError(f"tuning.mode={tuning.mode!r} {why}; share the adapter folder itself (peft loads it)")
    source = model.decoder.get_base_model() if method.uses_peft_files else model.decoder
    target = _plain_model(source, dtype)
    modules = dict(source.named_modules())
    lora = set()
    if method.uses_peft_files:
        from peft.tuners.lora import LoraLayer

        lora = {name for name, m in modules.items() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for module_name, module in target.named_modules():
            local = dict(module.named_parameters(recurse=False))
            local.update({k: b for k, b in module.named_buffers(recurse=False)
                          if k not in module._non_persistent_buffers_set})
            if not local:
                continue
            src = modules[module_name]
            layer = src.get_base_layer() if module_name in lora else src
            for pname, tensor in local.items():
                if pname == "weight" and (_bnb_kind(layer) or module_name in lora):
                    value = _linear_weight(layer)
                    value = _fold_lora(src, value) if module_name in lora else value
                    value = value.t() if isinstance(module, Conv1D) else value
                else:
                    value = getattr(layer, pname).detach().float()
                if value.shape != tensor.shape:
                    raise RuntimeError(f"merge: {module_name}.{pname} has shape {tuple(value.shape)}, the plain "
                                       f"model expects {tuple(tensor.shape)}")
                tensor.copy_(value.to(tensor.dtype))
    return target.eval()


EARLIER_EXPORT = "an earlier merged export"


def earlier_export(out: Path) -> bool:
    """The proof `export --out` needs to replace an existing folder: empty, or a merged export prefixvqa wrote (its
    manifest lists every file, its decoder lives inside it). Not any adapter: `--out` pointed at the adapter being
    exported, or at a project, would otherwise be swapped out and deleted."""
    from .adapter_io import INSIDE
    from .fileio import written_by_prefixvqa

    if not written_by_prefixvqa(out):
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / "prefixvqa_config.json").read_text())["decoder"]["name"].startswith(INSIDE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def export_merged(model: "MedVQAAdapter", out: str | Path, dtype: str | None = None) -> tuple[Path, str | None]:
    """Write the merged export of `model` into `out` (atomically); returns (folder, precision caveat or None).

    An existing `out` is replaced only when it is empty or an earlier merged export (`earlier_export`); anything
    else (a user's folder, the adapter itself) raises `fileio.OverwriteRefused` naming it before the merge starts. A
    failed write (a full disk) raises an OSError naming `out` and leaves an earlier export as it was."""
    from ._version import __version__
    from .adapter_io import INSIDE, write_adapter_files
    from .fileio import atomic_dir, refuse_foreign, safetensors_errors
    from .model import MedVQAAdapter

    out = Path(out)
    if model.image_attention is not None:  # a plain causal LM folder would lose Gemma 3's image-attention rule
        raise ConfigError(f"export --merge: decoder.layout={model.config.decoder.layout!r} attends over image tokens "
                          f"{model.image_attention}ly, which a plain merged causal-LM folder cannot record; use the "
                          "adapter folder (it reloads against the release)")
    refuse_foreign(out, earlier_export, EARLIER_EXPORT)  # before the (slow) merge

    quant = model.config.decoder.quantization
    dtype_name = dtype or model.config.decoder.dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"--dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    merged = merged_decoder(model, getattr(torch, dtype_name))
    caveat = (PRECISION_CAVEAT.format(quant=quant, how=CAVEAT_HOW[quant].format(dtype=dtype_name))
              if quant else None)
    cfg = model.config.replace(
        decoder={"name": INSIDE + DECODER_DIR, "revision": None, "gguf_file": None, "model_config": None,
                 "tokenizer": None, "dtype": dtype_name, "quantization": None, "gradient_checkpointing": False,
                 "layout": None, "release": None},  # the merged decoder is a plain causal LM folder
        tuning={"mode": "frozen"},
        description=(model.config.description + " " if model.config.description else "") +
        f"Merged export (prefixvqa {__version__}) of a {model.config.tuning.mode} adapter on "
        f"{model.config.decoder.name}." + (f" Note: {caveat}." if caveat else ""))
    exported = MedVQAAdapter(cfg, encoder=model.encoder, decoder=merged, tokenizer=model.tokenizer)
    exported.mapper.load_state_dict(model.mapper.state_dict())
    exported.processor = model.processor
    card: dict[str, Any] = {"description": cfg.description}
    with atomic_dir(out, overwrite=earlier_export, what=EARLIER_EXPORT) as tmp:
        with safetensors_errors(tmp / DECODER_DIR):  # transformers writes it with safetensors
            merged.save_pretrained(str(tmp / DECODER_DIR))
        model.tokenizer.save_pretrained(str(tmp / DECODER_DIR))
        write_adapter_files(exported, tmp, card)  # its manifest covers decoder/ too
    return out, caveat
