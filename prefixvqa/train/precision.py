"""Mixed precision owned by the run, and the run's `accelerate.Accelerator`.

Why not accelerate's precision: accelerate keeps one mixed-precision setting per process (its `AcceleratorState`) and
refuses a second one, and resetting that state is private API. A curriculum stage, a sweep or a test may train several
runs with different precisions in one process, so each run keeps its own :class:`Precision` (autocast dtype and fp16
loss scaling, torch's public `torch.autocast` and `torch.amp.GradScaler`) and builds its Accelerator with
``mixed_precision="no"``: the process-wide state is then the same for every run and is simply reused. DeepSpeed casts
the model itself from its JSON, which the run fills through the plugin (see `distributed.py`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..config import ConfigError
from .config import TrainConfig
from .reporting import trackers

__all__ = ["Precision", "RunAccelerator", "make_accelerator"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One run's mixed precision: what its forwards autocast to and, for fp16, its loss scaler.

    ``native=False`` (DeepSpeed) leaves both to the engine: no autocast, no scaler."""

    def __init__(self, mode: str, device: torch.device, native: bool = True):
        self.mode, self.device = mode, device
        self.dtype = _DTYPES.get(mode) if native else None
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" and native else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the run's forwards (training and evaluation) run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (fp16: multiplied by the current loss scale)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Any) -> None:
        """Bring the gradients back to their true size before clipping (fp16 only; once per step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer.optimizer)

    def step(self, optimizer: Any) -> bool:
        """Step the (accelerate-wrapped) optimizer; False when the step was skipped (fp16 found inf/nan gradients and
        lowered the scale, or DeepSpeed's own overflow check did), so the schedule does not advance."""
        if self.scaler is None:
            optimizer.step()
            return not optimizer.step_was_skipped
        before = self.scaler.get_scale()
        self.scaler.step(optimizer.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state for the checkpoint (None without one)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` saved (a checkpoint without a scaler state leaves the scaler fresh)."""
        if state and self.scaler is not None:
            self.scaler.load_state_dict(state)


class RunAccelerator(Accelerator):
    """accelerate's Accelerator whose `autocast` is the run's :class:`Precision` (accelerate's own follows the
    process-wide state, which this project keeps at "no"); code that evaluates under ``acc.autocast()`` gets the
    run's dtype."""

    def __init__(self, precision_mode: str, **kwargs: Any):
        super().__init__(mixed_precision="no", **kwargs)
        deepspeed = self.distributed_type == DistributedType.DEEPSPEED
        self.precision = Precision(precision_mode, self.device, native=not deepspeed)

    @contextlib.contextmanager
    def autocast(self, autocast_handler: Any = None):
        """The run's autocast (bf16/fp16 or nothing), whatever accelerate's process-wide state says."""
        with self.precision.autocast():
            yield


def make_accelerator(cfg: TrainConfig, **kwargs: Any) -> RunAccelerator:
    """The run's Accelerator for CPU/GPU/multi-process; a torchrun launch on CPU gets a gloo process group first.

    Every run builds its own; the process-wide accelerate state (process group, device) is created by the first and
    reused by the others, since all of them ask for the same (``mixed_precision="no"``)."""
    import torch.distributed as dist

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():  # would silently train in fp32
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPU use bf16 or no")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log_with = trackers(cfg)
    kwargs.setdefault("cpu", not torch.cuda.is_available())  # DeepSpeed on CPU passes cpu=False (distributed.py)
    return RunAccelerator(cfg.mixed_precision, log_with=log_with or None,
                          project_dir=cfg.output_dir if log_with else None, **kwargs)
