"""Training loop for MedVQAAdapter: one code path for CPU, one GPU and torchrun/accelerate multi-process runs.

Design points:
* the epoch order is a pure function of (seed, epoch), so the data position is one integer and resume is exact;
* checkpoints are whole folders written next to their target and renamed into place (never half-written):
  `last/` (adapter + `trainer_state/` with optimizer tensors as safetensors and everything else as JSON) and
  `best/` (adapter + metrics);
* a non-finite loss (or gradient, or weight) stops training before the optimizer step: `last/` keeps the last finite
  weights, nothing is published as best or final, and `train()` raises `TrainingDiverged` naming the step and records;
* the output folder is locked for the run, interrupted checkpoint swaps are recovered, and a resume whose settings
  differ from the checkpoint's is refused (see `checkpoint.py`).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import PrefixVQAError
from ..config import ConfigError, check_types
from ..data.cache import FeatureCache
from ..data.images import ImageLoadError
from ..data.loader import BatchList, RecordDataset, make_loader, to_device
from ..data.records import skipped_of
from ..data.processor import record_label
from .checkpoint import (STATE_DIR, CheckpointError, check_same_recipe, checkpoint_problem, run_lock,
                         recover_checkpoint, run_signature)
from .distributed import Distributed

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from ..model import MedVQAAdapter

log = logging.getLogger(__name__)

DEFAULT_LR = {"mapper": 1e-3, "lora": 2e-4, "decoder": 2e-5, "encoder": 1e-5}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
METRICS = ("loss", "accuracy")


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
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # fp16 uses accelerate's loss scaling (GPUs without bf16)
    gradient_checkpointing: bool = False
    # Off by default: on short closed answers ("yes"/"no") length sorting puts one answer per batch, and the decoder
    # learns the batch's answer instead of looking at the image. Worth it for long free text (reports).
    group_by_length: bool = False
    eval_every_epoch: bool = True
    patience: int | None = None  # epochs without improvement before stopping; None: never stop early
    metric: str = "loss"  # "loss" (lower is better) or "accuracy" (exact match / closed-choice accuracy)
    seed: int = 0
    on_bad_image: str = "skip"
    min_usable_share: float = 0.5  # fail (publish nothing) when fewer training records than this have a usable image
    max_steps: int | None = None
    log_every: int = 10
    save_every_steps: int | None = None  # also write last/ every k optimizer steps (mid-epoch resume points)
    feature_cache: str | None = None  # folder; used when the encoder is frozen
    num_workers: int | None = None  # DataLoader workers decoding images; None: a few on GPU, none on CPU
    trainable: list[str] | None = None  # parameter groups to train; None keeps the model's current choice
    resume: bool | str = False  # True: continue from output_dir/last when it holds a trainer state; or a folder
    resume_with_changes: bool = False  # resume although result-changing settings differ from the checkpoint's
    max_new_tokens: int = 16  # generation length for the accuracy metric
    distributed: str = "auto"  # auto (the launcher's choice, else DDP) | ddp | fsdp | deepspeed: see distributed.py
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
        check_types(self, "train")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        unknown = sorted(set(self.lr) - set(DEFAULT_LR))
        check(not unknown, f"lr: unknown group(s) {unknown}; expected some of {sorted(DEFAULT_LR)}")
        check(all(v >= 0 for v in self.lr.values()), f"lr values must be >= 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
              f"warmup must be a ratio in [0, 1) or a whole number of steps, got {self.warmup}")
        check(self.schedule in SCHEDULES, f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null")
        check(self.mixed_precision in PRECISIONS,
              f"mixed_precision={self.mixed_precision!r} is not one of {list(PRECISIONS)}")
        check(self.patience is None or self.patience >= 1, f"patience must be >= 1 or null, got {self.patience}")
        check(self.metric in METRICS, f"metric={self.metric!r} is not one of {list(METRICS)}")
        check(self.on_bad_image in ("skip", "stop"), f"on_bad_image={self.on_bad_image!r} must be 'skip' or 'stop'")
        check(0.0 <= self.min_usable_share <= 1.0, f"min_usable_share must be in [0, 1], got {self.min_usable_share}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 or null")
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.save_every_steps is None or self.save_every_steps >= 1, "save_every_steps must be >= 1 or null")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0 or null")
        from .distributed import STRATEGIES

        check(self.distributed in STRATEGIES, f"distributed={self.distributed!r} is not one of {list(STRATEGIES)}")
        if self.trainable is not None:
            from ..model import GROUPS

            bad = sorted(set(self.trainable) - set(GROUPS))
            check(not bad, f"trainable: unknown group(s) {bad}; expected some of {list(GROUPS)}")
            self.trainable = list(self.trainable)

    def group_lr(self, group: str) -> float:
        return self.lr.get(group, DEFAULT_LR[group])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


@dataclass
class TrainResult:
    best_dir: Path | None
    last_dir: Path | None
    history: list[dict[str, Any]]
    stopped_reason: str  # "completed", "max_steps", "early stopping", "non-finite loss"
    global_step: int = 0
    skipped_images: list[str] = field(default_factory=list)
    best_metric: float | None = None
    skipped_records: list[dict[str, Any]] = field(default_factory=list)  # bad items the readers left out


class TrainingDiverged(PrefixVQAError, RuntimeError):
    """The loss, a gradient or a weight became non-finite: the run stopped and published nothing.

    The message names the step, the records of the bad batch and the last finite checkpoint; ``result`` is the
    run's TrainResult (its ``last_dir`` is that checkpoint, or None).
    """

    def __init__(self, message: str, result: TrainResult | None = None):
        super().__init__(message)
        self.result = result


# ------------------------------------------------------------------------------------------------------ batching
def _length(record: VQARecord) -> int:
    return sum(len(turn.question) + len(turn.answer) for turn in record.turns)


def epoch_batches(records: Sequence[VQARecord], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Batches of record indices for one epoch; a pure function of its arguments (exact resume, same on all ranks).

    Length grouping follows the usual megabatch scheme: shuffle, sort chunks of 50 batches by length (less padding),
    then shuffle the batch order so lengths do not trend within the epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(records)).tolist()
    if group_by_length:
        mega = batch_size * 50
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: -_length(records[j]))]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ------------------------------------------------------------------------------------------------------ state I/O
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states as JSON data."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], _b64(np_state[1].astype(np.uint32).tobytes()), *map(float, np_state[2:])],
             "torch": _b64(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys = np.frombuffer(base64.b64decode(state["numpy"][1]), dtype=np.uint32)
    np.random.set_state((state["numpy"][0], keys, int(state["numpy"][2]), int(state["numpy"][3]),
                         float(state["numpy"][4])))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def optimizer_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into flat tensors (safetensors) and the JSON rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():  # "state.<index or parameter name>.<state name>"
        idx, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    for idx, values in rest["scalars"].items():
        state.setdefault(int(idx) if idx.isdigit() else idx, {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _scheduler_json(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def write_checkpoint(model: MedVQAAdapter, folder: Path, trainer_state: dict[str, Any] | None,
                     optimizer_state: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Adapter (+ trainer_state/) into a temporary sibling, then renamed over `folder`: all or nothing. The manifest
    is rewritten last to cover trainer_state/ too, so a complete checkpoint is one whose manifest verifies.
    `state_dict`: the full tensors a sharded run gathered (else the model's live tensors are written)."""
    from safetensors.torch import save_file

    from ..adapter_io import write_adapter_files
    from ..fileio import atomic_dir, write_manifest

    with atomic_dir(folder) as tmp:
        write_adapter_files(model, tmp, card, state_dict)
        if trainer_state is not None:
            state_dir = tmp / STATE_DIR
            state_dir.mkdir()
            rest: dict[str, Any] = {}
            if optimizer_state is not None:
                tensors, rest = optimizer_tensors(optimizer_state)
                save_file(tensors, str(state_dir / "optimizer.safetensors"))
            payload = {**trainer_state, "optimizer": rest}
            (state_dir / "state.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            write_manifest(tmp)
    return folder


def read_trainer_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state.json contents, optimizer state_dict or None) of a checkpoint folder; a damaged file is named."""
    from safetensors.torch import load_file

    state_dir = Path(folder) / STATE_DIR
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_dir / 'state.json'} cannot be read: {exc}") from None
    opt_file = state_dir / "optimizer.safetensors"
    if not opt_file.is_file():
        return state, None
    try:
        tensors = load_file(str(opt_file))
    except Exception as exc:  # safetensors raises its own error type for damaged headers and truncation
        raise CheckpointError(f"{opt_file} is damaged or truncated: {exc}") from None
    return state, optimizer_from_tensors(tensors, state["optimizer"])


def load_weights_into(model: MedVQAAdapter, folder: Path) -> None:
    """Load a checkpoint's trained tensors into an already built model (resume keeps the live base models), through
    the one adapter-folder reader: same version rule, manifest check and strictness as `from_pretrained`."""
    from ..adapter_io import load_weights_into as load

    load(model, folder)


# --------------------------------------------------------------------------------------------------------- helpers
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # transformers' names


def trackers(cfg: TrainConfig) -> list[str]:
    """accelerate trackers: TensorBoard when installed (and asked), W&B when installed and configured."""
    import importlib.util
    import os

    found = []
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
        found.append("tensorboard")
    elif cfg.tensorboard:
        warnings.warn("tensorboard is not installed: skipping TensorBoard logs (pip install tensorboard)",
                      stacklevel=3)
    if importlib.util.find_spec("wandb") is not None and (os.environ.get("WANDB_API_KEY") or
                                                          os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


class _Logger:
    """log.jsonl always, plus accelerate's trackers; only the main process writes."""

    def __init__(self, out: Path, acc: Any, cfg: TrainConfig):
        self.enabled, self.acc, self.file = acc.is_main_process, acc, out / "log.jsonl"
        if acc.log_with:
            flat = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("tb", config=flat)

    def __call__(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.file.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        prefix = row.get("kind", "train")
        values = {f"{prefix}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if self.acc.log_with and values:
            self.acc.log(values, step=row.get("step", 0))

    def close(self) -> None:
        if self.acc.log_with:
            self.acc.end_training()


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Train loss per logged step and eval metric per epoch, as a PNG (matplotlib imported lazily).

    Drawn on a ``matplotlib.figure.Figure`` without pyplot, so the caller's matplotlib backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png", stacklevel=2)
        return
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    evals = [(r["step"], r["value"]) for r in history if r.get("kind") == "eval"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label=f"eval {history[-1].get('metric', '') if history else ''}".strip())
    ax.set_xlabel("optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _make_accelerator(cfg: TrainConfig, **kwargs: Any):
    """Accelerator for CPU/GPU/multi-process; a torchrun launch on CPU gets a gloo process group first."""
    import torch.distributed as dist
    from accelerate import Accelerator

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():  # accelerate would silently train in fp32
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPU use bf16 or no")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", cfg.mixed_precision)) != cfg.mixed_precision:
        # accelerate keeps one process-wide state and refuses a second precision; a curriculum stage or a later run
        # in the same process may use another, so drop that state (the process group in PartialState is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    log_with = trackers(cfg)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=log_with or None, project_dir=cfg.output_dir if log_with else None, **kwargs)


# ------------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """Holds the run's moving parts; `train()` below is the one-call entry point."""

    def __init__(self, model: MedVQAAdapter, train_records: Sequence[VQARecord],
                 eval_records: Sequence[VQARecord] | None, cfg: TrainConfig):
        if not train_records:
            raise ConfigError("train: no training records")
        self.skipped_records = [{"split": split, **asdict(item)} for split, records in
                                (("train", train_records), ("eval", eval_records)) for item in skipped_of(records)]
        self.cfg, self.train_records, self.eval_records = cfg, list(train_records), list(eval_records or [])
        self.out = Path(cfg.output_dir)
        self.dist = Distributed(cfg)
        self.acc = _make_accelerator(cfg, **self.dist.accelerator_kwargs())
        self.main = self.acc.is_main_process
        self.dist.check(model, self.acc.num_processes)
        if cfg.trainable is not None:
            check_trainable(model, cfg.trainable)
            model.set_trainable(*cfg.trainable)
        groups = {g: [p for _, p in ps if p.requires_grad] for g, ps in model.parameter_groups().items()}
        groups = {g: ps for g, ps in groups.items() if ps}
        if not groups:
            raise ConfigError("train: no trainable parameters (set train.trainable or the model's tuning)")
        self.group_names = list(groups)
        model.changed_parts.update(g for g in groups if g in ("encoder", "decoder"))
        if cfg.gradient_checkpointing:
            model.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder_trains = "encoder" in groups
        self.cache = (FeatureCache.for_model(model, cfg.feature_cache)
                      if cfg.feature_cache and model.config.encoder.freeze and not encoder_trains else None)
        self.signature = run_signature(cfg, model, self.train_records, self.eval_records)
        # a resumed run's trained tensors go in before the model is wrapped or sharded
        self._recover()
        self.resume_dir = self._resume_dir()
        self.resume_state: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        if self.resume_dir is not None:
            self.resume_state = read_trainer_state(self.resume_dir)
            self._check_resume(self.resume_state[0], self.resume_dir)
            load_weights_into(model, self.resume_dir)
        self.raw = model
        wrapped = self.dist.shard(self.acc, model)  # FSDP replaces the parameters: the optimizer is built after
        params = {g: [p for _, p in ps if p.requires_grad] for g, ps in model.parameter_groups().items()}
        optimizer = torch.optim.AdamW([{"params": params[g], "lr": cfg.group_lr(g), "name": g} for g in groups],
                                      weight_decay=cfg.weight_decay)
        self.model, self.optimizer = self.dist.prepare(self.acc, wrapped, optimizer)
        world = self.acc.num_processes
        self.batches_per_epoch = max(1, math.ceil(len(self.train_records) / cfg.batch_size) // world)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        warm = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * self.total_steps))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(SCHEDULER_NAMES[cfg.schedule], self.optimizer.optimizer, num_warmup_steps=warm,
                                       num_training_steps=self.total_steps)
        self.step = self.epoch = self.position = 0
        self.skipped: list[str] = []
        self.bad_train: set[str] = set()  # ids of training records whose image could not be used
        self.usable_items = 0  # training items that reached the loss (this rank), over the whole run
        self.train_sampler, self.eval_sampler = BatchList(), BatchList()
        with self.dist.full_params(self.model):  # the feature cache encodes images outside the forward
            self.train_loader = make_loader(self._dataset(self.train_records, train=True), self.train_sampler,
                                            num_workers=cfg.num_workers)
            self.eval_loader = make_loader(self._dataset(self.eval_records), self.eval_sampler,
                                           num_workers=cfg.num_workers) if self.eval_records else None
        self.best: float | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []

    # --- data -------------------------------------------------------------------------------------------------------
    def _rank_batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.train_records, self.cfg.batch_size, self.cfg.seed, epoch, self.cfg.group_by_length)
        world, rank = self.acc.num_processes, self.acc.process_index
        batches = batches[:max(world, len(batches) // world * world)] if len(batches) >= world else batches * world
        return batches[rank::world][:self.batches_per_epoch]

    def _dataset(self, records: list[VQARecord], train: bool = False) -> RecordDataset:
        """Records through the model's processor; with the feature cache, every image is encoded once up front
        (bad ones go through the run's policy) and workers read the cached arrays."""
        if self.cache is None or not records:
            return RecordDataset(records, self.raw.processor)
        keys = self.cache.fill(self.raw, records,
                               on_error=lambda r, err: self._bad_image(r.id, record_label(r), err, train))
        return RecordDataset(records, self.raw.processor, cache=self.cache, cache_keys=keys)

    def _bad_image(self, record_id: str, name: str, err: Any, train: bool = False) -> None:
        if self.cfg.on_bad_image == "stop":
            raise ImageLoadError(f"record {record_id!r}: {err} (train.on_bad_image='stop')")
        if train:
            self.bad_train.add(record_id)
        if name not in self.skipped:
            self.skipped.append(name)
            log.warning("skipping record %s: bad image %s: %s", record_id, name, err)

    def _check(self, batch: dict[str, Any], train: bool = False) -> dict[str, Any] | None:
        """A collated batch's tensors on the device, after applying the bad-image policy to its failed items."""
        for record_id, name, err in batch["errors"]:
            self._bad_image(record_id, name, err, train)
        return to_device(batch, self.acc.device) if batch["ids"] else None

    def _check_usable(self, trained: bool = True) -> None:
        """Fail (before anything is saved) when too few training records had a usable image: a run that trained
        on nothing, or on a small remainder, must not publish an adapter. ``trained``: batches have been seen."""
        from accelerate.utils import gather_object

        bad, usable = self.bad_train, self.usable_items
        if self.acc.num_processes > 1:
            bad = {i for part in gather_object([sorted(bad)]) for i in part}
            usable = int(self.acc.reduce(torch.tensor([usable], device=self.acc.device), reduction="sum").item())
        n, share = len(self.train_records), self.cfg.min_usable_share
        if len(bad) < n and len(bad) <= (1.0 - share) * n and (usable > 0 or not trained):
            return
        raise ImageLoadError(f"train: {n - len(bad)} of {n} training records have a usable image "
                             f"({usable} used so far; train.min_usable_share={share}); bad images include "
                             f"{self.skipped[:3]}; stopped without publishing an adapter")

    def _all_finite(self) -> bool:
        """Every trained weight finite (one device sync, not one per tensor)."""
        flags = [torch.isfinite(p.detach()).all() for g in self.optimizer.param_groups for p in g["params"]]
        return bool(torch.stack(flags).all()) if flags else True

    def _diverged(self, logger: _Logger, what: str, ids: list[str], index: int) -> TrainingDiverged:
        """The failure of a run whose `what` became non-finite: names the step, the records and what was kept."""
        from accelerate.utils import gather_object

        if self.acc.num_processes > 1:
            ids = [i for part in gather_object([list(ids)]) for i in part]
        self.history.append({"kind": "stop", "step": self.step, "epoch": self.epoch, "reason": f"non-finite {what}",
                             "records": ids})
        logger(self.history[-1])
        last = self.out / "last"
        kept = "no checkpoint was written before it"
        if checkpoint_problem(last) is None:
            step = json.loads((last / STATE_DIR / "state.json").read_text())["step"]
            kept = f"the last finite checkpoint is {last} (step {step}), kept for inspection or resume"
        shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        where = (f"at optimizer step {self.step + 1} (epoch {self.epoch}, batch {index}); records of the batch: "
                 f"{shown}" if ids else f"after optimizer step {self.step} (end of epoch {self.epoch})")
        message = (f"non-finite {what} {where}; {kept}; nothing was published as best or final (lower the learning "
                   f"rate, or check the records named)")
        log.error(message)
        return TrainingDiverged(message)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        many = self.acc.num_processes > 1
        rngs = gather_object([rng_state()]) if many else [rng_state()]
        # per rank, like the random states: each rank resumes its own share of the bookkeeping
        bad = gather_object([sorted(self.bad_train)]) if many else [sorted(self.bad_train)]
        usable = gather_object([self.usable_items]) if many else [self.usable_items]
        scaler = self.acc.scaler.state_dict() if getattr(self.acc, "scaler", None) is not None else None
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "best_metric": self.best,
                "bad_epochs": self.bad_epochs, "rng": rngs, "world_size": self.acc.num_processes,
                "strategy": "fsdp" if self.dist.fsdp else self.dist.strategy,
                "scheduler": _scheduler_json(self.scheduler.state_dict()), "scaler": scaler,
                "skipped_images": self.skipped, "groups": self.group_names, "config": self.cfg.to_dict(),
                "signature": self.signature, "bad_train_records": bad, "usable_items": usable}

    def save_last(self) -> None:
        self._check_usable(trained=False)  # mid-run: the first batches may all have been bad; best/ demands more
        state = self._state()  # every rank joins the gathers: random states, sharded tensors, optimizer state
        weights = self.dist.gathered_state(self.acc, self.model, self.raw)
        optimizer = self.dist.optimizer_state(self.model, self.optimizer)
        if self.main:
            write_checkpoint(self.raw, self.out / "last", state, optimizer, state_dict=weights)
        self.acc.wait_for_everyone()

    def save_best(self, metrics: dict[str, Any]) -> None:
        self._check_usable()  # never publish an adapter that trained on nothing
        weights = self.dist.gathered_state(self.acc, self.model, self.raw)
        if self.main:
            write_checkpoint(self.raw, self.out / "best", None, card={"metrics": metrics}, state_dict=weights)
        self.acc.wait_for_everyone()

    def _check_resume(self, state: dict[str, Any], folder: Path) -> None:
        if state.get("groups") != self.group_names:
            raise ConfigError(f"resume from {folder}: trained groups {state.get('groups')} but this run trains "
                              f"{self.group_names}")
        check_same_recipe(folder, state.get("signature"), self.signature, self.cfg.resume_with_changes)
        self.dist.check_resume(state, self.acc.num_processes, folder)

    def resume(self, folder: Path) -> None:
        """Restore the optimizer, scheduler, counters and random state (the weights went in before wrapping)."""
        state, opt = self.resume_state if self.resume_state is not None else read_trainer_state(folder)
        if self.resume_state is None:
            self._check_resume(state, folder)
            load_weights_into(self.raw, folder)
        if opt is not None:
            self.dist.load_optimizer(self.model, self.optimizer, opt)
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})
        if self.cfg.resume_with_changes:  # the new learning rates take effect at the restored schedule position
            sched = self.scheduler
            sched.base_lrs = [self.cfg.group_lr(g["name"]) for g in self.optimizer.param_groups]
            for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * factor(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        rank = self.acc.process_index
        bad, usable = state.get("bad_train_records", []), state.get("usable_items", 0)
        self.bad_train = set(bad[rank] if bad and isinstance(bad[0], list) else bad)  # per rank (older: one list)
        self.usable_items = int(usable[rank] if isinstance(usable, list) else usable)
        if state.get("scaler") and getattr(self.acc, "scaler", None) is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best, self.bad_epochs = state["best_metric"], state["bad_epochs"]
        self.skipped = list(state.get("skipped_images", []))
        set_rng_state(state["rng"][self.acc.process_index])  # same world size: checked before loading

    # --- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval loss (mean over answers' batches), or accuracy: the evaluation's own way of answering (choices
        scored, the rest generated) and its answer normaliser. Records are sharded over ranks and summed."""
        from ..eval.metrics import exact_match
        from ..inference import answer_records

        model, cfg = self.raw, self.cfg
        was = model.training
        model.eval()
        idx = list(range(self.acc.process_index, len(self.eval_records), self.acc.num_processes))
        size = cfg.eval_batch_size or cfg.batch_size
        total = count = 0.0
        try:
            # sharded weights are gathered once: ranks may run different numbers of forwards here
            with self.dist.full_params(self.model):
                if cfg.metric == "loss":
                    self.eval_sampler.set([idx[s:s + size] for s in range(0, len(idx), size)])
                    for batch in self.eval_loader:
                        inputs = self._check(batch)
                        if inputs is not None:
                            with self.acc.autocast():
                                total += float(model(**inputs).loss) * len(batch["ids"])
                            count += len(batch["ids"])
                elif idx:
                    data = self.eval_loader.dataset
                    recs = [self.eval_records[i] for i in idx]
                    keys = [data.cache_keys[i] for i in idx] if data.cache_keys is not None else None
                    with self.acc.autocast():
                        rows = answer_records(model, recs, [r.choices or None for r in recs], size,
                                              {"max_new_tokens": cfg.max_new_tokens}, progress=False,
                                              num_workers=cfg.num_workers, cache=data.cache, cache_keys=keys,
                                              on_error=self._bad_image)
                    done = [(row, r) for row, r in zip(rows, recs) if row is not None]
                    total, count = sum(exact_match(row["prediction"], r.answer) for row, r in done), len(done)
        finally:
            model.train(was)
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.acc.device)
        sums = self.acc.reduce(sums, reduction="sum") if self.acc.num_processes > 1 else sums
        value = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
        return {cfg.metric: value, "count": int(sums[1])}

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.cfg.metric == "loss" else value > self.best

    # --- main loop --------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.resume_dir is not None:
            self.resume(self.resume_dir)
        else:
            from accelerate.utils import set_seed

            set_seed(cfg.seed)
        self._check_usable(trained=False)  # the feature cache has already tried every image
        logger = _Logger(self.out, self.acc, cfg)
        logger({"kind": "data", "train_records": len(self.train_records), "eval_records": len(self.eval_records),
                "skipped_records": len(self.skipped_records)})
        reason, failure = "completed", None
        progress = None
        if cfg.progress and self.main:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.model.train()
        try:
            reason = self._loop(logger, progress)
            if not (cfg.eval_every_epoch and self.eval_records):
                self.save_best({"epoch": self.epoch, "step": self.step})  # no metric: the final weights are best
        except TrainingDiverged as exc:
            reason, failure = "non-finite loss", exc
        finally:
            if progress is not None:
                progress.close()
            logger.close()
        if self.main and cfg.plot and self.history:
            plot_history(self.history, self.out / "loss.png")
        best = self.out / "best"
        last = self.out / "last"
        result = TrainResult(best if best.is_dir() else None, last if last.is_dir() else None, self.history, reason,
                             self.step, list(self.skipped), self.best, list(self.skipped_records))
        if failure is not None:
            failure.result = result
            raise failure
        return result

    def _recover(self) -> None:
        """Put back what an interrupted checkpoint swap left and delete leftovers (the main process; we hold the
        lock), before the checkpoint to resume from is chosen."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            recover_checkpoint(self.out / "best", trainer_state=False)
            try:
                recover_checkpoint(self.out / "last")
            except CheckpointError:
                if self.cfg.resume is True or self.cfg.resume == "auto":
                    raise
                log.warning("%s: leftovers of an interrupted checkpoint swap are kept (train.resume is false)",
                            self.out)
        self.acc.wait_for_everyone()

    def _resume_dir(self) -> Path | None:
        """The checkpoint to continue from, after putting back one an interrupted swap left; never a silent fresh
        start while a checkpoint exists that cannot be used."""
        resume, last = self.cfg.resume, self.out / "last"
        if not resume:
            if self.main and (last.exists() or (self.out / "best").exists()):
                log.warning("%s holds checkpoints of an earlier run; train.resume is false, so this run starts "
                            "afresh and replaces them", self.out)
            return None
        auto = resume is True or resume == "auto"
        folder = last if auto else Path(resume)
        if not folder.is_dir():
            if not auto:
                raise ConfigError(f"train.resume={resume!r}: no such checkpoint folder")
            if (self.out / "best").is_dir():
                log.warning("%s has no last/ checkpoint (best/ holds no trainer state): starting afresh", self.out)
            return None
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise CheckpointError(f"train.resume: {folder} cannot be resumed: {problem}. Move it away to start afresh "
                                  f"or set train.resume=false")
        return folder

    def _loop(self, logger: _Logger, progress: Any) -> str:
        cfg, acc = self.cfg, self.acc
        running, n_running, t0 = 0.0, 0, time.perf_counter()
        while self.epoch < cfg.epochs:
            micro = 0
            window: list[str] = []  # record ids of the micro-batches of the current optimizer step
            batches = self._rank_batches(self.epoch)
            self.train_sampler.set(batches, self.position)
            for index, batch in enumerate(self.train_loader, start=self.position):
                sync = (micro + 1) % cfg.grad_accum == 0 or index == len(batches) - 1
                inputs = self._check(batch, train=True)
                window.extend(batch["ids"])
                with acc.autocast():
                    loss = self.model(**inputs).loss if inputs is not None else None
                bad = torch.tensor([0.0 if loss is None or torch.isfinite(loss.detach()) else 1.0], device=acc.device)
                if acc.num_processes > 1:
                    bad = acc.reduce(bad, reduction="sum")
                if bad.item() > 0:
                    raise self._diverged(logger, "loss", batch["ids"], index)
                if loss is None:  # every image of this batch was bad: keep ranks in step with a zero loss
                    loss = sum(p.sum() * 0.0 for p in self.raw.parameters() if p.requires_grad)
                else:
                    running, n_running = running + float(loss.detach()), n_running + 1
                    self.usable_items += len(batch["ids"])
                with self.dist.no_sync(acc, self.model, sync):
                    self.dist.backward(acc, loss, cfg.grad_accum)
                micro += 1
                self.position = index + 1
                if not sync:
                    continue
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = self.dist.clip_grad_norm(acc, [p for g in self.optimizer.param_groups
                                                               for p in g["params"]], cfg.max_grad_norm)
                    if grad_norm is not None and not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":
                        raise self._diverged(logger, "gradient", window, index)
                self.optimizer.step()
                if not self._all_finite():  # overflow in the update itself: never save these weights
                    raise self._diverged(logger, "weights", window, index)
                window = []
                if not self.optimizer.step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                micro = 0
                if progress is not None:
                    progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    row = {"kind": "train", "step": self.step, "epoch": self.epoch,
                           "loss": running / max(1, n_running), "grad_norm": grad_norm,
                           "seconds": round(time.perf_counter() - t0, 3), "skipped_images": len(self.skipped),
                           **{f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}}
                    self.history.append(row)
                    logger(row)
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss']:.4f}")
                    running, n_running = 0.0, 0
                if cfg.max_steps and self.step >= cfg.max_steps:
                    self.save_last()
                    return "max_steps"
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                    self.save_last()
            self.epoch, self.position = self.epoch + 1, 0
            if cfg.eval_every_epoch and self.eval_records:
                metrics = self.evaluate()
                value = metrics[cfg.metric]
                if cfg.metric == "loss" and metrics["count"] and not math.isfinite(value):
                    raise self._diverged(logger, "evaluation loss", [], len(batches))  # before saving these weights
                improved = self._improved(value)
                if improved:
                    self.best, self.bad_epochs = value, 0
                else:
                    self.bad_epochs += 1
                row = {"kind": "eval", "step": self.step, "epoch": self.epoch, "metric": cfg.metric, "value": value,
                       "improved": improved, "bad_epochs": self.bad_epochs, "count": metrics["count"]}
                self.history.append(row)
                logger(row)
                if improved:
                    self.save_best({cfg.metric: value, "epoch": self.epoch, "step": self.step})
                self.save_last()
                if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                    return "early stopping"
            else:
                self.save_last()
        return "completed"


