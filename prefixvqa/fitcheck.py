"""fit-check: the peak GPU memory of one training step, predicted before any weight is loaded.

Nothing is read but configs. The models are built under torch's FakeTensorMode (shapes and dtypes, no storage), so
parameter counts, LoRA targets and quantised layers come from the same code that training uses (open_clip,
transformers' bitsandbytes layer replacement, peft), and one fake forward pass of the step, with autograd's
saved-tensor hooks, measures what the step keeps for backward. The parts:

* weights: each parameter by its dtype; a bitsandbytes layer by its packed bytes and quantisation statistics
  (`quantized_linear_bytes`); peft's k-bit preparation upcasts a quantised model's other fp16/bf16 weights to fp32;
* LoRA / mapper / trained weights, their gradients (same dtype) and AdamW's two states per trained element;
* activations: tensors saved for backward (deduplicated by storage) for the prefix + text length and batch; with
  gradient checkpointing, each layer's input plus one layer recomputed during backward; the logits at the
  supervised positions; the frozen encoder's forward unless features come from the cache;
* a reserve for what `torch.cuda.max_memory_allocated` does not count (CUDA context, allocator slack).

Sharded strategies (`train.distributed`: fsdp, deepspeed ZeRO-2/3) divide weights, gradients and optimizer states
over `num_processes` as they do. The prediction is an estimate of a training step's peak allocated memory; the
benchmark `benchmarks/bench_gpu_memory.py` compares it against `torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import AdapterConfig, ConfigError

GIB = 2 ** 30
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block size and its double-quantisation block size
DEFAULT_RESERVE = int(0.75 * GIB)  # CUDA context (~0.3-0.5 GiB) plus allocator slack: not in max_memory_allocated
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": GIB, "t": 2 ** 40}


def parse_size(text: str | int | float) -> int:
    """'11GB', '11GiB', '10.5G', '800MB' -> bytes. GB and GiB both mean 2**30 (what nvidia-smi calls GiB/MiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size such as 11GB, 10.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2 ** 20:.1f} MiB"


# --------------------------------------------------------------------------------------------- exact byte counts
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
    return torch.empty((), dtype=dtype, device="meta").element_size()


