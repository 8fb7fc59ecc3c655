"""The decoder's attention kernel: a short bf16 training forward on CPU runs SDPA's math kernel (its backward is ~3x
cheaper there than the flash kernel's, see benchmarks/RESULTS.md), everything else keeps PyTorch's choice, and the
math kernel computes the same loss and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch

from prefixvqa import MedVQAAdapter
from prefixvqa import decoder as decoder_module
from tests.test_core import ANSWERS, IMAGES, QUESTIONS, make_config


@pytest.fixture(scope="module")
def model(tiny_decoders):
    return MedVQAAdapter(make_config(tiny_decoders["llama"])).eval()  # no dropout: two steps compare


def _flash_during_forward(model, batch, autocast: bool, grad: bool) -> list[bool]:
    """Whether the flash kernel was allowed while each decoder attention module ran."""
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.flash_sdp_enabled()))
             for name, m in model.decoder.named_modules() if name.endswith("self_attn")]
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with cast, torch.set_grad_enabled(grad):
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no attention module ran"
    return seen


@pytest.mark.parametrize(("autocast", "grad", "short", "math"), [
    (True, True, True, True),  # bf16 training of a short batch: the math kernel
    (True, True, False, False),  # longer than MATH_ATTENTION_MAX_LENGTH: PyTorch's choice
    (True, False, True, False),  # evaluation
    (False, True, True, False),  # fp32 training
])
def test_kernel_choice(model, monkeypatch, autocast, grad, short, math):
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    if not short:
        monkeypatch.setattr(decoder_module, "MATH_ATTENTION_MAX_LENGTH", batch["input_ids"].shape[1] - 1)
    seen = _flash_during_forward(model, batch, autocast, grad)
    assert seen == [not math] * len(seen)
    assert torch.backends.cuda.flash_sdp_enabled(), "the kernel choice leaked out of the forward"


def test_checkpointed_decoder_keeps_pytorchs_kernel_and_trains(tiny_decoders):
    """Checkpointed layers run again in the backward, outside the forward's kernel choice; torch's checkpoint would
    refuse a recomputation that saves other tensors, so a checkpointed decoder keeps PyTorch's kernel."""
    model = MedVQAAdapter(make_config(tiny_decoders["llama"]).replace(decoder={"gradient_checkpointing": True}))
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    model.train()
    seen = _flash_during_forward(model, batch, autocast=True, grad=True)
    assert all(seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()  # raised CheckpointError when the first forward ran the math kernel
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_math_kernel_gives_the_same_loss_and_gradients(model, monkeypatch):
    """A bf16 training step with the math kernel vs with PyTorch's default kernel: equal to bf16 rounding."""
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return float(loss), [p.grad.clone() for p in params]

    loss_math, grads_math = step()
    monkeypatch.setattr(decoder_module, "MATH_ATTENTION_MAX_LENGTH", 0)
    loss_flash, grads_flash = step()
    assert loss_math == pytest.approx(loss_flash, rel=2e-2)
    for a, b in zip(grads_math, grads_flash):
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()) + 1e-6)
