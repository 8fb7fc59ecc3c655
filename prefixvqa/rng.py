"""The one seeding mechanism: seeded blocks that leave the caller's random generators as they were, and the JSON form
of those generators that checkpoints store.

Why one home: a library function that needs reproducible randomness (random init, sampled generation, a training run,
a sweep) must neither depend on nor change the caller's global generators. Everything in the package seeds through
:func:`seeded` (or :func:`preserved` plus :func:`seed_all`, where a run restores a saved state instead of seeding).
"""

from __future__ import annotations

import base64
import contextlib
import random
from typing import Any, Iterator

__all__ = ["seeded", "preserved", "seed_all", "rng_state", "set_rng_state"]


def _cuda_devices() -> list[int]:
    """CUDA devices whose generators are in use: forking or seeding CUDA must never start it, nor queue a lazy seed
    that a CPU-only caller would inherit when it starts CUDA later."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def preserved() -> Iterator[None]:
    """Restore Python's, numpy's, torch's CPU and every in-use CUDA generator on exit, whatever the block did.

    CUDA generators first used inside the block cannot be put back to a state the caller never had; they keep what
    the block left."""
    import numpy as np
    import torch

    py, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and in-use CUDA) with ``seed``; call it inside
    :func:`preserved` (or use :func:`seeded`), never on the caller's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    for device in _cuda_devices():
        torch.cuda.default_generators[device].manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with every global generator seeded with ``seed`` (see :func:`seed_all`) and give the caller's
    generators back on exit (see :func:`preserved`): same seed, same result, and the caller's stream is untouched."""
    with preserved():
        seed_all(seed)
        yield


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and in-use CUDA) generator states as JSON data: what a checkpoint stores so a
    resumed run draws the same random numbers (dropout, worker seeds) as an uninterrupted one."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], _b64(np_state[1].astype(np.uint32).tobytes()), *map(float, np_state[2:])],
             "torch": _b64(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states :func:`rng_state` captured (CUDA ones when this process has CUDA)."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys = np.frombuffer(base64.b64decode(state["numpy"][1]), dtype=np.uint32)
    np.random.set_state((state["numpy"][0], keys, int(state["numpy"][2]), int(state["numpy"][3]),
                         float(state["numpy"][4])))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])
