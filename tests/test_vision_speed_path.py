"""VisionEncoder's speed paths keep its features: blocks after `cfg.layer` are skipped, a frozen tower runs outside
autocast (float32 out, no grad), a trainable ViT runs SDPA attention and still gets gradients."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from prefixvqa.config import EncoderConfig
from prefixvqa.testing import TINY_ENCODER
from prefixvqa.vision import VisionEncoder

TINY_RESNET: dict[str, Any] = {
    "name": "RN50", "pretrained": None,
    "model_overrides": {"embed_dim": 32,
                        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                        "text_cfg": TINY_ENCODER["model_overrides"]["text_cfg"]},
}
TINY_VIT3: dict[str, Any] = copy.deepcopy(TINY_ENCODER)  # three blocks: layer -2 reads the middle one
TINY_VIT3["model_overrides"]["vision_cfg"]["layers"] = 3


@pytest.fixture(scope="module")
def towers() -> dict[str, VisionEncoder]:
    """One frozen tiny tower of each kind; tests copy or re-wrap them with their own EncoderConfig."""
    built = {}
    for kind, cfg in (("vit", TINY_VIT3), ("resnet", TINY_RESNET)):
        enc = VisionEncoder.from_config(EncoderConfig(**cfg, features="patches"))
        built[kind] = enc.eval().requires_grad_(False)
    return built


def wrap(towers: dict[str, VisionEncoder], kind: str, **cfg: Any) -> VisionEncoder:
    """A fresh VisionEncoder around a copy of a tiny tower with these EncoderConfig fields."""
    base = towers[kind]
    full = {**(TINY_VIT3 if kind == "vit" else TINY_RESNET), "features": "patches", **cfg}
    return VisionEncoder(copy.deepcopy(base.visual), base.preprocess, EncoderConfig(**full))


def blocks_of(visual: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks `cfg.layer` indexes: ViT residual blocks, or ModifiedResNet's stem and 4 stages (the stem is a
    method; its last module, avgpool, stands for it)."""
    if hasattr(visual, "transformer"):
        return list(visual.transformer.resblocks)
    return [visual.avgpool, visual.layer1, visual.layer2, visual.layer3, visual.layer4]


