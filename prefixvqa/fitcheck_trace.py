"""fit-check's activation side: one fake training step, measuring what it keeps for backward.

One fake forward pass (FakeTensorMode, no storage) of the encoder, mapper and decoder with autograd's saved-tensor
hooks records the tensors kept for backward, deduplicated by storage: with gradient checkpointing, each layer's input
plus one layer recomputed during backward; the logits at the supervised positions and the loss; the frozen encoder's
forward as a transient unless features come from the cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .fitcheck_build import FakeParts, FakeQuantLinear


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
class Trace:
    """What one fake step at one batch size keeps: saved-for-backward bytes by part, plus the transient peak."""

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
        if isinstance(module, FakeQuantLinear) and module.quantization == "8bit":
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
