"""Frozen image tower: prefixvqa's VisionEncoder vs Hugging Face CLIPVisionModel (SDPA) of the same architecture.

Architecture: open_clip ViT, 6 blocks, width 384, 6 heads, patch 32, image 224 (49 patch tokens); features from the
penultimate block (encoder.layer=-2, LLaVA's choice) and HF's hidden_states[-2]. Random weights, batch 8,
inference mode. Rows run interleaved (A, B, C, ..., A, B, C, ...) and report the median ms per batch.

- old: the previous VisionEncoder.forward (forward_intermediates over every block, under the caller's autocast)
- new: VisionEncoder.forward (stops after the block read; a frozen ViT runs outside autocast in its own dtype)
- new bf16 weights: the same after encoder.to_compute_dtype(torch.bfloat16)
- HF: CLIPVisionModel(attn_implementation="sdpa"), output_hidden_states=True, hidden_states[-2]; it runs all 6
  layers, so a 5-layer HF model read at hidden_states[-1] (the same blocks as ours) is shown too

With --conv, also frozen open_clip ModifiedResNet towers (RN50 at 224, and the demo_smollm2 preset's small one);
there is no HF peer, the rows show why a frozen conv tower keeps the caller's autocast.

With --train, also one forward+backward of a trainable tower (train mode, grad): nn.MultiheadAttention's own path
(what open_clip runs) vs VisionEncoder's SDPA blocks, and HF.

    HF_HUB_OFFLINE=1 python benchmarks/bench_vision_tower.py [--repeats 15] [--conv] [--train | --train-only]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixvqa, not an installed copy
from prefixvqa.config import EncoderConfig  # noqa: E402
from prefixvqa.vision import VisionEncoder  # noqa: E402

VISION_CFG = {"image_size": 224, "layers": 6, "width": 384, "patch_size": 32, "head_width": 64}


def build_ours() -> VisionEncoder:
    cfg = EncoderConfig(name="ViT-B-32", features="patches", layer=-2,
                        model_overrides={"embed_dim": 384, "vision_cfg": VISION_CFG})
    return VisionEncoder.from_config(cfg).eval().requires_grad_(False)


def build_hf(layers: int = 6) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=6,
                           image_size=224, patch_size=32, hidden_act="gelu", attn_implementation="sdpa")
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).eval().requires_grad_(False)
    assert model.config._attn_implementation == "sdpa"
    return model


def old_forward(encoder: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """VisionEncoder.forward before this change: every block runs, under whatever autocast the caller set."""
    out = encoder.visual.forward_intermediates(pixels, indices=[encoder.cfg.layer], intermediates_only=True,
                                               output_fmt="NCHW")
    return out["image_intermediates"][0].flatten(2).transpose(1, 2)


def hf_forward(model: torch.nn.Module, pixels: torch.Tensor, index: int = -2) -> torch.Tensor:
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[index][:, 1:]


def bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each function, the functions alternating within every round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def maybe(ctx: Callable[[], contextlib.AbstractContextManager] | None) -> Iterator[None]:
    with ctx() if ctx else contextlib.nullcontext():
        yield


def inference_rows(repeats: int, batch: int) -> None:
    ours = build_ours()
    ours_bf16 = copy.deepcopy(ours).to_compute_dtype(torch.bfloat16)
    hf, hf5 = build_hf(6), build_hf(5)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def run(fn: Callable[[], torch.Tensor], amp: Callable | None = None) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode(), maybe(amp):
                return fn()
        return call

    rows = {
        "old path fp32": run(lambda: old_forward(ours, x)),
        "old path bf16 autocast": run(lambda: old_forward(ours, x), bf16),
        "new path fp32": run(lambda: ours(x)),
        "new path bf16 autocast (fp32 weights)": run(lambda: ours(x), bf16),
        "new path bf16 autocast (bf16 weights)": run(lambda: ours_bf16(x), bf16),
        "HF CLIPVision fp32": run(lambda: hf_forward(hf, x)),
        "HF CLIPVision bf16 autocast": run(lambda: hf_forward(hf, x), bf16),
        "HF CLIPVision bf16 weights": run(lambda: hf_forward(hf_bf16, x.bfloat16())),
        "HF CLIPVision 5 layers fp32 (blocks run = ours)": run(lambda: hf_forward(hf5, x, -1)),
        "HF CLIPVision 5 layers bf16 autocast": run(lambda: hf_forward(hf5, x, -1), bf16),
    }
    with torch.inference_mode():  # the new path's features: identical in fp32, bf16 rounding with bf16 weights
        ref = old_forward(ours, x)
        assert torch.equal(ours(x), ref)
        with bf16():
            assert torch.equal(ours(x), ref)
            err = (ours_bf16(x) - ref).abs().max().item() / ref.abs().max().item()
    ms = interleaved(rows, repeats)
    print(f"\ninference, batch {batch}, {repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    print("| path | ms/batch |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\nnew path == old path fp32 (bit-identical, also under bf16 autocast); bf16 weights max error "
          f"{err:.4f} of max |feature|")
    ratios = [("new/HF fp32", "new path fp32", "HF CLIPVision fp32"),
              ("new/HF bf16 autocast (our fp32 weights)", "new path bf16 autocast (fp32 weights)",
               "HF CLIPVision bf16 autocast"),
              ("new/HF bf16 autocast (our bf16 weights)", "new path bf16 autocast (bf16 weights)",
               "HF CLIPVision bf16 autocast"),
              ("new/HF both bf16 weights", "new path bf16 autocast (bf16 weights)", "HF CLIPVision bf16 weights"),
              ("old/new fp32", "old path fp32", "new path fp32"),
              ("old/new bf16 autocast", "old path bf16 autocast", "new path bf16 autocast (fp32 weights)")]
    for label, num, den in ratios:
        print(f"ratio {label}: {ms[num] / ms[den]:.2f}")


def conv_rows(repeats: int) -> None:
    """Frozen ModifiedResNet patch features: the old path and the new one, fp32, under bf16 autocast, bf16 weights."""
    import json

    demo = json.loads((Path(__file__).resolve().parents[1] / "adapters" / "demo_smollm2.json").read_text())
    towers = {"RN50 224px, batch 8": ({}, 224, 8),
              "demo_smollm2 RN50 64px, batch 32": (demo["config"]["encoder"]["model_overrides"], 64, 32)}
    print(f"\nfrozen conv towers, patch features (layer -1), {repeats} interleaved repeats")
    print("| tower | old fp32 | old bf16 autocast | new fp32 | new bf16 autocast | new bf16 weights |")
    print("|---|---|---|---|---|---|")
    for label, (overrides, size, batch) in towers.items():
        cfg = EncoderConfig(name="RN50", features="patches", model_overrides=overrides)
        enc = VisionEncoder.from_config(cfg).eval().requires_grad_(False)
        enc_bf16 = copy.deepcopy(enc).to_compute_dtype(torch.bfloat16)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

        def run(fn: Callable[[], torch.Tensor], amp: Callable | None = None) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                with torch.inference_mode(), maybe(amp):
                    return fn()
            return call

        ms = interleaved({"old fp32": run(lambda: old_forward(enc, x)),
                          "old bf16": run(lambda: old_forward(enc, x), bf16),
                          "new fp32": run(lambda: enc(x)), "new bf16": run(lambda: enc(x), bf16),
                          "new bf16 weights": run(lambda: enc_bf16(x), bf16)}, repeats)
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |")


def training_rows(repeats: int, batch: int) -> None:
    """Forward+backward of a trainable tower: open_clip's nn.MultiheadAttention path vs VisionEncoder's SDPA."""
    ours = build_ours()
    ours.visual.requires_grad_(True)
    ours.train()
    hf = build_hf(6).train().requires_grad_(True)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def mha_path() -> torch.Tensor:  # what open_clip runs for a trainable tower (stopping early, like ours)
        out = ours.visual.forward_intermediates(x, indices=[-2], intermediates_only=True, output_fmt="NLC",
                                                stop_early=True)
        return out["image_intermediates"][0]

    def step(fn: Callable[[], torch.Tensor], amp: Callable | None, model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            model.zero_grad(set_to_none=True)
            with maybe(amp):
                out = fn()
            out.float().square().mean().backward()
        return call

    with torch.no_grad():
        diff = (ours(x) - mha_path()).abs().max().item()
    rows = {
        "trainable fwd+bwd, nn.MultiheadAttention fp32": step(mha_path, None, ours),
        "trainable fwd+bwd, VisionEncoder SDPA fp32": step(lambda: ours(x), None, ours),
        "trainable fwd+bwd, nn.MultiheadAttention bf16 autocast": step(mha_path, bf16, ours),
        "trainable fwd+bwd, VisionEncoder SDPA bf16 autocast": step(lambda: ours(x), bf16, ours),
        "trainable fwd+bwd, HF CLIPVision fp32": step(lambda: hf_forward(hf, x), None, hf),
        "trainable fwd+bwd, HF CLIPVision bf16 autocast": step(lambda: hf_forward(hf, x), bf16, hf),
    }
    ms = interleaved(rows, repeats)
    print(f"\ntraining (forward+backward), batch {batch}, {repeats} interleaved repeats")
    print("| path | ms/step |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\nSDPA vs nn.MultiheadAttention features, fp32: max abs difference {diff:.2e}")
    for amp in ("fp32", "bf16 autocast"):
        sdpa = ms[f"trainable fwd+bwd, VisionEncoder SDPA {amp}"]
        mha, peer = ms[f"trainable fwd+bwd, nn.MultiheadAttention {amp}"], ms[f"trainable fwd+bwd, HF CLIPVision {amp}"]
        print(f"ratio SDPA/MHA {amp}: {sdpa / mha:.2f}; SDPA/HF: {sdpa / peer:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--conv", action="store_true", help="also time frozen ModifiedResNet towers (no HF peer)")
    ap.add_argument("--train", action="store_true", help="also time forward+backward of a trainable tower")
    ap.add_argument("--train-only", action="store_true", help="only the trainable-tower rows")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.train_only:
        inference_rows(args.repeats, args.batch)
        if args.conv:
            conv_rows(args.repeats)
    if args.train or args.train_only:
        training_rows(args.repeats, args.batch)


if __name__ == "__main__":
    main()
