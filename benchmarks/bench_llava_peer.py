"""prefixvqa vs Hugging Face LLaVA + peft on the same architecture and the same weights.

Architecture (both sides): CLIP ViT 6 x 384 (6 heads), patch 32 at 224 px, 49 patch tokens from layer -2 without CLS
-> LLaVA-1.5 `mlp2x_gelu` projector -> Llama 8 x 512 (8 heads, MLP 1376), vocabulary 32,000 (the real SmolLM2 BPE cut
to 31,999 ids + `<image>`), LoRA r8 alpha 16 on q_proj/v_proj, projector trained. Random weights: prefixvqa builds
its model; `peer.py` converts every tensor into `LlavaForConditionalGeneration` + peft (see its docstring).

First it CHECKS (fp32, batch of 8) that both sides see the same token ids and labels, the same pixels and layer -2
features, the same loss (1e-4), the same greedy answers (batched and with 8 questions on one image), the same beam-5
answer and the same choice scores (1e-4); then it times, interleaving the two sides (A, B, A, B after warm-up):
  train     samples/s, fp32 and bf16 autocast, batch 8 x 81 positions (~15 answer tokens), AdamW on the trainable
            tensors. Epoch 1: PIL images through processor and tower on both sides. Later epochs: prefixvqa from
            cached features (`encode_images` once), the peer recomputing its tower. Each step re-runs the processor
            (tokenisation; image preprocessing where images are used), as a data loader would.
            FLOP/s: FLOPs of one step (torch FlopCounterMode: matmuls, convolutions, attention) / median step time,
            against the best large torch.matmul measured in the same run.
  generate  answers/s: 8 questions, 8 new tokens, batched greedy (prefixvqa `answer` vs peer `generate`); one at a
            time with beam 5 on both sides (van Sonsbeek's decoding); 8 questions about one image object.
  score     K=4 closed-set scoring: prefixvqa `score_choices` (one call) vs 4 peer forwards (one per candidate,
            each a batch of the 8 questions), mean answer-token log-likelihood.
  memory    peak resident memory (VmHWM) of each side in its own subprocess: load from a local folder, 3 fp32
            training steps from images, then one batched greedy answer.
Ratios are prefixvqa/peer in throughput (> 1: prefixvqa faster); "paired" is the range of per-round ratios.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_llava_peer.py [--quick] [--repeats N] [--only train|generate|score]
     [--json OUT] [--no-memory] [--tiny] [--threads N] [--clock wall|cpu]
--clock cpu times each call in CPU seconds of this process (`time.process_time`) instead of wall seconds: on a
machine whose cores other jobs share, wall time measures the queue; use it with --threads 1 (one thread per
process, no spin-waiting on a descheduled partner thread). Both sides are timed the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's prefixvqa, not an installed copy

import torch  # noqa: E402

import peer as P  # noqa: E402
import prefixvqa  # noqa: E402

BATCH, NEW_TOKENS, BEAMS, K = 8, 8, 5, 4
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by --clock


# --- timing ---------------------------------------------------------------------------------------------------------
def interleave(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each case, the cases run in turn each round; warm-up rounds are dropped."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            gc.collect()
            t0 = clock()
            fn()
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def summary(seconds: list[float], units: float) -> dict[str, float]:
    rates = sorted(units / s for s in seconds)
    q = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "q1": q[0], "q3": q[2],
            "median_s": statistics.median(seconds), "n": len(rates)}


def compare(name: str, unit: str, ours: list[float], peer: list[float], units: float) -> dict[str, Any]:
    a, b = summary(ours, units), summary(peer, units)
    paired = sorted(p / o for o, p in zip(ours, peer))  # per-round throughput ratio prefixvqa/peer
    return {"case": name, "unit": unit, "prefixvqa": a, "peer": b, "ratio": a["median"] / b["median"],
            "paired_min": paired[0], "paired_max": paired[-1]}


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this process has used), from /proc/stat on Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system (idle iowait) irq softirq steal
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """Share of all CPUs that other processes used over `wall` seconds (contention the medians may hide)."""
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def peak_matmul(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n torch.matmul in this process."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def _mha_flops(query: Any, key: Any, value: Any, embed_dim: int, num_heads: int, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """FLOPs of nn.MultiheadAttention's fused inference kernel (FlopCounterMode has no formula for it):
    q/k/v and output projections plus the two attention matmuls; batch-first (B, L, E) inputs."""
    B, L, E = query
    S = key[1]
    return 2 * B * L * E * E + 2 * B * S * E * 2 * E + 4 * B * L * S * E + 2 * B * L * E * E


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch runs in fn: matmuls, convolutions, attention (FlopCounterMode, plus the fused MHA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._native_multi_head_attention: _mha_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# --- sections -------------------------------------------------------------------------------------------------------
def train_section(pair: P.Pair, work: P.Workload, repeats: int, warmup: int) -> list[dict[str, Any]]:
    ours, peer, proc = pair.ours.train(), pair.peer.train(), pair.proc
    opt_o = torch.optim.AdamW(P.ours_trainable(ours), lr=1e-5)
    opt_p = torch.optim.AdamW(P.peer_trainable(peer), lr=1e-5)
    feats = P.ours_features(ours, work.images)
    qs, ans, ims = work.questions, work.answers, work.images
    rows = []
    for precision in ("fp32", "bf16"):
        def step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
            def run() -> None:
                with autocast(precision):
                    loss = loss_fn()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return run

        epoch1 = step(lambda: P.ours_loss(ours, ims, qs, ans), opt_o)
        later = step(lambda: P.ours_loss_cached(ours, feats, qs, ans), opt_o)
        theirs = step(lambda: P.peer_loss(peer, proc, ims, qs, ans), opt_p)
        flops = {"epoch1": count_flops(epoch1), "later": count_flops(later), "peer": count_flops(theirs)}
        t = interleave({"epoch1": epoch1, "peer": theirs}, repeats, warmup)
        row = compare(f"train {precision} epoch 1 (tower in both)", "samples/s", t["epoch1"], t["peer"], BATCH)
        row.update(flops_prefixvqa=flops["epoch1"], flops_peer=flops["peer"], precision=precision)
        rows.append(row)
        t = interleave({"later": later, "peer": theirs}, repeats, warmup)
        row = compare(f"train {precision} later epochs (cached / tower)", "samples/s", t["later"], t["peer"], BATCH)
        row.update(flops_prefixvqa=flops["later"], flops_peer=flops["peer"], precision=precision)
        rows.append(row)
    ours.eval()
    peer.eval()
    return rows


def generate_section(pair: P.Pair, work: P.Workload, repeats: int, warmup: int) -> list[dict[str, Any]]:
    ours, peer, proc = pair.ours.eval(), pair.peer.eval(), pair.proc
    qs, ims = work.questions, work.images
    one = [ims[0]] * len(qs)
    rows = []
    t = interleave({"ours": lambda: P.ours_answer(ours, ims, qs, NEW_TOKENS),
                    "peer": lambda: P.peer_answer(peer, proc, ims, qs, NEW_TOKENS)}, repeats, warmup)
    rows.append(compare(f"greedy, batch {BATCH}, {NEW_TOKENS} new tokens", "answers/s", t["ours"], t["peer"], BATCH))
    greedy_ours = t["ours"]

    def one_by_one(fn: Callable[[int], Any]) -> Callable[[], None]:
        return lambda: [fn(i) for i in range(len(qs))]

    t = interleave({"ours": one_by_one(lambda i: P.ours_answer(ours, ims[i:i + 1], qs[i:i + 1], NEW_TOKENS, BEAMS)),
                    "peer": one_by_one(lambda i: P.peer_answer(peer, proc, ims[i:i + 1], qs[i:i + 1], NEW_TOKENS,
                                                               BEAMS))},
                   max(1, repeats // 2), 1)
    row = compare(f"beam {BEAMS}, one question at a time", "answers/s", t["ours"], t["peer"], BATCH)
    row["prefixvqa_batched_greedy_over_beam"] = statistics.median(t["ours"]) / statistics.median(greedy_ours)
    rows.append(row)
    t = interleave({"ours": lambda: P.ours_answer(ours, one, qs, NEW_TOKENS),
                    "peer": lambda: P.peer_answer(peer, proc, one, qs, NEW_TOKENS)}, repeats, warmup)
    rows.append(compare(f"greedy, {BATCH} questions on one image", "answers/s", t["ours"], t["peer"], BATCH))
    return rows


def score_section(pair: P.Pair, work: P.Workload, repeats: int, warmup: int) -> list[dict[str, Any]]:
    ours, peer, proc = pair.ours.eval(), pair.peer.eval(), pair.proc
    args = (work.images, work.questions, work.choices)
    t = interleave({"ours": lambda: P.ours_score(ours, *args), "peer": lambda: P.peer_score(peer, proc, *args)},
                   repeats, warmup)
    return [compare(f"K={K} choices x {BATCH} questions", "questions/s", t["ours"], t["peer"], BATCH)]


# --- memory (one side per subprocess) -------------------------------------------------------------------------------
def rss_mib() -> float:
    """Peak resident memory of this process so far: VmHWM (ru_maxrss would carry the parent's peak over fork+exec
    on Linux), ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory_child(side: str, workdir: Path, tiny: bool) -> dict[str, float]:
    """Load one side from local folders, train 3 fp32 steps from images, answer once; peak RSS at each stage."""
    from transformers import AutoTokenizer

    arch = P.TINY_ARCH if tiny else P.BENCH_ARCH
    out = {"import": rss_mib()}
    tok = AutoTokenizer.from_pretrained(workdir / "llama")
    work = P.make_workload(tok, BATCH, arch.image_size)
    if side == "prefixvqa":
        model = P.build_ours(arch, workdir / "llama")
        loss = lambda: P.ours_loss(model, work.images, work.questions, work.answers)  # noqa: E731
        answer = lambda: P.ours_answer(model, work.images, work.questions, NEW_TOKENS)  # noqa: E731
        params = P.ours_trainable(model)
    else:
        from peft import get_peft_model
        from transformers import LlavaForConditionalGeneration

        model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(workdir / "llava"),
                               P.peer_lora_config(arch))
        proc = P.build_processor(arch, tok)
        loss = lambda: P.peer_loss(model, proc, work.images, work.questions, work.answers)  # noqa: E731
        answer = lambda: P.peer_answer(model, proc, work.images, work.questions, NEW_TOKENS)  # noqa: E731
        params = P.peer_trainable(model)
    out["loaded"] = rss_mib()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    out["trained"] = rss_mib()
    model.eval()
    answer()
    out["answered"] = rss_mib()
    return out


