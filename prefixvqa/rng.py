"""Seeded blocks that leave the caller's torch random state as it was."""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator, and every CUDA generator already in use, seeded with ``seed``.

    Why: a library function that needs reproducible randomness (random init, sampled generation) must not reseed
    the caller's global generators; ``torch.random.fork_rng`` restores them on exit. CUDA is forked and seeded only
    when it is already initialised, so a CPU-only caller neither starts CUDA nor gets its lazy seed changed.
    """
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        yield
