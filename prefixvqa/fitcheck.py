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

Three files: `fitcheck_build` (architectures, fake parts, weight bytes), `fitcheck_trace` (the step plan and the
fake step's activations), and this one (the prediction, the report, recipes; the public entry points).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .fitcheck_build import (Architecture, FakeParts, build_fake, decoder_architecture,  # noqa: F401 (re-exported)
                             dtype_bytes, encoder_architecture, fake_mode, measured_weight_bytes, quantized_linear_bytes,
                             set_groups, unique_params, vision_tower, weight_breakdown)
from .fitcheck_trace import StepPlan, Trace, trace_step  # noqa: F401 (re-exported)
from .tuning import default_groups

GIB = 2 ** 30
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
    """Bytes as the report prints them: GiB from 0.1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2 ** 20:.1f} MiB"


@dataclass
class FitReport:
    """One stage's prediction, per process: the byte breakdown, the peak, and the verdict against a budget. What the
    CLI prints (`format`) and writes as JSON (`to_dict`), and what the recipes' stated fit-check results are tested
    against."""

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
        """Whether peak plus reserve fits the budget; None when no budget was given."""
        return None if self.budget is None else self.peak + self.reserve <= self.budget

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON data (`fit-check --json`; the GPU benchmark records it beside its measurement)."""
        return {"stage": self.plan.name, "batch_size": self.plan.batch_size, "tokens": self.plan.text_len,
                "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "backward_transient": self.transient, "peak": self.peak,
                "reserve": self.reserve, "budget": self.budget, "fits": self.fits,
                "largest_batch": self.largest_batch}

    def format(self) -> str:
        """The human-readable report: one line per part, the verdict and largest batch, notes and config sources."""
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
        set_groups(parts, plan.groups)
        weights = weight_breakdown(parts, plan.config)
        trainable = sum(p.numel() * p.element_size() for p in unique_params(parts) if p.requires_grad)
        trainable_numel = sum(p.numel() for p in unique_params(parts) if p.requires_grad)
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
        groups = train.trainable or default_groups(cfg)
        if "encoder" in groups and cfg.encoder.freeze:
            cfg = cfg.replace(encoder={"freeze": False})
        plans.append(StepPlan(cfg, list(groups), batch_size or train.batch_size,
                              text_len or cfg.template.max_length, answer_len, train.mixed_precision,
                              cfg.decoder.gradient_checkpointing,
                              bool(train.feature_cache) and cfg.encoder.freeze and "encoder" not in groups,
                              strategy_of(train), num_processes or 1, s["name"]))
    return plans


def plan_tokens(plan: StepPlan, arch: Architecture) -> StepPlan:
    """Add the visual prefix to the text length: the decoder sees prefix + text tokens."""
    from .encoders import wrap_tower
    from .mappers import prefix_length

    with fake_mode():
        n, _ = wrap_tower(vision_tower(arch), None, plan.config.encoder).output_shape()
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