# --------------------------------------------------------------------------------------------- architectures
@dataclass
class Architecture:
    """The configs fit-check builds from: a transformers decoder config and an open_clip model config."""

    decoder: Any  # transformers PretrainedConfig
    encoder: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def decoder_architecture(cfg: AdapterConfig, override: str | dict | None = None,
                         recorded: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(transformers config, where it came from): a --decoder-config file, the config's own `model_config`, the
    local folder / GGUF / hub cache, or the architecture recorded in the preset file for this decoder name."""
    from transformers import AutoConfig

    from .decoder import _resolve

    if override is not None:
        data = json.loads(Path(override).read_text()) if not isinstance(override, dict) else override
        return AutoConfig.for_model(**data), f"--decoder-config {override if isinstance(override, str) else ''}"
    d = cfg.decoder
    if d.model_config is not None:
        return AutoConfig.for_model(**d.model_config), "decoder.model_config"
    source, gguf = _resolve(d)
    try:
        kwargs = {"gguf_file": gguf} if gguf else {"revision": d.revision}
        return AutoConfig.from_pretrained(source, **kwargs), f"{source}{'/' + gguf if gguf else ''}"
    except (OSError, ValueError) as exc:
        if recorded and recorded.get("_name_or_path") == d.name:
            return AutoConfig.for_model(**{k: v for k, v in recorded.items() if k != "_name_or_path"}), \
                "the architecture recorded in the preset file"
        raise ConfigError(f"fit-check needs decoder {d.name!r}'s config.json, which is not available here ({exc}); "
                          "pass --decoder-config FILE (a transformers config.json)") from None


def encoder_architecture(cfg: AdapterConfig, override: str | dict | None = None,
                         recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(open_clip model config with the encoder's overrides applied, where it came from)."""
    import open_clip

    e = cfg.encoder
    if override is not None:
        data = json.loads(Path(override).read_text()) if not isinstance(override, dict) else override
        base, source = data.get("model_cfg", data), "--encoder-config"
    elif not e.name.startswith("hf-hub:") and open_clip.get_model_config(e.name):
        base, source = open_clip.get_model_config(e.name), f"open_clip config {e.name}"
    elif recorded and recorded.get("name") == e.name:
        base, source = recorded["model_cfg"], "the architecture recorded in the preset file"
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


# --------------------------------------------------------------------------------------------- fake models
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
    from .mappers import build_mapper
    from .vision import VisionEncoder

    encoder = VisionEncoder(vision_tower(arch), None, cfg.encoder)
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
    from open_clip.model import _build_vision_tower
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
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
        layer = _FakeQuantLinear(in_f, out_f, module.bias is not None, compute, cfg.decoder.quantization)
        decoder.set_submodule(name, layer)
        names[name] = (out_f, in_f)
    return names


class _FakeQuantLinear(nn.Linear):
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


# --------------------------------------------------------------------------------------------- plans and reports
@dataclass
class StepPlan:
    """One training step: what trains, how the batch looks, how the run is launched."""

    config: AdapterConfig
    groups: list[str]
    batch_size: int
    text_len: int
    answer_len: int = 32
    mixed_precision: str = "no"
    checkpointing: bool = False
    cached_features: bool = False
    strategy: str = "ddp"  # ddp | fsdp | zero2 | zero3
    num_processes: int = 1
    name: str = "train"


@dataclass
class FitReport:
    plan: StepPlan
    weights: dict[str, int]
    trainable: int  # bytes of trained parameters (per process)
    gradients: int
    optimizer: int
    activations: dict[str, int]
    transient: int
    peak: int
    reserve: int
    budget: int | None
    largest_batch: int | None
    sources: dict[str, str]
    notes: list[str]

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak + self.reserve <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.plan.name, "batch_size": self.plan.batch_size, "tokens": self.plan.text_len,
                "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "backward_transient": self.transient, "peak": self.peak,
                "reserve": self.reserve, "budget": self.budget, "fits": self.fits,
                "largest_batch": self.largest_batch}

    def format(self) -> str:
        p = self.plan
        rows = [f"fit-check [{p.name}]: batch {p.batch_size} x {p.text_len} tokens (prefix + text), "
                f"{p.answer_len} supervised per sample; trains {', '.join(p.groups)}; precision {p.mixed_precision}"
                f"; gradient checkpointing {'on' if p.checkpointing else 'off'}; "
                f"{'features cached' if p.cached_features else 'encoder runs'}; "
                f"{p.strategy} x {p.num_processes} process(es)"]
        rows += [f"  weights  {k:<34} {fmt_bytes(v):>11}" for k, v in self.weights.items()]
        rows += [f"  gradients (trained weights)                 {fmt_bytes(self.gradients):>11}",
                 f"  optimizer states (AdamW)                    {fmt_bytes(self.optimizer):>11}"]
        rows += [f"  activations  {k:<30} {fmt_bytes(v):>11}" for k, v in self.activations.items()]
        rows += [f"  backward transient (logit grads, recompute) {fmt_bytes(self.transient):>11}",
                 f"  predicted peak (torch max_memory_allocated) {fmt_bytes(self.peak):>11}",
                 f"  reserve (CUDA context, allocator slack)     {fmt_bytes(self.reserve):>11}"]
        if self.budget is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            rows.append(f"  {verdict} in {fmt_bytes(self.budget)}: {fmt_bytes(self.peak + self.reserve)} needed")
            rows.append(f"  largest batch that fits: {self.largest_batch if self.largest_batch else 'none (0)'}")
        rows += [f"  note: {n}" for n in self.notes]
        rows.append("  configs from: " + "; ".join(f"{k}: {v}" for k, v in self.sources.items()))
        return "\n".join(rows)


def _shares(plan: StepPlan) -> tuple[float, float, float]:
    """Fractions of (weights, gradients, optimizer states) one process holds under the plan's strategy."""
    n = max(1, plan.num_processes)
    if plan.strategy in ("fsdp", "zero3"):
        return 1 / n, 1 / n, 1 / n
    if plan.strategy == "zero2":
        return 1.0, 1 / n, 1 / n
    if plan.strategy == "zero1":
        return 1.0, 1.0, 1 / n
    return 1.0, 1.0, 1.0


