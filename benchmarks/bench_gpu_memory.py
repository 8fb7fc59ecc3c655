"""GPU evidence for quantised and multi-GPU training: peak memory against fit-check, fp16 vs bf16, MFU.

Every model is built from a public architecture config with random weights (no download): the decoder is saved once
into a cache folder so it loads through the normal path (bitsandbytes quantisation at load time), the encoder is an
open_clip tower with pretrained=None. Records are generated lesion questions padded to the target length.

  memory     for each configuration: fit-check's prediction (before loading anything) and torch.cuda's measured
             peak (`max_memory_allocated` over a few real trainer steps, after the model is on the GPU); the ratio
             must be within 15%. Includes the 7B-class Llama in 4-bit NF4 + LoRA at batch 1 x 512 tokens (<= 10 GB).
  precision  the same GPT-2-medium-size LoRA + mapper run under fp16 with loss scaling (the 2080 Ti path) and bf16,
             same seed and data: loss curves side by side, and the largest gap against a second bf16 seed's gap.
  mfu        a GPT2-XL-size LoRA + mapper training step: FLOPs counted by torch's FlopCounterMode, timed on the GPU,
             divided by the GPU's dense bf16 peak (--peak-tflops; H100/H200 SXM: 989).

  HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_gpu_memory.py memory [--predict-only] [--config NAME ...]
  HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_gpu_memory.py precision [--steps 300]
  HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_gpu_memory.py mfu [--steps 20] [--peak-tflops 989]
  ... memory --smoke     (CPU: the whole measuring path on a tiny model; peak memory is not measured on CPU)
Results go to stdout and, with --out FILE, to a JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixvqa.config import AdapterConfig
from prefixvqa.fitcheck import GIB, Architecture, StepPlan, encoder_architecture, predict
from prefixvqa.presets import preset_info

CACHE = Path.home() / ".cache" / "prefixvqa" / "bench_decoders"


def public_arch(preset: str) -> dict[str, Any]:
    """A base model's public config as recorded in a preset file (architecture facts, no weights)."""
    return {k: v for k, v in preset_info(preset)["architecture"]["decoder"].items() if k != "_name_or_path"}


LLAMA_7B = public_arch("llava_med_7b")  # Vicuna-7B v1.5 = Llama-2-7B architecture
GPT2_XL = public_arch("van_sonsbeek_gpt2xl")
GPT2_MEDIUM = {**GPT2_XL, "n_embd": 1024, "n_layer": 24, "n_head": 16}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 400}


@dataclass
class Case:
    name: str
    arch: dict[str, Any]
    quantization: str | None
    batch: int
    tokens: int  # prefix + text tokens per sample
    mixed_precision: str = "bf16"
    checkpointing: bool = True
    dtype: str = "float16"
    groups: list[str] = field(default_factory=lambda: ["mapper", "lora"])
    limit_gb: float | None = None  # the bound on measured peak, when there is one


CASES = [
    Case("llama7b-nf4-lora-b1-t512", LLAMA_7B, "4bit", 1, 512, limit_gb=10.0),
    Case("llama7b-nf4-lora-b4-t512", LLAMA_7B, "4bit", 4, 512),
    Case("gpt2xl-int8-lora-b2-t520-fp16", GPT2_XL, "8bit", 2, 520, mixed_precision="fp16"),
    Case("gpt2xl-bf16-lora-b4-t256-nockpt", GPT2_XL, None, 4, 256, checkpointing=False, dtype="bfloat16"),
]
SMOKE = Case("tiny-llama-nf4-cpu", TINY_LLAMA, "4bit", 2, 48, mixed_precision="no", dtype="float32")


