"""Packed vs padded training batches (`train.packing`) on real question lengths, and the transformers LLaVA peer.

Text: every English question/answer pair of the SLAKE 1.0 train split and every VQA-RAD pair (../shared/realdata),
pooled and shuffled (seed 0); images: synthetic 224 px noise PNGs (16 distinct, cycled), decoded every step.
Architecture and weights: those of `bench_llava_peer.py` (`peer.py`: CLIP ViT 6 x 384, 49 patch tokens, LLaVA-1.5
`mlp2x_gelu` projector, Llama 8 x 512 with 32,000 logits, LoRA r8 on q/v, `plain` template).

Cases, each a training step (forward, backward, AdamW, fp32) over the same `--steps` batches of `--batch` records per
round, with the processor work a data loader does (image decoding and preprocessing, tokenisation, collation):
  padded        prefixvqa, each batch padded to its longest record (the default)
  packed L      prefixvqa with `train.packing`: the batch's records packed into rows of at most L positions
                (L = template.max_length = 512 by default, and 256)
  peer          `LlavaForConditionalGeneration` + peft on the same weights, right-padded batches (`LlavaProcessor`)
Before timing it checks, on the first batch (eval mode, fp32), that the three compute the same loss (1e-4). The cases
run interleaved (A, B, C, D per round, after warm-up rounds); ratios are throughput over padded and over the peer.
Peak memory: each case in its own subprocess (VmHWM after loading, and after 3 training steps on the batches with
the longest records).

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_packing.py [--batch 16] [--steps 4] [--repeats 7] [--json OUT]
     [--no-memory] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import bench_llava_peer as BL  # noqa: E402 (puts this checkout and benchmarks/ on sys.path)
import peer as P  # noqa: E402
import torch  # noqa: E402

REAL = BL.ROOT.parent / "shared" / "realdata"
SLAKE = REAL / "slake" / "Slake1.0" / "train.json"
VQA_RAD = REAL / "vqa_rad" / "VQA_RAD Dataset Public.json"
LENGTHS = (512, 256)


def real_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) of SLAKE's English train items and of VQA-RAD, pooled and shuffled."""
    slake = [(r["question"], str(r["answer"])) for r in json.loads(SLAKE.read_text()) if r.get("q_lang") == "en"]
    rad = [(r["question"], str(r["answer"])) for r in json.loads(VQA_RAD.read_text())]
    pairs = slake + rad
    random.Random(seed).shuffle(pairs)
    return pairs


def noise_pngs(n: int, size: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_batches(pairs: list[tuple[str, str]], pngs: list[bytes], batch: int, steps: int) -> list[list[Any]]:
    from prefixvqa.data.records import VQARecord

    recs = [VQARecord(id=f"r{i}", image=pngs[i % len(pngs)], question=q, answer=a)
            for i, (q, a) in enumerate(pairs[:batch * steps])]
    return [recs[s:s + batch] for s in range(0, len(recs), batch)]


def ours_batch(model: Any, recs: list[Any], pack: int | None) -> dict[str, Any]:
    """What the training DataLoader yields: items encoded (image decoded + transformed, tokenised), then collated
    padded, or packed into rows of `pack` positions."""
    from prefixvqa.data.packing import pack_collate

    proc = model.processor
    items = [proc.encode_record(r) for r in recs]
    batch = proc.collate(items) if pack is None else pack_collate(items, proc, pack)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def peer_step_inputs(pair: P.Pair, recs: list[Any]) -> dict[str, Any]:
    from PIL import Image

    images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in recs]
    return P.peer_inputs(pair.proc, images, [r.question for r in recs], [r.answer for r in recs])


def losses(case: str, pair: P.Pair, recs: list[Any]) -> torch.Tensor:
    if case == "peer":
        return pair.peer(**peer_step_inputs(pair, recs)).loss
    pack = None if case == "padded" else int(case.split()[-1])
    return pair.ours(**ours_batch(pair.ours, recs, pack)).loss


def cases() -> list[str]:
    return ["padded", *[f"packed {n}" for n in LENGTHS], "peer"]


def layout_stats(model: Any, batches: list[list[Any]]) -> dict[str, dict[str, float]]:
    """Positions the decoder runs per step (rows x width) and the share of them that are padding."""
    out = {}
    for case in cases()[:-1]:
        pack = None if case == "padded" else int(case.split()[-1])
        shapes = [ours_batch(model, recs, pack)["attention_mask"] for recs in batches]
        cells = sum(m.numel() for m in shapes)
        real = sum(int(m.sum()) for m in shapes)
        out[case] = {"rows_per_step": statistics.mean(m.shape[0] for m in shapes),
                     "width_mean": statistics.mean(m.shape[1] for m in shapes),
                     "positions_per_step": cells / len(shapes), "padding_share": 1 - real / cells}
    return out