def predict(plan: StepPlan, arch: Architecture, budget: int | None = None,
            reserve: int = DEFAULT_RESERVE) -> FitReport:
    """The memory of one training step under `plan`: breakdown, peak, verdict and the largest batch that fits."""
    notes: list[str] = []
    with fake_mode():
        parts = build_fake(plan.config, arch)
        _set_groups(parts, plan.groups)
        weights = weight_breakdown(parts, plan.config)
        trainable = sum(p.numel() * p.element_size() for p in _all_params(parts) if p.requires_grad)
        trainable_numel = sum(p.numel() for p in _all_params(parts) if p.requires_grad)
        traces = {b: trace_step(parts, plan, b) for b in (1, 2)}
    w_share, g_share, o_share = _shares(plan)
    weights = {k: int(v * w_share) for k, v in weights.items()}
    gradients = int(trainable * g_share)
    optimizer = int(2 * trainable * o_share)
    if plan.strategy.startswith("zero") and plan.mixed_precision != "no":
        # DeepSpeed's bf16/fp16 mode keeps fp32 master weights and fp32 Adam states for its partition
        optimizer = int(12 * trainable_numel * o_share)
        notes.append("DeepSpeed mixed precision: fp32 master weights + fp32 AdamW states (12 bytes per element)")
    static = sum(weights.values()) + optimizer
    step_temp = gradients  # AdamW's foreach update allocates about one trained-size temporary

    def at(batch: int) -> tuple[dict[str, int], int]:
        a1, a2 = traces[1], traces[2]
        acts = {k: max(0, int(a1.parts[k] + (batch - 1) * (a2.parts[k] - a1.parts[k]))) for k in a1.parts}
        return acts, max(0, int(a1.transient + (batch - 1) * (a2.transient - a1.transient)))

    def peak_at(batch: int) -> int:
        acts, transient = at(batch)
        if plan.strategy in ("fsdp", "zero3"):  # one layer's full weights are gathered while it runs
            transient += max((sum(p.numel() * p.element_size() for p in layer.parameters())
                              for layer in parts.layers), default=0)
        return static + max(sum(acts.values()) + transient + gradients, gradients + step_temp)

    activations, transient = at(plan.batch_size)
    peak = peak_at(plan.batch_size)
    largest = None
    if budget is not None:
        largest, batch = 0, 1
        while batch <= 4096 and peak_at(batch) + reserve <= budget:
            largest, batch = batch, batch * 2
        lo, hi = largest, min(batch, 4097)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak_at(mid) + reserve <= budget else (lo, mid)
        largest = lo
    if plan.config.decoder.quantization and plan.strategy in ("fsdp", "zero3"):
        notes.append("sharding a bitsandbytes-quantised decoder is refused by the trainer; use ddp")
    if not plan.checkpointing and plan.config.decoder.quantization:
        notes.append("QLoRA usually needs gradient checkpointing (decoder.gradient_checkpointing)")
    return FitReport(plan, weights, int(trainable * g_share), gradients, optimizer, activations, transient, peak,
                     reserve, budget, largest, dict(arch.sources), notes)


def _all_params(parts: FakeParts) -> list[nn.Parameter]:
    seen, out = set(), []
    for module in (parts.encoder, parts.mapper, parts.decoder):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _set_groups(parts: FakeParts, groups: Sequence[str]) -> None:
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


# --------------------------------------------------------------------------------------------- the fake step
@dataclass
class Trace:
    parts: dict[str, int]  # saved-for-backward bytes by where they live
    transient: int