# --------------------------------------------------------------------------------------------------------- models
def decoder_folder(arch: dict[str, Any], dtype: str) -> Path:
    """Random weights for `arch`, saved once (safetensors) with the tiny BPE tokenizer (its ids fit any vocab)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefixvqa.testing import build_tokenizer

    key = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"{arch['model_type']}-{key}-{dtype}"
    if (folder / "config.json").is_file():
        return folder
    tok = build_tokenizer(folder)
    config = AutoConfig.for_model(**{**arch, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(folder))
    del model
    return folder


def adapter_config(case: Case, weights: bool = True) -> AdapterConfig:
    """The benchmark adapter: ViT-B/32 (random) -> MLP prefix (8 x E, hidden 1024) -> the case's decoder + LoRA r16.
    `weights=False` names no decoder folder: fit-check's predictions need none."""
    name = str(decoder_folder(case.arch, case.dtype)) if weights else f"random-{case.arch['model_type']}"
    return AdapterConfig.from_dict({
        "encoder": {"name": "ViT-B-32", "pretrained": None},
        "mapper": {"kind": "mlp", "prefix_length": 8, "hidden_dim": 1024},
        "decoder": {"name": name, "dtype": case.dtype, "quantization": case.quantization,
                    "gradient_checkpointing": case.checkpointing},
        "tuning": {"mode": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "template": {"name": "plain", "max_length": case.tokens - 8},  # + 8 prefix slots = case.tokens
    })


def records(n: int, tokens: int, seed: int = 0) -> list:
    """Generated lesion questions whose prompts are padded with filler words up to about `tokens` tokens."""
    from prefixvqa.data.synthetic import lesion_records

    recs = lesion_records(n, seed=seed, size=64)
    filler = " ".join(["the image of the chest"] * tokens)
    for r in recs:
        r.question = f"{filler} {r.question}"  # the processor shortens the question, never the answer
    return recs


# --------------------------------------------------------------------------------------------------------- memory
def prediction(case: Case, cfg: AdapterConfig, text_len: int, answer_len: int) -> Any:
    from transformers import AutoConfig

    arch = Architecture(AutoConfig.for_model(**case.arch), encoder_architecture(cfg)[0])
    plan = StepPlan(cfg, case.groups, case.batch, text_len, answer_len, case.mixed_precision, case.checkpointing)
    return predict(plan, arch)


def measure(case: Case, steps: int = 3) -> dict[str, Any]:
    """fit-check's prediction, then `steps` real trainer steps and their peak allocated memory."""
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.train import TrainConfig, train

    cfg = adapter_config(case)
    torch.manual_seed(0)
    model = MedVQAAdapter(cfg)
    recs = records(case.batch * steps, case.tokens)
    batch = model.processor([r.image for r in recs[:case.batch]], [r.question for r in recs[:case.batch]],
                            [r.answer for r in recs[:case.batch]])
    tokens = batch["input_ids"].shape[1]
    answer = int((batch["labels"][:, 1:] != -100).sum(1).max())
    report = prediction(case, model.config, tokens, answer)
    cuda = torch.cuda.is_available()
    if cuda:  # the quantised decoder is on the GPU already; the trainer moves the rest (counted: weights)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out_dir = CACHE.parent / "bench_runs" / case.name
    t0 = time.perf_counter()
    result = train(model, recs, None, TrainConfig(output_dir=str(out_dir), epochs=1, batch_size=case.batch,
                                                  max_steps=steps, mixed_precision=case.mixed_precision,
                                                  gradient_checkpointing=case.checkpointing, trainable=case.groups,
                                                  log_every=1, progress=False, tensorboard=False, plot=False))
    row = {"config": case.name, "tokens": tokens, "batch": case.batch, "predicted_gib": report.peak / GIB,
           "losses": [r["loss"] for r in result.history if r["kind"] == "train"],
           "seconds": time.perf_counter() - t0, "breakdown": report.to_dict()}
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        row.update(measured_gib=measured / GIB, ratio=report.peak / measured,
                   within_15pct=abs(report.peak / measured - 1) <= 0.15)
        if case.limit_gb is not None:
            row["within_limit"] = measured <= case.limit_gb * 1e9
    return row


# ------------------------------------------------------------------------------------------------------ precision
def precision(steps: int) -> dict[str, Any]:
    """fp16 (GradScaler via accelerate) vs bf16 on the same data and seed, plus a second bf16 seed for the noise."""
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.train import TrainConfig, train

    case = Case("gpt2-medium-lora", GPT2_MEDIUM, None, 8, 96, dtype="float32", checkpointing=False)
    curves = {}
    for name, mp, seed in (("fp16", "fp16", 0), ("bf16", "bf16", 0), ("bf16-seed1", "bf16", 1)):
        torch.manual_seed(seed)
        model = MedVQAAdapter(adapter_config(case))
        result = train(model, records(case.batch * steps, case.tokens, seed=0), None,
                       TrainConfig(output_dir=str(CACHE.parent / "bench_runs" / f"precision-{name}"), epochs=1,
                                   batch_size=case.batch, mixed_precision=mp, seed=seed, log_every=10,
                                   lr={"mapper": 1e-3, "lora": 2e-4}, warmup=0.05, progress=False,
                                   tensorboard=False, plot=False))
        curves[name] = [r["loss"] for r in result.history if r["kind"] == "train"]
    gap = max(abs(a - b) for a, b in zip(curves["fp16"], curves["bf16"]))
    noise = max(abs(a - b) for a, b in zip(curves["bf16"], curves["bf16-seed1"]))
    return {"curves_every_10_steps": curves, "max_gap_fp16_bf16": gap, "max_gap_bf16_seeds": noise,
            "within_noise": gap <= noise, "all_finite": all(math.isfinite(x) for c in curves.values() for x in c)}


# ------------------------------------------------------------------------------------------------------------ mfu
def mfu(steps: int, peak_tflops: float) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from prefixvqa.model import MedVQAAdapter

    case = Case("gpt2xl-lora-mfu", GPT2_XL, None, 16, 256, dtype="float32", checkpointing=False)
    torch.manual_seed(0)
    model = MedVQAAdapter(adapter_config(case)).cuda().train()
    recs = records(case.batch, case.tokens)
    batch = model.processor([r.image for r in recs], [r.question for r in recs], [r.answer for r in recs])
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"flops_per_step": flops, "median_step_s": median, "tflops": flops / median / 1e12,
            "mfu": flops / median / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "device": torch.cuda.get_device_name(), "tokens_per_step": batch["input_ids"].numel()}


# ----------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["memory", "precision", "mfu"])
    ap.add_argument("--config", action="append", help="memory configurations to run (default: all)")
    ap.add_argument("--predict-only", action="store_true", help="fit-check predictions only (any machine)")
    ap.add_argument("--smoke", action="store_true", help="the measuring path on a tiny model (CPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.what != "memory" and not torch.cuda.is_available():
        print(f"{args.what} needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.what == "memory":
        cases = [SMOKE] if args.smoke else [c for c in CASES if not args.config or c.name in args.config]
        rows = []
        for case in cases:
            if args.predict_only:
                report = prediction(case, adapter_config(case, weights=False), case.tokens, 32)
                rows.append({"config": case.name, "predicted_gib": report.peak / GIB, "breakdown": report.to_dict()})
                print(report.format(), "\n")
            else:
                rows.append(measure(case, args.steps or 3))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "breakdown"}))
        result: Any = rows
    elif args.what == "precision":
        result = precision(args.steps or 300)
        print(json.dumps(result))
    else:
        result = mfu(args.steps or 20, args.peak_tflops)
        print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