def memory_children(script: str, cases: Sequence[str], args: Sequence[str]) -> dict[str, dict[str, float]]:
    """Run `script --_memory CASE ARGS` once per case, each in its own process (peak memory is per process), and
    read the JSON of its last "MEMORY " line."""
    result = {}
    for case in cases:
        proc = subprocess.run([sys.executable, script, "--_memory", case, *args], capture_output=True, text=True,
                              check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory run for {case} failed:\n{proc.stderr[-3000:]}")
        result[case] = json.loads(lines[-1][len("MEMORY "):])
    return result


def memory_section(workdir: Path, tiny: bool) -> dict[str, dict[str, float]]:
    """Needs workdir/llama (the LM folder) and workdir/llava (the converted LLaVA, saved by main)."""
    return memory_children(__file__, ("prefixvqa", "peer"), ["--_workdir", str(workdir)] + (["--tiny"] if tiny else []))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


# --- report ---------------------------------------------------------------------------------------------------------
def fmt_rate(s: dict[str, float]) -> str:
    return f"{s['median']:8.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def print_check(c: dict[str, Any]) -> None:
    print(f"CHECK ok: {c['positions']} positions, {c['answer_tokens']:.2f} answer "
          f"tokens/sample")
    print(f"  loss fp32: prefixvqa {c['loss_prefixvqa']:.6f} (cached features {c['loss_prefixvqa_cached']:.6f}), "
          f"peer {c['loss_peer']:.6f}; bf16 autocast (not checked): {c['loss_bf16_prefixvqa']:.4f} vs "
          f"{c['loss_bf16_peer']:.4f}")
    print(f"  greedy answers equal (batched; 8 questions on one image); beam 5 equal; choice scores max |diff| "
          f"{c['score_max_abs_diff']:.1e}")
    print(f"  open_clip layer -2 = CLIP hidden_states[-2] of {c['vision_hidden_states']} (max |diff| "
          f"{c['features_max_abs_diff']:.1e}); pixels max |diff| {c['pixel_max_abs_diff']:.1e}")
    print(f"  sample greedy answer: {c['answers_prefixvqa'][0]!r}")


def print_table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    print(f"\n{'case':<46} {'unit':<11} {'prefixvqa med [min-max]':>25} {'peer med [min-max]':>25} "
          f"{'ratio':>6} {'paired':>11}")
    for r in rows:
        print(f"{r['case']:<46} {r['unit']:<11} {fmt_rate(r['prefixvqa']):>25} {fmt_rate(r['peer']):>25} "
              f"{r['ratio']:6.2f} {r['paired_min']:5.2f}-{r['paired_max']:<5.2f}")
    train = [r for r in rows if "flops_prefixvqa" in r]
    if train:
        print(f"\nachieved FLOP/s (FLOPs per step / median step time); matmul peak fp32 {peaks['fp32'] / 1e9:.0f}, "
              f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
        print(f"{'case':<46} {'GFLOP/step ours':>15} {'peer':>7} {'GFLOP/s ours':>13} {'peer':>7} "
              f"{'% peak ours':>12} {'peer':>6}")
        for r in train:
            peak = peaks[r["precision"]]
            fo, fp = r["flops_prefixvqa"], r["flops_peer"]
            so, sp = fo / r["prefixvqa"]["median_s"], fp / r["peer"]["median_s"]
            r.update(flops_per_s_prefixvqa=so, flops_per_s_peer=sp)
            print(f"{r['case']:<46} {fo / 1e9:15.1f} {fp / 1e9:7.1f} {so / 1e9:13.1f} {sp / 1e9:7.1f} "
                  f"{100 * so / peak:11.1f}% {100 * sp / peak:5.1f}%")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats after 1 warm-up round (the test uses it)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds per case (default 2, --quick 1)")
    ap.add_argument("--only", choices=("train", "generate", "score"), default=None)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side memory subprocesses")
    ap.add_argument("--tiny", action="store_true", help="a tiny architecture (smoke runs and tests)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the built folders here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="time calls in wall seconds or in this process's CPU seconds (shared machines)")
    ap.add_argument("--_memory", choices=("prefixvqa", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--_workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory:
        print("MEMORY " + json.dumps(memory_child(args._memory, args._workdir, args.tiny)))
        return {}
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    arch = P.TINY_ARCH if args.tiny else P.BENCH_ARCH
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peer-")))
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        pair = P.build_pair(arch, workdir)
        work = P.make_workload(pair.tok, BATCH, arch.image_size)
        if not args.no_memory:
            P.build_llava(pair.ours, arch, pair.tok).save_pretrained(workdir / "llava")
        print(f"prefixvqa from {Path(prefixvqa.__file__).parent} ({git_commit()})")
        attn = (pair.ours.decoder.config._attn_implementation, pair.peer.config.text_config._attn_implementation)
        print(f"built both sides in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; LM attention: prefixvqa {attn[0]}, peer {attn[1]}")
        check = P.check_equal(pair, work, max_new_tokens=NEW_TOKENS)
        with torch.no_grad(), autocast("bf16"):
            bf16 = (float(P.ours_loss(pair.ours, work.images, work.questions, work.answers)),
                    float(P.peer_loss(pair.peer, pair.proc, work.images, work.questions, work.answers)))
        check.update(loss_bf16_prefixvqa=bf16[0], loss_bf16_peer=bf16[1])
        print_check(check)
        peaks = {"fp32": peak_matmul(torch.float32), "bf16": peak_matmul(torch.bfloat16)}
        rows: list[dict[str, Any]] = []
        sections = {"train": train_section, "generate": generate_section, "score": score_section}
        for name, fn in sections.items():
            if args.only in (None, name):
                t1, cpu0 = time.perf_counter(), cpu_seconds()
                new = fn(pair, work, repeats, warmup)
                others = others_share(cpu0, cpu_seconds(), time.perf_counter() - t1)
                for r in new:
                    r["others_cpu_share"] = others
                rows += new
                busy = " - BUSY: other processes competed for the cores" if (others or 0) > 0.1 else ""
                print(f"[{name}: {time.perf_counter() - t1:.0f} s; other processes used "
                      f"{'?' if others is None else f'{100 * others:.0f}%'} of the CPUs{busy}]", flush=True)
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):  # again at the end: keep the best
            peaks[key] = max(peaks[key], peak_matmul(dtype))
        print_table(rows, peaks)
        memory = None
        if not args.no_memory:
            del pair
            gc.collect()
            memory = memory_section(workdir, args.tiny)
            print("\npeak RSS (MiB, VmHWM; own subprocess each): after imports / loaded / 3 fp32 train steps / "
                  "greedy answer")
            for side, m in memory.items():
                print(f"  {side:<10} {m['import']:8.0f} {m['loaded']:8.0f} {m['trained']:8.0f} {m['answered']:8.0f}")
    result = {"prefixvqa": str(Path(prefixvqa.__file__).parent), "commit": git_commit(), "arch": arch.__dict__,
              "repeats": repeats, "warmup": warmup, "check": check, "peaks": peaks, "rows": rows, "memory": memory,
              "clock": args.clock, "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