def step_fn(case: str, pair: P.Pair, batches: list[list[Any]], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run() -> None:
        for recs in batches:
            loss = losses(case, pair, recs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def memory_child(case: str, workdir: Path, tiny: bool, batch: int, steps: int) -> dict[str, float]:
    """One case in this process: load from local folders, 3 training steps on the longest batches; peak RSS."""
    from transformers import AutoTokenizer

    arch = P.TINY_ARCH if tiny else P.BENCH_ARCH
    out = {"import": BL.rss_mib()}
    tok = AutoTokenizer.from_pretrained(workdir / "llama")
    batches = make_batches(real_pairs(), noise_pngs(16, arch.image_size), batch, steps)
    batches = sorted(batches, key=lambda b: -max(len(r.question) + len(r.answer) for r in b))[:3]
    if case == "peer":
        from peft import get_peft_model
        from transformers import LlavaForConditionalGeneration

        model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(workdir / "llava"),
                               P.peer_lora_config(arch))
        pair = P.Pair(arch, tok, None, model, P.build_processor(arch, tok), workdir / "llama")
        params = P.peer_trainable(model)
    else:
        model = P.build_ours(arch, workdir / "llama")
        pair = P.Pair(arch, tok, model, None, None, workdir / "llama")
        params = P.ours_trainable(model)
    out["loaded"] = BL.rss_mib()
    model.train()
    step_fn(case, pair, batches, torch.optim.AdamW(params, lr=1e-5))()
    out["trained"] = BL.rss_mib()
    return out


def memory_section(workdir: Path, tiny: bool, batch: int, steps: int) -> dict[str, dict[str, float]]:
    return BL.memory_children(__file__, list(cases()), ["--_workdir", str(workdir), "--batch", str(batch),
                                                        "--steps", str(steps)] + (["--tiny"] if tiny else []))


def word_stats(pairs: list[tuple[str, str]]) -> str:
    q = sorted(len(p[0].split()) for p in pairs)
    a = sorted(len(p[1].split()) for p in pairs)
    pct = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return (f"{len(pairs)} pairs; question words min/median/p95/max {q[0]}/{pct(q, .5)}/{pct(q, .95)}/{q[-1]}, "
            f"answer words {a[0]}/{pct(a, .5)}/{pct(a, .95)}/{a[-1]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:  # long: one benchmark, top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="records per batch (train.batch_size)")
    ap.add_argument("--steps", type=int, default=4, help="batches per timed round (different records each)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny architecture (smoke runs)")
    ap.add_argument("--_memory", choices=cases(), help=argparse.SUPPRESS)
    ap.add_argument("--_workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory:
        print("MEMORY " + json.dumps(memory_child(args._memory, args._workdir, args.tiny, args.batch, args.steps)))
        return {}
    arch = P.TINY_ARCH if args.tiny else P.BENCH_ARCH
    torch.manual_seed(0)
    pairs = real_pairs()
    print(f"text: SLAKE en train + VQA-RAD, {word_stats(pairs)}")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-packing-")))
        pair = P.build_pair(arch, workdir)
        if not args.no_memory:
            P.build_llava(pair.ours, arch, pair.tok).save_pretrained(workdir / "llava")
        batches = make_batches(pairs, noise_pngs(16, arch.image_size), args.batch, args.steps)
        print(f"prefixvqa {BL.git_commit()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"batch {args.batch} records x {args.steps} steps per round; LM attention "
              f"{pair.ours.decoder.config._attn_implementation}")
        with torch.no_grad():
            check = {c: float(losses(c, pair, batches[0])) for c in cases()}
        print("CHECK loss on batch 0 (fp32, eval): " + ", ".join(f"{c} {v:.6f}" for c, v in check.items()))
        assert max(check.values()) - min(check.values()) < 1e-4 * max(1.0, abs(check["padded"])), check
        layout = layout_stats(pair.ours, batches)
        for c, s in layout.items():
            print(f"  {c:<11} rows/step {s['rows_per_step']:5.2f}  width {s['width_mean']:6.1f}  positions/step "
                  f"{s['positions_per_step']:7.1f}  padding {100 * s['padding_share']:4.1f}%")
        pair.ours.train()
        pair.peer.train()
        opt_o = torch.optim.AdamW(P.ours_trainable(pair.ours), lr=1e-5)
        opt_p = torch.optim.AdamW(P.peer_trainable(pair.peer), lr=1e-5)
        fns = {c: step_fn(c, pair, batches, opt_p if c == "peer" else opt_o) for c in cases()}
        t0, cpu0 = time.perf_counter(), BL.cpu_seconds()
        times = BL.interleave(fns, args.repeats, args.warmup)
        others = BL.others_share(cpu0, BL.cpu_seconds(), time.perf_counter() - t0)
        samples = args.batch * args.steps
        rows = {c: BL.summary(t, samples) for c, t in times.items()}
        print(f"\n[timing {time.perf_counter() - t0:.0f} s; other processes used "
              f"{'?' if others is None else f'{100 * others:.0f}%'} of the CPUs]")
        print(f"{'case':<11} {'samples/s med [min-max]':>26} {'vs padded':>10} {'paired':>11} {'vs peer':>8} "
              f"{'paired':>11}")
        for c, s in rows.items():
            vs = {}
            for ref in ("padded", "peer"):
                paired = sorted(r / o for o, r in zip(times[c], times[ref]))
                vs[ref] = (s["median"] / rows[ref]["median"], paired[0], paired[-1])
            s.update(vs_padded=vs["padded"], vs_peer=vs["peer"])
            print(f"{c:<11} {BL.fmt_rate(s):>26} {vs['padded'][0]:10.2f} {vs['padded'][1]:5.2f}-{vs['padded'][2]:<5.2f}"
                  f" {vs['peer'][0]:8.2f} {vs['peer'][1]:5.2f}-{vs['peer'][2]:<5.2f}")
        memory = None
        if not args.no_memory:
            del pair, fns, opt_o, opt_p
            memory = memory_section(workdir, args.tiny, args.batch, args.steps)
            print("\npeak RSS (MiB, VmHWM, own subprocess each): after imports / loaded / 3 training steps on the "
                  "longest batches (growth in training)")
            for c, m in memory.items():
                print(f"  {c:<11} {m['import']:8.0f} {m['loaded']:8.0f} {m['trained']:8.0f} "
                      f"(+{m['trained'] - m['loaded']:.0f})")
    result = {"commit": BL.git_commit(), "arch": arch.__dict__, "batch": args.batch, "steps": args.steps,
              "repeats": args.repeats, "check": check, "layout": layout, "rows": rows, "memory": memory,
              "others_cpu_share": others, "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
