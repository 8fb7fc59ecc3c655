"""Many processes, one adapter format: the strategy-specific parts of the training loop.

The trainer calls these helpers instead of branching on the launcher; everything else in the loop is the same for
one process, `torchrun`/`accelerate launch` DDP, FSDP and DeepSpeed.

* ddp: accelerate wraps the model in DistributedDataParallel (NCCL on GPUs, gloo on CPUs).
* fsdp: torch's FSDP2 `fully_shard` (full shard): one unit per decoder layer (the decoder's `_no_split_modules`)
  plus the root; works with gloo on CPU too (accelerate's own FSDP path needs GPUs). Saving gathers the full
  tensors (`DTensor.full_tensor`), optimizer state goes through torch.distributed.checkpoint's full state dicts.
* deepspeed: accelerate's DeepSpeed integration with a ZeRO-2/3 JSON (recipes/launch/). DeepSpeed keeps its
  optimizer state partitioned and writes it with torch.save (pickle), which this project never writes, so a
  DeepSpeed run saves adapters (weights gathered to rank 0) and refuses trainer-state resume with a message.

Only rank 0 writes; every rank joins the gathers. A checkpoint records its world size; resuming with another
world size is refused (the data order, the global batch and the per-rank random streams depend on it).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..config import ConfigError

if TYPE_CHECKING:
    from .trainer import TrainConfig

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def deepspeed_stage(cfg: "TrainConfig") -> int:
    """ZeRO stage of the run's DeepSpeed config (file), or of `accelerate launch`'s environment."""
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: {path} not found")
        try:
            return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ConfigError(f"train.deepspeed_config {path}: {exc}") from None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def strategy_of(cfg: "TrainConfig") -> str:
    """'ddp', 'fsdp', or 'zero1'/'zero2'/'zero3' for this run. `auto` follows `accelerate launch --config_file`
    (its ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED environment), else DDP."""
    name = cfg.distributed
    if name == "auto":
        name = "fsdp" if _flag("ACCELERATE_USE_FSDP") else "deepspeed" if _flag("ACCELERATE_USE_DEEPSPEED") else "ddp"
    if name == "deepspeed":
        return f"zero{deepspeed_stage(cfg)}"
    return name
