"""Training settings: `TrainConfig` and the allowed values of its choice fields, spelled once.

This module sits below everything else in `train/` (the loop, checkpoints, the distributed strategies and recipes
all read it) and imports none of them, so settings never pull in the loop. Each choice field is a `Literal` type that
validation reads; the tuple of the same values (``SCHEDULES``, ``PRECISIONS``, ...) is what a CLI passes as
``choices=`` and what docs list.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..config import ConfigError, coerce
from ..errors import shorten

__all__ = ["TrainConfig", "DEFAULT_LR", "Schedule", "MixedPrecision", "Metric", "Strategy", "BadImagePolicy",
           "SCHEDULES", "PRECISIONS", "METRICS", "STRATEGIES", "BAD_IMAGE_POLICIES", "literal_values"]

#: learning rate of each parameter group that `TrainConfig.lr` does not name
DEFAULT_LR = {"mapper": 1e-3, "lora": 2e-4, "decoder": 2e-5, "encoder": 1e-5}

Schedule = Literal["linear", "cosine", "constant"]
MixedPrecision = Literal["no", "bf16", "fp16"]  # fp16 uses loss scaling (GPUs without bf16)
Metric = Literal["loss", "accuracy"]  # loss: lower is better; accuracy: exact match / closed-choice accuracy
Strategy = Literal["auto", "ddp", "fsdp", "deepspeed"]  # see distributed.py
BadImagePolicy = Literal["skip", "stop"]

SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
PRECISIONS: tuple[str, ...] = typing.get_args(MixedPrecision)
METRICS: tuple[str, ...] = typing.get_args(Metric)
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
BAD_IMAGE_POLICIES: tuple[str, ...] = typing.get_args(BadImagePolicy)


@dataclass
class TrainConfig:
    """Everything the loop needs; plain JSON data so recipes and `trainer_state/config.json` round-trip it."""

    output_dir: str = "runs/prefixvqa"
    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int | None = None  # None -> batch_size
    grad_accum: int = 1
    lr: dict[str, float] = field(default_factory=dict)  # per parameter group; missing groups take DEFAULT_LR
    weight_decay: float = 0.0
    warmup: float = 0.0  # < 1: share of all optimizer steps; >= 1: number of steps
    schedule: Schedule = "linear"
    max_grad_norm: float | None = 1.0
    mixed_precision: MixedPrecision = "no"  # fp16 uses loss scaling (GPUs without bf16)
    gradient_checkpointing: bool = False
    # Off by default: on short closed answers ("yes"/"no") length sorting puts one answer per batch, and the decoder
    # learns the batch's answer instead of looking at the image. Worth it for long free text (reports).
    group_by_length: bool = False
    # Several records per row (data/packing.py): same records per batch and same loss, less padding. Rows hold up to
    # packing_length positions (None: template.max_length); decoders that cannot keep records apart are refused.
    packing: bool = False
    packing_length: int | None = None
    eval_every_epoch: bool = True
    patience: int | None = None  # epochs without improvement before stopping; None: never stop early
    metric: Metric = "loss"  # "loss" (lower is better) or "accuracy" (exact match / closed-choice accuracy)
    seed: int = 0
    on_bad_image: BadImagePolicy = "skip"
    min_usable_share: float = 0.5  # fail (publish nothing) when fewer training records than this have a usable image
    max_steps: int | None = None
    log_every: int = 10
    save_every_steps: int | None = None  # also write last/ every k optimizer steps (mid-epoch resume points)
    save_on_signal: bool = False  # SIGTERM/Ctrl-C stops at the end of a step; also write last/ there (grace period)
    feature_cache: str | None = None  # folder; used when the encoder is frozen
    num_workers: int | None = None  # DataLoader workers decoding images; None: a few on GPU, none on CPU
    trainable: list[str] | None = None  # parameter groups to train; None keeps the model's current choice
    resume: bool | str = False  # True: continue from output_dir/last when it holds a trainer state; or a folder
    resume_with_changes: bool = False  # resume although result-changing settings differ from the checkpoint's
    max_new_tokens: int = 16  # generation length for the accuracy metric
    distributed: Strategy = "auto"  # auto (the launcher's choice, else DDP) | ddp | fsdp | deepspeed
    deepspeed_config: str | None = None  # DeepSpeed JSON (ZeRO stage etc.) when distributed is deepspeed
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"train.{msg}")

        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false; "no" is the only false value
            self.mixed_precision = "no"
        _check_types(self)
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        unknown = sorted(set(self.lr) - set(DEFAULT_LR))
        check(not unknown, f"lr: unknown group(s) {shorten(unknown)}; expected some of {sorted(DEFAULT_LR)}")
        check(all(v >= 0 for v in self.lr.values()), f"lr values must be >= 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
              f"warmup must be a ratio in [0, 1) or a whole number of steps, got {self.warmup}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null")
        check(self.patience is None or self.patience >= 1, f"patience must be >= 1 or null, got {self.patience}")
        check(0.0 <= self.min_usable_share <= 1.0, f"min_usable_share must be in [0, 1], got {self.min_usable_share}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 or null")
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.save_every_steps is None or self.save_every_steps >= 1, "save_every_steps must be >= 1 or null")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0 or null")
        check(self.packing_length is None or self.packing_length >= 1,
              f"packing_length must be >= 1 or null, got {self.packing_length}")
        check(self.packing or self.packing_length is None, "packing_length is set but packing is false")
        if self.trainable is not None:
            from ..model import GROUPS

            bad = sorted(set(self.trainable) - set(GROUPS))
            check(not bad, f"trainable: unknown group(s) {shorten(bad)}; expected some of {list(GROUPS)}")
            self.trainable = list(self.trainable)

    def group_lr(self, group: str) -> float:
        """The learning rate of parameter group `group`: the configured one, else `DEFAULT_LR`'s (what the
        optimizer and a resumed run's signature both use, so an omitted and a spelled-out default compare equal)."""
        return self.lr.get(group, DEFAULT_LR[group])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (recipes, the checkpoint's trainer state and the run log store this)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config `data` describes; a misspelt key is an error naming the known ones, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train: unknown field(s) {shorten(unknown)}; expected some of {sorted(known)}")
        return cls(**data)


def literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal` type hint, or None for any other hint (recipes' `--set` parser reads this
    to keep `train.mixed_precision=no` the string "no")."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _check_types(cfg: TrainConfig) -> None:
    """Coerce every field to its declared type in place; a choice field must hold one of its `Literal` values."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), literal_values(hints[f.name])
        if allowed is None:
            setattr(cfg, f.name, coerce(value, hints[f.name], f"train.{f.name}"))
        elif value not in allowed or isinstance(value, bool):
            raise ConfigError(f"train.{f.name}={shorten(value)} is not one of {list(allowed)}")