def block_params(visual: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Parameters of each block of blocks_of (the ResNet stem's are its convs and batch norms)."""
    if hasattr(visual, "transformer"):
        return [list(b.parameters()) for b in visual.transformer.resblocks]
    stem = [p for name, p in visual.named_parameters() if name.split(".")[0] in ("conv1", "conv2", "conv3", "bn1",
                                                                               "bn2", "bn3")]
    return [stem] + [list(getattr(visual, f"layer{i}").parameters()) for i in range(1, 5)]


def full_run_reference(enc: VisionEncoder, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Features of block `cfg.layer` read with hooks during the tower's complete forward (every block runs)."""
    blocks, seen, calls = blocks_of(enc.visual), {}, [0] * len(blocks_of(enc.visual))
    index = enc.cfg.layer % len(blocks)

    def hook(i: int):
        def record(_module: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
            calls[i] += 1
            if i == index:
                seen["out"] = out
        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            enc.visual(x)
    finally:
        for h in handles:
            h.remove()
    out = seen["out"]
    if out.dim() == 4:  # conv grid (B, C, h, w) -> row-major tokens
        return out.flatten(2).transpose(1, 2), calls
    return (out if enc.cfg.keep_cls else out[:, 1:]), calls


def count_block_calls(enc: VisionEncoder, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """encoder(x) and how often each block ran."""
    blocks = blocks_of(enc.visual)
    calls = [0] * len(blocks)
    handles = [b.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = enc(x)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def pixels_for(enc: VisionEncoder, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, *enc.preprocess_size(), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,layer,keep_cls", [("vit", -2, False), ("vit", -2, True), ("vit", 0, False),
                                                 ("vit", -1, True), ("resnet", -2, False), ("resnet", -1, False),
                                                 ("resnet", -2, True)])
def test_early_stop_matches_running_every_block(towers, kind, layer, keep_cls):
    """Features are bit-identical to block `layer`'s output in a full forward, and later blocks never run."""
    enc = wrap(towers, kind, layer=layer, keep_cls=keep_cls)
    x = pixels_for(enc)
    want, _ = full_run_reference(enc, x)
    got, calls = count_block_calls(enc, x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    index = layer % len(calls)
    assert calls == [1] * (index + 1) + [0] * (len(calls) - index - 1)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_frozen_tower_under_autocast_needs_no_grad(towers, kind):
    """Under bf16 autocast a frozen fp32 ViT returns exactly its fp32 features (autocast is off for its
    nn.MultiheadAttention blocks); a conv tower keeps autocast's bf16 convolutions. Both: float32, no grad."""
    enc = wrap(towers, kind, layer=-2)
    x = pixels_for(enc)
    with torch.no_grad():
        want = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc(x)  # grad enabled, but nothing in the tower requires it
    assert got.dtype == torch.float32 and not got.requires_grad
    if kind == "vit":
        assert torch.equal(got, want)
    else:
        assert not torch.equal(got, want)  # computed in bf16 ...
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())  # ... within its rounding


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_bf16_weights_stay_close_to_fp32(towers, kind):
    """to_compute_dtype(bf16) casts a frozen tower; its features come back float32 within bf16 rounding."""
    enc = wrap(towers, kind, layer=-2)
    x = pixels_for(enc)
    with torch.no_grad():
        want = enc(x)
        enc.to_compute_dtype(torch.bfloat16)
        assert enc.compute_dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = enc(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_trainable_tower_keeps_fp32_weights():
    """to_compute_dtype leaves a tower that trains in float32; from_config(dtype=) casts a frozen one."""
    trainable = VisionEncoder.from_config(EncoderConfig(**TINY_ENCODER, features="patches", freeze=False))
    assert trainable.to_compute_dtype("bfloat16").compute_dtype == torch.float32
    frozen = VisionEncoder.from_config(EncoderConfig(**TINY_ENCODER, features="patches"), dtype=torch.bfloat16)
    assert frozen.compute_dtype == torch.bfloat16 and not any(p.requires_grad for p in frozen.parameters())
    assert frozen(torch.zeros(1, 3, *frozen.preprocess_size())).dtype == torch.float32


@pytest.mark.parametrize("kind,keep_cls", [("vit", False), ("vit", True), ("resnet", False)])
def test_trainable_tower_gets_gradients(towers, kind, keep_cls):
    """A trainable tower (freeze False, train mode) keeps grad under autocast; in fp32 its features equal the
    frozen path's (the ViT's SDPA attention vs nn.MultiheadAttention's fused kernel) to 1e-5."""
    enc = wrap(towers, kind, layer=-2, keep_cls=keep_cls, freeze=False)
    x = pixels_for(enc)
    with torch.no_grad():
        frozen_out = enc(x)
    enc.visual.requires_grad_(True)
    assert enc._plain_vit == (kind == "vit")
    out = enc(x)  # eval mode: batch norm keeps its running statistics, as in the frozen run
    assert out.requires_grad
    torch.testing.assert_close(out, frozen_out, rtol=1e-5, atol=1e-5)
    enc.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    out.float().square().mean().backward()
    *used, skipped = block_params(enc.visual)
    assert all(p.grad is not None for ps in used for p in ps) and all(p.grad is None for p in skipped)
    # ModifiedResNet zero-initialises each residual branch's last batch-norm scale, so only the ViT has no zeros
    nonzero = [bool(p.grad.abs().sum() > 0) for ps in used for p in ps]
    assert all(nonzero) if kind == "vit" else any(nonzero)


def test_input_gradients_flow_through_a_frozen_tower(towers):
    """Pixels that require grad (saliency) take the autograd path even when the tower is frozen."""
    enc = wrap(towers, "vit", layer=-2)
    x = pixels_for(enc).requires_grad_(True)
    enc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