class _Saved:
    """Unique storages saved for backward (or kept by bitsandbytes 8-bit layers / checkpointed layer inputs)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen = exclude, {}

    def add(self, t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            s = t.untyped_storage()
            if s._cdata not in self.exclude:
                self.seen[s._cdata] = (s.nbytes(), t)  # the tensor is kept so its storage id is not reused

    def total(self) -> int:
        return sum(v[0] for v in self.seen.values())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


def trace_step(parts: FakeParts, plan: StepPlan, batch: int) -> Trace:
    """One fake training step's forward at `batch`: bytes kept for backward by the encoder (if it trains), the
    mapper, the decoder layers and the loss, plus the transient peak of the frozen encoder and of backward."""
    exclude = {t.untyped_storage()._cdata for m in (parts.encoder, parts.mapper, parts.decoder)
               for t in [*m.parameters(), *m.buffers()]}
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.mixed_precision)
    amp = torch.autocast("cpu", dtype=half) if half is not None else contextlib.nullcontext()
    out: dict[str, int] = {}
    transient = 0
    parts.encoder.train("encoder" in plan.groups), parts.mapper.train(), parts.decoder.train()
    with amp:
        if plan.cached_features:
            features = torch.zeros(batch, parts.num_image_tokens, parts.feature_dim)
        else:
            pixels = torch.zeros(batch, 3, *parts.encoder.preprocess_size())
            saved = _Saved(exclude)
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                features, peak_out = _leaf_peak(parts.encoder, pixels)
            out["encoder"] = saved.total()
            if not out["encoder"]:  # a frozen tower's forward: its input, the current and the next activation
                transient = pixels.nbytes + 3 * peak_out
        saved = _Saved(exclude)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            prefix = parts.mapper(features.float())
        out["mapper"] = saved.total()
        saved = _Saved(exclude)
        handles = _keep_hooks(parts, saved, plan.checkpointing)
        try:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                logits, loss_saved = _decoder_forward(parts, plan, prefix, batch, saved)
        finally:
            for h in handles:
                h.remove()
        out["decoder layers" + (" (checkpointed)" if plan.checkpointing else "")] = saved.total() - loss_saved
        out["logits and loss"] = loss_saved
        # backward: the float32 logit gradient and softmax, the logits' own gradient
        transient = max(transient, 2 * logits.numel() * 4 + logits.numel() * logits.element_size())
        if plan.checkpointing:  # backward recomputes one layer at a time: its saved tensors exist again meanwhile
            transient += _one_layer_saved(parts, plan, prefix, batch, exclude)
    return Trace({k: v for k, v in out.items() if v}, transient)


def _leaf_peak(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run `module(x)` and return (output, largest output of any leaf module)."""
    sizes = [0]

    def hook(_m: nn.Module, _i: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            sizes.append(o.numel() * o.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        y = module(x)
    finally:
        for h in handles:
            h.remove()
    return y, max(sizes)


def _keep_hooks(parts: FakeParts, saved: _Saved, checkpointing: bool) -> list[Any]:
    """Tensors kept alive outside autograd's saved-tensor hooks: 8-bit layers' inputs, and with checkpointing each
    layer's input (the checkpoint holds it to recompute the layer)."""
    handles = []
    for module in parts.decoder.modules():
        if isinstance(module, _FakeQuantLinear) and module.quantization == "8bit":
            handles.append(module.register_forward_pre_hook(lambda m, args: saved.add(args[0]) if args else None))
    if checkpointing:
        for layer in parts.layers:
            handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs: saved.add(args[0] if args else kwargs.get("hidden_states")),
                with_kwargs=True))
    return handles


def _decoder_forward(parts: FakeParts, plan: StepPlan, prefix: torch.Tensor, batch: int, saved: _Saved
                     ) -> tuple[torch.Tensor, int]:
    """MedVQAAdapter.forward's decoder part: token embeddings with the prefix scattered into its slots, the LM run
    with logits at `answer_len` positions per sample, float32 cross-entropy. Returns (logits, loss bytes saved)."""
    T = plan.text_len
    ids = torch.zeros(batch, T, dtype=torch.long)
    slots = torch.zeros(batch, T, dtype=torch.bool)
    embeds = parts.decoder.get_input_embeddings()(ids)
    if plan.config.decoder.quantization and torch.is_grad_enabled():
        embeds = embeds.detach().requires_grad_(True)  # k-bit preparation makes embedding outputs require grad
    embeds = embeds.masked_scatter(slots[..., None], prefix.to(embeds.dtype))
    positions = torch.arange(T).expand(batch, T)
    out = parts.decoder(inputs_embeds=embeds, position_ids=positions, logits_to_keep=min(plan.answer_len, T),
                        use_cache=False)
    logits = out.logits
    before_loss = saved.total()
    labels = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels)
    return logits, saved.total() - before_loss


