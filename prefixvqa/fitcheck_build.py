"""fit-check's model side: the adapter's parts built from configs alone, and the bytes their weights hold.

Architectures come from configs (a transformers decoder config, an open_clip model config); the models are built
under torch's FakeTensorMode (shapes and dtypes, no storage) by the same code that training uses (open_clip,
transformers' bitsandbytes layer replacement, peft), so parameter counts, LoRA/DoRA targets and quantised layers are
the real ones. Quantised layers are counted by their packed bytes (`quantized_linear_bytes`); peft's k-bit
preparation upcasts a quantised model's other fp16/bf16 weights to fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import AdapterConfig, ConfigError

RECORD_KEYS = ("_name_or_path", "_source")  # a preset's recorded decoder: which model, where it was read; not config
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block size and its double-quantisation block size


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str, double_quant: bool = True) -> int:
    """Bytes a bitsandbytes layer's weight holds: packed data plus its quantisation statistics.

    4-bit (nf4/fp4): two weights per byte; one absmax per block of 64, stored as fp32 or, with double quantisation,
    as uint8 plus one fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset; the 16-entry fp32
    lookup table. 8-bit (LLM.int8): one int8 per weight plus one fp32 scale per output row.
    """
    n = out_features * in_features
    if quantization == "8bit":
        return n + 4 * out_features
    if quantization != "4bit":
        raise ConfigError(f"quantization {quantization!r} is not '4bit' or '8bit'")
    blocks = math.ceil(n / NF4_BLOCK)
    stats = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return (n + 1) // 2 + stats + 4 * 16


def measured_weight_bytes(module: nn.Module) -> int:
    """What a loaded module's parameters, buffers and bitsandbytes quantisation states occupy (unique storages).

    The reference the predictions are tested against on tiny models."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())

    for t in [*module.parameters(), *module.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for nested in (state, getattr(state, "state2", None)):
                if nested is not None:
                    add(nested.absmax), add(nested.code)
            add(getattr(state, "offset", None))
        add(getattr(t, "SCB", None))
    return sum(seen.values())


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (asked of torch, so every dtype the configs name is covered)."""
    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass
class Architecture:
    """The configs fit-check builds from: a transformers decoder config and an open_clip model config."""

    decoder: Any  # transformers PretrainedConfig
    encoder: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def decoder_architecture(cfg: AdapterConfig, override: str | dict | None = None,
                         recorded: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(transformers config, where it came from): a --decoder-config file, the config's own `model_config`, the
    local folder / GGUF / hub cache, or the architecture recorded in the preset file for this decoder name (its
    `_source` says where it was read)."""
    from transformers import AutoConfig

    from .decoder import _resolve

    if override is not None:
        data = json.loads(Path(override).read_text()) if not isinstance(override, dict) else override
        return AutoConfig.for_model(**data), f"--decoder-config {override if isinstance(override, str) else ''}"
    d = cfg.decoder
    if d.model_config is not None:
        return AutoConfig.for_model(**d.model_config), "decoder.model_config"
    if d.layout in ("llava", "llava_hf", "gemma3"):  # the language model inside a released vision-language checkpoint
        from .vlm_layouts import LayoutError, text_config

        try:
            return text_config(d.layout, d.name, d.revision), f"{d.name} ({d.layout} layout)"
        except LayoutError:
            pass  # not here: the recorded architecture below
    source, gguf = _resolve(d)
    try:
        kwargs = {"gguf_file": gguf} if gguf else {"revision": d.revision}
        return AutoConfig.from_pretrained(source, **kwargs), f"{source}{'/' + gguf if gguf else ''}"
    except (OSError, ValueError) as exc:
        if recorded and recorded.get("_name_or_path") == d.name:
            fields = {k: v for k, v in recorded.items() if k not in RECORD_KEYS}
            return AutoConfig.for_model(**fields), f"recorded in the preset file ({recorded.get('_source', '?')})"
        raise ConfigError(f"fit-check needs decoder {d.name!r}'s config.json, which is not available here ({exc}); "
                          "pass --decoder-config FILE (a transformers config.json)") from None


def encoder_architecture(cfg: AdapterConfig, override: str | dict | None = None,
                         recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(open_clip model config with the encoder's overrides applied, where it came from); for the transformers
    backend {"transformers_config": the tower's config dict}."""
    import open_clip

    e = cfg.encoder
    if e.backend == "transformers":
        return hf_encoder_architecture(cfg, override, recorded)
    if override is not None:
        data = json.loads(Path(override).read_text()) if not isinstance(override, dict) else override
        base, source = data.get("model_cfg", data), "--encoder-config"
    elif e.backend == "open_clip_file" and not (recorded and recorded.get("name") == e.name):
        from .vision import ModelNotAvailableError, resolve_file  # an open_clip config file (LLaVA-Rad's tower)

        try:
            base, source = json.loads(resolve_file(e.name).read_text()), e.name
        except ModelNotAvailableError as exc:
            raise ConfigError(f"fit-check needs encoder {e.name!r}: {exc}; pass --encoder-config FILE") from None
    elif not e.name.startswith("hf-hub:") and open_clip.get_model_config(e.name):
        base, source = open_clip.get_model_config(e.name), f"open_clip config {e.name}"
    elif recorded and recorded.get("name") == e.name:
        base, source = recorded["model_cfg"], f"recorded in the preset file ({recorded.get('source', '?')})"
    else:
        try:
            from open_clip.factory import _get_hf_config

            base, source = _get_hf_config(e.name[len("hf-hub:"):])["model_cfg"], e.name
        except Exception as exc:  # open_clip/huggingface_hub raise several types for "not cached, offline"
            raise ConfigError(f"fit-check needs encoder {e.name!r}'s open_clip config, not available here ({exc}); "
                              "pass --encoder-config FILE (its open_clip_config.json)") from None
    merged = {**base, **e.model_overrides}  # open_clip merges create_model keyword overrides the same way
    if e.image_size:
        merged["vision_cfg"] = {**merged["vision_cfg"], "image_size": e.image_size}
    return merged, source


def hf_encoder_architecture(cfg: AdapterConfig, override: str | dict | None = None,
                            recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """A transformers tower's config (its `vision_config` where the checkpoint is a composite CLIP/SigLIP model):
    from --encoder-config, the folder or hub cache, or the one recorded in the preset file."""
    from transformers import AutoConfig

    e = cfg.encoder
    if override is not None:
        data = json.loads(Path(override).read_text()) if not isinstance(override, dict) else override
        source = "--encoder-config"
    elif recorded and recorded.get("name") == e.name and "transformers_config" in recorded:
        data, source = recorded["transformers_config"], "the architecture recorded in the preset file"
    else:
        try:
            data, source = AutoConfig.from_pretrained(e.name, revision=e.revision).to_dict(), e.name
        except (OSError, ValueError) as exc:
            raise ConfigError(f"fit-check needs encoder {e.name!r}'s config.json, not available here ({exc}); "
                              "pass --encoder-config FILE (its config.json)") from None
    data = dict(data.get("vision_config") or data)
    data.setdefault("model_type", "clip_vision_model")
    return {"transformers_config": {**data, **e.model_overrides}}, source


@contextlib.contextmanager
def fake_mode() -> Iterator[Any]:
    """FakeTensorMode with module moves made no-ops: every fake tensor is on the same (CPU) device already, and
    moving a fake parameter would swap tensors, which fake mode refuses. transformers treats fake tensors as traced,
    so data-dependent checks are skipped."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, \
            mock.patch.object(nn.Module, "to", lambda self, *a, **k: self):
        yield mode


@dataclass
class FakeParts:
    """The adapter's parts built without storage, with the quantised layer names and each part's parameters."""

    encoder: nn.Module
    mapper: nn.Module
    decoder: nn.Module
    quantized: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    layers: list[nn.Module]
    num_image_tokens: int
    feature_dim: int


def build_fake(cfg: AdapterConfig, arch: Architecture) -> FakeParts:
    """Encoder tower, mapper and decoder (+ peft) as FakeTensorMode modules; call inside `fake_mode()`."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .decoder import apply_tuning
    from .encoders import wrap_tower
    from .mappers import build_mapper

    encoder = wrap_tower(vision_tower(arch), None, cfg.encoder)
    encoder.requires_grad_(not cfg.encoder.freeze)
    num_tokens, feat_dim = encoder.output_shape()
    dtype = getattr(torch, cfg.decoder.dtype)
    with no_init_weights():  # no random init (fast); tying is part of init, so tie as from_pretrained does
        decoder = AutoModelForCausalLM.from_config(arch.decoder, dtype=dtype)
    decoder.tie_weights()
    quantized: dict[str, tuple[int, int]] = {}
    if cfg.decoder.quantization:
        quantized = _quantize_fake(decoder, cfg)
        _prepare_kbit(decoder, quantized)
    if cfg.decoder.gradient_checkpointing:
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embed_dim = decoder.get_input_embeddings().embedding_dim
    mapper = build_mapper(cfg.replace(mapper={"in_dim": feat_dim, "out_dim": embed_dim}).mapper,
                          cfg.template.image_start_end)
    decoder = apply_tuning(decoder, cfg.tuning)
    no_split = set(getattr(_base(decoder), "_no_split_modules", None) or [])
    layers = [m for m in decoder.modules() if type(m).__name__ in no_split]
    return FakeParts(encoder, mapper, decoder, quantized, layers, num_tokens, feat_dim)


def vision_tower(arch: Architecture) -> nn.Module:
    """open_clip's image tower for the architecture, with fake weights. Built on the meta device outside fake mode
    (timm reads a few real scalars while building), then given fake storage-less tensors of the same shapes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
        if "transformers_config" in arch.encoder:
            from transformers import AutoConfig, AutoModel

            visual = AutoModel.from_config(AutoConfig.for_model(**arch.encoder["transformers_config"]))
        else:
            from open_clip.model import _build_vision_tower

            visual = _build_vision_tower(arch.encoder["embed_dim"], arch.encoder["vision_cfg"],
                                         arch.encoder.get("quick_gelu", False))
    for module in visual.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return visual


def _base(decoder: nn.Module) -> nn.Module:
    return decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder


def _quantize_fake(decoder: nn.Module, cfg: AdapterConfig) -> dict[str, tuple[int, int]]:
    """The layers transformers' bitsandbytes integration would replace (same skip rules), kept as fake linears in
    the compute dtype that cast their input and output like bitsandbytes' layers do."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(decoder, None, getattr(decoder, "_keep_in_fp32_modules", None))
    compute = torch.float32 if cfg.decoder.dtype == "float32" else getattr(torch, cfg.decoder.dtype)
    names: dict[str, tuple[int, int]] = {}
    for name, module in list(decoder.named_modules()):
        if not (isinstance(module, Conv1D) or type(module) is nn.Linear) or not should_convert_module(name, skip):
            continue
        in_f, out_f = module.weight.shape if isinstance(module, Conv1D) else (module.in_features, module.out_features)
        layer = FakeQuantLinear(in_f, out_f, module.bias is not None, compute, cfg.decoder.quantization)
        decoder.set_submodule(name, layer)
        names[name] = (out_f, in_f)
    return names


class FakeQuantLinear(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit / Linear8bitLt in the fake trace: input cast to the compute dtype,
    output cast back; 8-bit layers also keep their input for backward (bitsandbytes' MatMul8bitLt does)."""

    def __init__(self, in_f: int, out_f: int, bias: bool, compute: torch.dtype, quantization: str):
        super().__init__(in_f, out_f, bias=bias, dtype=compute)
        self.quantization = quantization
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def _prepare_kbit(decoder: nn.Module, quantized: dict[str, tuple[int, int]]) -> None:
    """peft's prepare_model_for_kbit_training on the fake model: fp16/bf16 weights outside the quantised layers
    (embeddings, norms, head, biases) become fp32; input gradients are enabled by the trace itself."""
    quant_weights = {f"{n}.weight" for n in quantized}
    for name, p in decoder.named_parameters():
        p.requires_grad_(False)
        if name not in quant_weights and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def unique_params(parts: FakeParts) -> list[nn.Parameter]:
    """Every parameter of encoder, mapper and decoder once (tied weights counted once), to sum trained bytes."""
    seen, out = set(), []
    for module in (parts.encoder, parts.mapper, parts.decoder):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def set_groups(parts: FakeParts, groups: Sequence[str]) -> None:
    """The trainer's `set_trainable`: exactly these groups train (same grouping as MedVQAAdapter.parameter_groups)."""
    from .decoder import is_peft_param

    parts.encoder.requires_grad_("encoder" in groups)
    parts.mapper.requires_grad_("mapper" in groups)
    for name, p in parts.decoder.named_parameters():
        p.requires_grad_(("lora" if is_peft_param(name) else "decoder") in groups and p.dtype.is_floating_point)


def weight_breakdown(parts: FakeParts, cfg: AdapterConfig) -> dict[str, int]:
    """Bytes of every weight by part; quantised layers by `quantized_linear_bytes`."""
    from .decoder import is_peft_param

    quant_weights = {f"{n}.weight": shape for n, shape in parts.quantized.items()}
    out = {"encoder": sum(p.numel() * p.element_size() for p in parts.encoder.parameters()),
           "mapper": sum(p.numel() * p.element_size() for p in parts.mapper.parameters()),
           "decoder": 0, "decoder (quantised layers)": 0, "peft (LoRA / soft prompts)": 0}
    seen = set()
    base = _base(parts.decoder)
    for name, p in base.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        name = name.replace(".base_layer", "")
        if is_peft_param(name):
            out["peft (LoRA / soft prompts)"] += p.numel() * p.element_size()
        elif name in quant_weights:
            out["decoder (quantised layers)"] += quantized_linear_bytes(*quant_weights[name],
                                                                        cfg.decoder.quantization)
        else:
            out["decoder"] += p.numel() * p.element_size()
    out["decoder"] += sum(b.numel() * b.element_size() for b in base.buffers())  # e.g. rotary frequencies
    out["encoder"] += sum(b.numel() * b.element_size() for b in parts.encoder.buffers())
    out["mapper"] += sum(b.numel() * b.element_size() for b in parts.mapper.buffers())
    if parts.decoder is not base:  # peft prompt encoders live outside the base model
        out["peft (LoRA / soft prompts)"] += sum(p.numel() * p.element_size() for n, p in
                                                 parts.decoder.named_parameters() if "prompt_encoder" in n)
    return {k: v for k, v in out.items() if v}