def check_trainable(model: MedVQAAdapter, groups: Sequence[str]) -> None:
    """Refuse group choices whose trained tensors the adapter folder would not store (they would be lost)."""
    from ..adapter_io import PEFT_MODES

    mode = model.config.tuning.mode
    if "decoder" in groups and mode != "full":
        raise ConfigError(f"trainable group 'decoder' needs tuning.mode='full' (is {mode!r}): an adapter folder only "
                          "stores decoder base weights in full mode")
    if "lora" in groups and mode not in PEFT_MODES:
        raise ConfigError(f"trainable group 'lora' needs a peft tuning.mode {list(PEFT_MODES)}, not {mode!r}")
    if "encoder" in groups and model.config.encoder.freeze:
        raise ConfigError("trainable group 'encoder' needs encoder.freeze=false (so its tensors are saved)")


def train(model: MedVQAAdapter, train_records: Sequence[VQARecord], eval_records: Sequence[VQARecord] | None,
          cfg: TrainConfig) -> TrainResult:
    """Train `model` in place; checkpoints go to cfg.output_dir/{last,best}. See TrainConfig for the knobs.

    The output folder is locked for the call (by the main process of a multi-process launch). Raises
    `TrainingDiverged` on a non-finite loss, `ImageLoadError` when too few training images are usable, and
    `CheckpointError` when a resume would be unsafe.
    """
    with run_lock(cfg.output_dir):
        return Trainer(model, train_records, eval_records, cfg).run()