def _one_layer_saved(parts: FakeParts, plan: StepPlan, prefix: torch.Tensor, batch: int, exclude: set[int]) -> int:
    """Saved-for-backward bytes of one decoder layer run without checkpointing (what its recompute holds)."""
    if not parts.layers:
        return 0
    layer = parts.layers[len(parts.layers) // 2]
    captured: dict[str, Any] = {}
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            _decoder_forward(parts, plan, prefix.detach(), batch, _Saved(exclude))
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    grad = (lambda t: t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
            else t)
    args = tuple(grad(a) for a in args[:1]) + tuple(args[1:])
    if "hidden_states" in kwargs:
        kwargs = {**kwargs, "hidden_states": grad(kwargs["hidden_states"])}
    saved = _Saved(exclude)
    flag = getattr(layer, "gradient_checkpointing", None)
    if flag is not None:
        layer.gradient_checkpointing = False
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            layer(*args, **kwargs)
    finally:
        if flag is not None:
            layer.gradient_checkpointing = flag
    return saved.total()


# --------------------------------------------------------------------------------------------- recipes
def recipe_plans(recipe: Any, stage: str | None = None, batch_size: int | None = None, text_len: int | None = None,
                 answer_len: int = 32, num_processes: int | None = None, workdir: Path | None = None
                 ) -> list[StepPlan]:
    """One StepPlan per recipe stage (or the single training run), from the recipe alone."""
    from .train.distributed import strategy_of
    from .train.recipe import STAGE_KEYS, recipe_config
    from .train.trainer import TrainConfig

    # a `tiny:` recipe builds its tiny decoder where training would (its output_dir): a few kB of config/tokenizer
    base_cfg = recipe_config(recipe.model, workdir or Path(TrainConfig.from_dict(recipe.train).output_dir))
    stages = recipe.stages or [{"name": "train"}]
    if stage is not None:
        stages = [s for s in stages if s.get("name") == stage]
        if not stages:
            raise ConfigError(f"fit-check: no stage {stage!r} in the recipe; stages: "
                              f"{[s['name'] for s in recipe.stages or []] or ['train']}")
    plans = []
    for s in stages:
        train = TrainConfig.from_dict({**recipe.train, **{k: v for k, v in s.items() if k not in STAGE_KEYS}})
        cfg = base_cfg
        if s.get("template"):
            cfg = cfg.replace(template=s["template"])
        if s.get("tuning"):
            cfg = cfg.replace(tuning=s["tuning"])
        if train.gradient_checkpointing and not cfg.decoder.gradient_checkpointing:
            cfg = cfg.replace(decoder={"gradient_checkpointing": True})
        groups = train.trainable or _default_groups(cfg)
        if "encoder" in groups and cfg.encoder.freeze:
            cfg = cfg.replace(encoder={"freeze": False})
        plans.append(StepPlan(cfg, list(groups), batch_size or train.batch_size,
                              text_len or cfg.template.max_length, answer_len, train.mixed_precision,
                              cfg.decoder.gradient_checkpointing,
                              bool(train.feature_cache) and cfg.encoder.freeze and "encoder" not in groups,
                              strategy_of(train), num_processes or 1, s["name"]))
    return plans


def _default_groups(cfg: AdapterConfig) -> list[str]:
    """What a model built from `cfg` trains when the recipe does not say: mapper, peft parts, full decoder."""
    groups = ["mapper"]
    if cfg.tuning.mode in ("lora", "prompt_tuning", "prefix_tuning"):
        groups.append("lora")
    if cfg.tuning.mode == "full":
        groups.append("decoder")
    if not cfg.encoder.freeze:
        groups.insert(0, "encoder")
    return groups


def plan_tokens(plan: StepPlan, arch: Architecture) -> StepPlan:
    """Add the visual prefix to the text length: the decoder sees prefix + text tokens."""
    from .mappers import prefix_length
    from .vision import VisionEncoder

    with fake_mode():
        n, _ = VisionEncoder(vision_tower(arch), None, plan.config.encoder).output_shape()
    plan.text_len += prefix_length(plan.config.mapper, n, plan.config.template.image_start_end)
    return plan


def fit_check(recipe: Any, gpu_mem: str | int | None = None, *, stage: str | None = None,
              batch_size: int | None = None, text_len: int | None = None, answer_len: int = 32,
              num_processes: int | None = None, decoder_config: str | None = None,
              encoder_config: str | None = None, reserve: str | int = DEFAULT_RESERVE) -> list[FitReport]:
    """fit-check a recipe: one report per stage. Nothing but configs is read."""
    from .presets import preset_info

    recorded = {}
    if recipe.model.get("preset"):
        recorded = preset_info(recipe.model["preset"]).get("architecture") or {}
    budget = parse_size(gpu_mem) if gpu_mem is not None else None
    reports = []
    for plan in recipe_plans(recipe, stage, batch_size, text_len, answer_len, num_processes):
        dec, dec_src = decoder_architecture(plan.config, decoder_config, recorded.get("decoder"))
        enc, enc_src = encoder_architecture(plan.config, encoder_config, recorded.get("encoder"))
        arch = Architecture(dec, enc, {"decoder": dec_src, "encoder": enc_src})
        reports.append(predict(plan_tokens(plan, arch), arch, budget, parse_size(reserve)))
    return reports
