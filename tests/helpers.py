"""Helpers only tests use: fault injection, the reference batch a plain-transformers user builds, adapter tensors to
compare between runs, and the environment of the training subprocesses tests launch.

Tests import it as ``helpers`` (pytest puts tests/ on ``sys.path``); scripts that tests launch get tests/ on their
``PYTHONPATH`` from :func:`subprocess_env`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess (a plain child or torchrun ranks): this checkout and tests/ on the
    path, offline, and one thread per process, as torchrun gives its ranks, so runs compared bit for bit or within
    a tight tolerance do the same arithmetic in the same order."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def adapter_tensors(folder: str | Path) -> dict[str, Any]:
    """The trained tensors of an adapter folder, "mapper/..." and "lora/...": what resume and multi-process tests
    compare between runs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {f"mapper/{k}": v for k, v in load_file(str(folder / "mapper.safetensors")).items()}
    out.update({f"lora/{k}": v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()})
    return out


def kill_after_save(step: int) -> None:
    """Make this training process SIGKILL itself right after it saved the checkpoint of `step` (fault tests)."""
    import signal

    from prefixvqa.train import trainer

    original = trainer.Trainer.save_last

    def save_then_die(self: Any) -> None:
        original(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.Trainer.save_last = save_then_die


def plain_transformers_batch(model: Any, prefix: Any, questions: list[str], answers: list[str]) -> tuple[Any, ...]:
    """What a plain-transformers user builds by hand for the `plain` template: [start tokens] prefix
    "Question: q Answer:" " a" EOS, right-padded, labels on the answer only -> (inputs_embeds, attention_mask,
    labels). The reference the model's own assembly is tested and benchmarked against."""
    import torch

    tok, emb = model.tokenizer, model.decoder.get_input_embeddings()
    bos = model.processor.start_ids  # what the tokenizer opens a text with (none for GPT-2)
    rows, labels = [], []
    for p, q, a in zip(prefix, questions, answers):
        head = tok(f"Question: {q} Answer:", add_special_tokens=False)["input_ids"]
        ans = tok(f" {a}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        text = emb(torch.tensor(bos + head + ans, dtype=torch.long))
        rows.append(torch.cat([text[:len(bos)], p.to(text.dtype), text[len(bos):]]))
        labels.append(torch.tensor([-100] * (len(bos) + len(p) + len(head)) + ans))
    T = max(len(r) for r in rows)
    embeds = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), -100)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        embeds[i, :len(r)], mask[i, :len(r)], lab[i, :len(r)] = r, 1, lb
    return embeds, mask, lab
