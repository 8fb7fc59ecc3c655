"""Training loop for MedVQAAdapter: one code path for CPU, one GPU and torchrun/accelerate multi-process runs.

Design points:
* the epoch order is a pure function of (seed, epoch), so the data position is one integer and resume is exact;
* checkpoints are whole folders written next to their target and renamed into place (never half-written):
  `last/` (adapter + `trainer_state/` with optimizer tensors as safetensors and everything else as JSON) and
  `best/` (adapter + metrics); see `checkpoint.py`;
* a non-finite loss (or gradient, or weight) stops training before the optimizer step: `last/` keeps the last finite
  weights, nothing is published as best or final, and `train()` raises `TrainingDiverged` naming the step and records;
* the output folder is locked for the run, interrupted checkpoint swaps are recovered, and a resume whose settings
  differ from the checkpoint's is refused (see `checkpoint.py`);
* SIGTERM or Ctrl-C stops the run at the end of an optimizer step, every rank at the same one (`stopping.py`);
* the run seeds (or, resuming, restores) the global random generators and gives the caller's back when it ends
  (`prefixvqa.rng`); its mixed precision is its own (`precision.py`).

Settings live in `config.py`, what a run reports in `reporting.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError
from ..data.cache import FeatureCache
from ..data.images import ImageLoadError
from ..data.loader import BatchList, RecordDataset, make_loader, to_device
from ..data.packing import packing_for
from ..data.records import skipped_of
from ..errors import PrefixVQAError
from ..data.processor import record_label
from ..rng import preserved, rng_state, seed_all
from .checkpoint import (check_output_dir, check_same_recipe, describe_last, read_trainer_state, recover_output,
                         resume_folder, run_lock, run_signature, scheduler_json, write_checkpoint)
from .config import DEFAULT_LR, TrainConfig
from ..adapter_io import load_weights_into  # the one adapter-folder reader (resume included)
from ..ood import attach_training_images  # every adapter folder written carries the training images' summary
from .distributed import Distributed
from .reporting import RunLog, plot_history
from .sampling import BatchPlan, epoch_batches, restore_rank_state
from .stopping import TrainingInterrupted, agreed_signal, current, signal_name, stop_signals

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from ..model import MedVQAAdapter

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "Trainer", "train", "epoch_batches",
           "check_trainable", "DEFAULT_LR"]

log = logging.getLogger(__name__)

SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # transformers' names


@dataclass
class TrainResult:
    """What a finished (or diverged) run leaves: where its checkpoints are, its history and why it stopped.

    Callers pick the adapter to use from it (`best_dir`, else `last_dir`); recipes chain stages through it."""

    best_dir: Path | None
    last_dir: Path | None
    history: list[dict[str, Any]]
    stopped_reason: str  # "completed", "max_steps", "early stopping", "non-finite loss", "stopped by SIGTERM"
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
def check_trainable(model: MedVQAAdapter, groups: Sequence[str]) -> None:
    """Refuse group choices whose trained tensors the adapter folder would not store (they would be lost)."""
    from ..tuning import TUNING_MODES

    method = model.config.tuning.method
    if "decoder" in groups and not method.trains_decoder:
        modes = [name for name, m in TUNING_MODES.items() if m.trains_decoder]
        raise ConfigError(f"trainable group 'decoder' needs a tuning.mode that trains the decoder {modes} (is "
                          f"{method.name!r}): an adapter folder only stores decoder base weights in such a mode")
    if "lora" in groups and not method.uses_peft_files:
        modes = [name for name, m in TUNING_MODES.items() if m.uses_peft_files]
        raise ConfigError(f"trainable group 'lora' needs a peft tuning.mode {modes}, not {method.name!r}")
    if "encoder" in groups and model.config.encoder.freeze:
        raise ConfigError("trainable group 'encoder' needs encoder.freeze=false (so its tensors are saved)")


# ------------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """Holds the run's moving parts; `train()` below is the one-call entry point.

    Construction builds everything a run needs (accelerator, optimizer, schedule, loaders) and loads a resumed run's
    weights before the model is wrapped; :meth:`run` trains. Tests patch :meth:`save_last`, :meth:`evaluate` and
    `_loop` on the class (fault injection), so those names are part of its contract.
    """

    def __init__(self, model: MedVQAAdapter, train_records: Sequence[VQARecord],
                 eval_records: Sequence[VQARecord] | None, cfg: TrainConfig):
        if not train_records:
            raise ConfigError("train: no training records")
        self.skipped_records = [{"split": split, **asdict(item)} for split, records in
                                (("train", train_records), ("eval", eval_records)) for item in skipped_of(records)]
        self.cfg, self.train_records, self.eval_records = cfg, list(train_records), list(eval_records or [])
        self.out = Path(cfg.output_dir)
        self.dist = Distributed(cfg)
        from .precision import make_accelerator

        self.acc = make_accelerator(cfg, **self.dist.accelerator_kwargs())
        self.precision = self.acc.precision
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
        if self.main:  # we hold the lock: put back what an interrupted checkpoint swap left
            recover_output(self.out, cfg.resume)
        self.acc.wait_for_everyone()
        self.resume_dir = resume_folder(self.out, cfg.resume, warn=self.main)
        self.resume_state: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        if self.resume_dir is not None:
            self.resume_state = read_trainer_state(self.resume_dir)
            self._check_resume(self.resume_state[0], self.resume_dir)
            load_weights_into(model, self.resume_dir)
        world = self.acc.num_processes  # the global batches: the original run's, whatever the world size (sampling.py)
        self.plan = BatchPlan.for_run(cfg, len(self.train_records), world,
                                      self.resume_state[0] if self.resume_state else None, self.resume_dir)
        self.grad_accum = self.plan.accum_at(world)  # micro-batches per rank and step
        self.raw = model
        wrapped = self.dist.shard(self.acc, model)  # FSDP replaces the parameters: the optimizer is built after
        params = {g: [p for _, p in ps if p.requires_grad] for g, ps in model.parameter_groups().items()}
        optimizer = torch.optim.AdamW([{"params": params[g], "lr": cfg.group_lr(g), "name": g} for g in groups],
                                      weight_decay=cfg.weight_decay)
        self.model, self.optimizer = self.dist.prepare(self.acc, wrapped, optimizer)
        self.steps_per_epoch = self.plan.steps_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        warm = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * self.total_steps))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(SCHEDULER_NAMES[cfg.schedule], optimizer, num_warmup_steps=warm,  # the torch one
                                       num_training_steps=self.total_steps)
        self.step = self.epoch = self.position = 0
        self.skipped: list[str] = []
        self.bad_train: set[str] = set()  # ids of training records whose image could not be used
        self.usable_items = 0  # training items that reached the loss (this rank), over the whole run
        self.train_sampler, self.eval_sampler = BatchList(), BatchList()
        pack = packing_for(model, cfg)  # rows of packed records (train.packing), refused where it cannot hold
        with self.dist.full_params(self.model):  # the feature cache encodes images outside the forward
            self.train_loader = make_loader(self._dataset(self.train_records, train=True), self.train_sampler,
                                            num_workers=cfg.num_workers, pack=pack)
            self.eval_loader = make_loader(self._dataset(self.eval_records), self.eval_sampler,
                                           num_workers=cfg.num_workers, pack=pack) if self.eval_records else None
            attach_training_images(model, self.train_records, self.eval_records, self.cache)
        self.best: float | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []

    # --- data -------------------------------------------------------------------------------------------------------
    def _rank_batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.train_records, self.cfg.batch_size, self.cfg.seed, epoch, self.cfg.group_by_length)
        return self.plan.rank_batches(batches, self.acc.num_processes, self.acc.process_index)

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

    def _diverged(self, logger: RunLog, what: str, ids: list[str], index: int) -> TrainingDiverged:
        """The failure of a run whose `what` became non-finite: names the step, the records and what was kept."""
        from accelerate.utils import gather_object

        if self.acc.num_processes > 1:
            ids = [i for part in gather_object([list(ids)]) for i in part]
        self.history.append({"kind": "stop", "step": self.step, "epoch": self.epoch, "reason": f"non-finite {what}",
                             "records": ids})
        logger(self.history[-1])
        kept = describe_last(self.out, "the last finite checkpoint is {} (step {}), kept for inspection or resume",
                             "no checkpoint was written before it")
        shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        where = (f"at optimizer step {self.step + 1} (epoch {self.epoch}, batch {index}); records of the batch: "
                 f"{shown}" if ids else f"after optimizer step {self.step} (end of epoch {self.epoch})")
        message = (f"non-finite {what} {where}; {kept}; nothing was published as best or final (lower the learning "
                   f"rate, or check the records named)")
        log.error(message)
        return TrainingDiverged(message)

    def _stop_point(self, logger: RunLog, saved: bool) -> None:
        """A safe point (end of an optimizer step or epoch): when a signal asked any rank to stop, every rank stops
        here (one gather: they agree on the step), after saving `last/` if train.save_on_signal asks and ``saved``
        says it was not just written; raises TrainingInterrupted."""
        signum = agreed_signal(self.stop, self.acc)
        if not signum:
            return
        self.stop.stopping = True
        if self.cfg.save_on_signal and not saved:
            self.save_last()
        name = signal_name(signum)
        self.history.append({"kind": "stop", "step": self.step, "epoch": self.epoch, "reason": f"stopped by {name}"})
        logger(self.history[-1])
        kept = describe_last(self.out, "last checkpoint: {} (step {}); resume with train.resume=true",
                             "no checkpoint was written (train.save_every_steps or train.save_on_signal keep it)")
        raise TrainingInterrupted(f"stopped by {name} after optimizer step {self.step} of {self.total_steps} (epoch "
                                  f"{self.epoch}); {kept}", signum)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        many = self.acc.num_processes > 1
        rngs = gather_object([rng_state()]) if many else [rng_state()]
        # per rank, like the random states: each rank resumes its own share of the bookkeeping
        bad = gather_object([sorted(self.bad_train)]) if many else [sorted(self.bad_train)]
        usable = gather_object([self.usable_items]) if many else [self.usable_items]
        scaler = self.precision.state_dict()
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "best_metric": self.best,
                "bad_epochs": self.bad_epochs, "rng": rngs, "world_size": self.acc.num_processes,
                "layout": self.plan.to_json(),
                "strategy": "fsdp" if self.dist.fsdp else self.dist.strategy,
                "scheduler": scheduler_json(self.scheduler.state_dict()), "scaler": scaler,
                "skipped_images": self.skipped, "groups": self.group_names, "config": self.cfg.to_dict(),
                "signature": self.signature, "bad_train_records": bad, "usable_items": usable}

    def save_last(self) -> None:
        """Write `last/`: the adapter plus the full trainer state (optimizer, schedule, counters, random states), the
        point a killed run resumes from. Every rank must call it (gathers); only the main process writes."""
        self._check_usable(trained=False)  # mid-run: the first batches may all have been bad; best/ demands more
        state = self._state()  # every rank joins the gathers: random states, sharded tensors, optimizer state
        weights = self.dist.gathered_state(self.acc, self.model, self.raw)
        optimizer = self.dist.optimizer_state(self.model, self.optimizer)
        if self.main:
            write_checkpoint(self.raw, self.out / "last", state, optimizer, state_dict=weights)
        self.acc.wait_for_everyone()

    def save_best(self, metrics: dict[str, Any]) -> None:
        """Publish `best/`: the adapter with `metrics` in its card and no trainer state; refused (ImageLoadError)
        when too few training images were usable. Every rank must call it; only the main process writes."""
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
        rank, world = self.acc.process_index, self.acc.num_processes
        self.precision.load_state_dict(state.get("scaler"))
        self.step, self.epoch = state["step"], state["epoch"]
        self.position = self.plan.rank_position(state["position"], state.get("world_size", len(state["rng"])), world,
                                                 folder)
        self.best, self.bad_epochs = state["best_metric"], state["bad_epochs"]
        self.skipped = list(state.get("skipped_images", []))
        # random generators (reseeded at another world size) and this rank's share of the bookkeeping
        self.bad_train, self.usable_items = restore_rank_state(state, rank, world, self.cfg.seed)

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
        """Train to the end (epochs, max_steps or early stopping), writing `last/` and `best/` on the way.

        A resumed run continues from its checkpoint's position and random state; a fresh one seeds the global
        generators with ``train.seed``. Either way the caller's generators are given back when the run ends. Raises
        `TrainingDiverged` (with the result attached) when the loss, a gradient or a weight became non-finite, and
        `TrainingInterrupted` (likewise) when SIGTERM/SIGINT stopped it at the end of a step (see `stopping.py`).
        """
        self.stop = current()  # the signals train() handles (an inert state when run outside it)
        with preserved(), self.stop.safe_points():
            if self.resume_dir is not None:
                self.resume(self.resume_dir)
            else:
                seed_all(self.cfg.seed)
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        self._check_usable(trained=False)  # the feature cache has already tried every image
        logger = RunLog(self.out, self.acc, cfg)
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
        except TrainingInterrupted as exc:
            reason, failure = f"stopped by {signal_name(exc.signum)}", exc
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
        if failure is not None:  # diverged or interrupted: the result goes with the error
            failure.result = result
            raise failure
        return result

    def _loop(self, logger: RunLog, progress: Any) -> str:
        """Epochs from the current position to the end; returns why training stopped."""
        self._loss_sum, self._loss_count, self._t0 = 0.0, 0, time.perf_counter()  # the running train loss
        while self.epoch < self.cfg.epochs:
            batches = self._rank_batches(self.epoch)
            stopped = self._train_epoch(batches, logger, progress)
            if stopped is not None:
                return stopped
            self.epoch, self.position = self.epoch + 1, 0
            if self._end_epoch(len(batches), logger):
                return "early stopping"
            self._stop_point(logger, saved=True)  # _end_epoch wrote last/
        return "completed"

    def _train_epoch(self, batches: list[list[int]], logger: RunLog, progress: Any) -> str | None:
        """The rest of one epoch from `self.position`; "max_steps" when the run ends inside it."""
        cfg = self.cfg
        micro = 0
        window: list[str] = []  # record ids of the micro-batches of the current optimizer step
        self.train_sampler.set(batches, self.position)
        for index, batch in enumerate(self.train_loader, start=self.position):
            sync = (micro + 1) % self.grad_accum == 0 or index == len(batches) - 1
            window.extend(batch["ids"])
            self._micro_step(batch, index, sync, logger)
            micro += 1
            self.position = index + 1
            if not sync:
                continue
            grad_norm = self._optimizer_step(window, index, logger)
            window, micro = [], 0
            if progress is not None:
                progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log_train(grad_norm, logger, progress)
            if cfg.max_steps and self.step >= cfg.max_steps:
                self.save_last()
                return "max_steps"
            saved = bool(cfg.save_every_steps) and self.step % cfg.save_every_steps == 0
            if saved:
                self.save_last()
            self._stop_point(logger, saved)
        return None

    def _micro_step(self, batch: dict[str, Any], index: int, sync: bool, logger: RunLog) -> None:
        """Forward and backward of one micro-batch; a non-finite loss on any rank stops the run before any step."""
        acc = self.acc
        inputs = self._check(batch, train=True)
        with self.precision.autocast():
            loss = self.model(**inputs).loss if inputs is not None else None
        bad = torch.tensor([0.0 if loss is None or torch.isfinite(loss.detach()) else 1.0], device=acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise self._diverged(logger, "loss", batch["ids"], index)
        if loss is None:  # every image of this batch was bad: keep ranks in step with a zero loss
            loss = sum(p.sum() * 0.0 for p in self.raw.parameters() if p.requires_grad)
        else:
            self._loss_sum, self._loss_count = self._loss_sum + float(loss.detach()), self._loss_count + 1
            self.usable_items += len(batch["ids"])
        with self.dist.no_sync(acc, self.model, sync):
            self.dist.backward(acc, self.precision.scale(loss), self.grad_accum)

    def _optimizer_step(self, window: list[str], index: int, logger: RunLog) -> float | None:
        """Clip, step and check the weights; returns the gradient norm (None when not clipped)."""
        cfg = self.cfg
        grad_norm = None
        if cfg.max_grad_norm is not None:
            self.precision.unscale(self.optimizer)
            grad_norm = self.dist.clip_grad_norm(self.acc, [p for g in self.optimizer.param_groups
                                                            for p in g["params"]], cfg.max_grad_norm)
            if grad_norm is not None and not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":
                raise self._diverged(logger, "gradient", window, index)
        stepped = self.precision.step(self.optimizer)
        if not self._all_finite():  # overflow in the update itself: never save these weights
            raise self._diverged(logger, "weights", window, index)
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def _log_train(self, grad_norm: float | None, logger: RunLog, progress: Any) -> None:
        """One "train" row: the mean loss since the last row, learning rates, time and skipped images."""
        row = {"kind": "train", "step": self.step, "epoch": self.epoch,
               "loss": self._loss_sum / max(1, self._loss_count), "grad_norm": grad_norm,
               "seconds": round(time.perf_counter() - self._t0, 3), "skipped_images": len(self.skipped),
               **{f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}}
        self.history.append(row)
        logger(row)
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.4f}")
        self._loss_sum, self._loss_count = 0.0, 0

    def _end_epoch(self, n_batches: int, logger: RunLog) -> bool:
        """Evaluate (when asked), publish an improvement as `best/`, write `last/`; True when patience ran out."""
        cfg = self.cfg
        if not (cfg.eval_every_epoch and self.eval_records):
            self.save_last()
            return False
        metrics = self.evaluate()
        value = metrics[cfg.metric]
        if cfg.metric == "loss" and metrics["count"] and not math.isfinite(value):
            raise self._diverged(logger, "evaluation loss", [], n_batches)  # before saving these weights
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
        return cfg.patience is not None and self.bad_epochs >= cfg.patience


def train(model: MedVQAAdapter, train_records: Sequence[VQARecord], eval_records: Sequence[VQARecord] | None,
          cfg: TrainConfig) -> TrainResult:
    """Train `model` in place; checkpoints go to cfg.output_dir/{last,best}. See TrainConfig for the knobs.

    The output folder is locked for the call (by the main process of a multi-process launch). Raises
    `TrainingDiverged` on a non-finite loss, `ImageLoadError` when too few training images are usable,
    `CheckpointError` when a resume would be unsafe, and `TrainingInterrupted` when SIGTERM or Ctrl-C stopped the run
    (see `stopping.py`). The caller's random generators and signal handlers are left as they were.
    """
    check_output_dir(cfg.output_dir)
    with stop_signals(), run_lock(cfg.output_dir):
        return Trainer(model, train_records, eval_records, cfg).run()
