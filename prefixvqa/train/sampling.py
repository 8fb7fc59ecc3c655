"""Which records each rank trains on, per optimizer step, defined so that a run can resume at another world size.

Why a module of its own: the order of the data and the size of the global batch are what make a resumed run equal to
an uninterrupted one. Both are pure functions of the records, the seed, the epoch and a :class:`BatchPlan`, never of
random state, so they can be recomputed after a preemption on a different number of processes.

* The unit is the micro-batch of ``train.batch_size`` records (:func:`epoch_batches`): the loss of a micro-batch is
  its mean, so micro-batches are never split or merged (that would re-weight records).
* A global batch (one optimizer step) is a run of ``G = world_size x grad_accum`` consecutive micro-batches of the
  epoch, where world size and accumulation are those of the run that *started* training (the plan's layout,
  recorded in every checkpoint as ``layout``). The last step of an epoch may hold fewer.
* At world size ``W`` each rank takes every ``W``-th micro-batch of each global batch and accumulates ``G / W`` of
  them, dividing each micro-batch's loss by ``G / W``; the all-reduce averages over ranks, so every step's gradient
  is the mean over the same ``G`` micro-batch losses at any world size (up to float summation order). At the
  layout's own size this is exactly the historical ``batches[rank::world]`` split.
* A world size that cannot share each global batch evenly (``G``, or the epoch's last partial step, not divisible by
  it) is refused with the sizes that would work.
* Random streams: each rank's generators are saved. At the same world size each rank gets its own back (exact). At
  another size they cannot be mapped (the micro-batches move between ranks), so every rank reseeds from
  (seed, step, rank): dropout masks and other draws from the global generators then differ from an uninterrupted
  run at either size; the data order and global batches do not depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ConfigError

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from .config import TrainConfig

__all__ = ["epoch_batches", "BatchPlan", "restore_rank_state"]


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


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of a run: ``records`` records in micro-batches of ``batch_size``, grouped into optimizer
    steps as a run of ``world`` processes accumulating ``accum`` micro-batches each groups them (the layout)."""

    records: int
    batch_size: int
    world: int
    accum: int

    @property
    def micro_batches(self) -> int:
        """Micro-batches :func:`epoch_batches` makes per epoch."""
        return math.ceil(self.records / self.batch_size)

    @property
    def per_rank(self) -> int:
        """Micro-batches each rank of the layout's run takes per epoch (the remainder that cannot be shared is
        dropped; fewer micro-batches than ranks are repeated)."""
        return max(1, self.micro_batches // self.world)

    @property
    def global_size(self) -> int:
        """Micro-batches in a full global batch (one optimizer step)."""
        return self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last one partial when the layout's accumulation does not divide)."""
        return math.ceil(self.per_rank / self.accum)

    @property
    def last_size(self) -> int:
        """Micro-batches of each epoch's last step."""
        return (self.per_rank - (self.steps_per_epoch - 1) * self.accum) * self.world

    def accum_at(self, world: int) -> int:
        """Micro-batches each of ``world`` ranks accumulates per full step (and divides its losses by)."""
        return self.global_size // world

    def problem(self, world: int) -> str | None:
        """Why ``world`` processes cannot train this plan's global batches exactly (None when they can)."""
        sizes = {self.global_size, self.last_size}
        if all(size % world == 0 for size in sizes):
            return None
        common = math.gcd(*sizes)
        fits = [w for w in range(1, common + 1) if common % w == 0]
        shown = (f"{self.global_size} micro-batches of {self.batch_size} records per optimizer step "
                 f"({self.world} process(es) x grad_accum {self.accum})")
        if self.last_size != self.global_size:
            shown += f", {self.last_size} in each epoch's last step"
        return (f"the run's global batch ({shown}) cannot be shared evenly by {world} processes without splitting a "
                f"micro-batch; resume with {fits} process(es)")

    def rank_batches(self, batches: list[list[int]], world: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch, in order: its share of each global batch in turn."""
        w0 = self.world
        if len(batches) >= w0:
            batches = batches[:max(w0, len(batches) // w0 * w0)]
        else:
            batches = batches * w0
        batches = batches[:self.per_rank * w0]
        step = self.global_size
        return [b for s in range(0, len(batches), step) for b in batches[s:s + step][rank::world]]

    def rank_position(self, position: int, saved_world: int, world: int, folder: Path | str) -> int:
        """A checkpoint's per-rank position in its epoch (micro-batches done by each of ``saved_world`` ranks) as
        the position of each of ``world`` ranks; checkpoints are written at step boundaries."""
        if saved_world == world:
            return position
        old, new = self.accum_at(saved_world), self.accum_at(world)
        full = self.steps_per_epoch - (self.last_size != self.global_size)  # steps of G micro-batches per epoch
        steps, rest = divmod(position, old)
        if steps > full or (steps == full and rest not in (0, self.last_size // saved_world)) or \
                (steps < full and rest):
            raise ConfigError(f"resume from {folder}: position {position} is not at the end of an optimizer step "
                              f"({old} micro-batches per rank and step); resume with {saved_world} process(es)")
        return steps * new + (self.last_size // world if rest else 0)

    def to_json(self) -> dict[str, int]:
        """What a checkpoint records (``layout``), so every later resume keeps these global batches."""
        return {"world_size": self.world, "grad_accum": self.accum}

    @classmethod
    def for_run(cls, cfg: TrainConfig, records: int, world: int, state: dict[str, Any] | None,
                folder: Path | str | None) -> BatchPlan:
        """A fresh run's plan (its own world size and accumulation), or a resumed run's: the checkpoint's layout
        (older checkpoints: their world size and accumulation). A world size that cannot train it exactly, or a
        changed ``train.grad_accum`` together with another world size, is refused (ConfigError, one line)."""
        if state is None:
            return cls(records, cfg.batch_size, world, cfg.grad_accum)
        saved_world = int(state.get("world_size", len(state.get("rng", [])) or 1))
        layout = state.get("layout") or {  # older checkpoints: their own size and accumulation
            "world_size": saved_world,
            "grad_accum": (state.get("signature") or {}).get("train", {}).get("grad_accum", cfg.grad_accum)}
        saved_accum = int(layout["grad_accum"])  # the saving run's train.grad_accum (a layout changes with it only)
        plan = cls(records, cfg.batch_size, int(layout["world_size"]), saved_accum)
        if cfg.grad_accum != saved_accum:  # train.resume_with_changes: a new global batch from here on
            if plan.world == saved_world == world:
                return cls(records, cfg.batch_size, world, cfg.grad_accum)
            raise ConfigError(f"resume from {folder}: train.grad_accum changed ({saved_accum} -> {cfg.grad_accum}) "
                              f"while the world size changes ({saved_world} -> {world} processes); change one at a "
                              "time: resume with the original grad_accum")
        problem = plan.problem(world) if world != plan.world else None
        if problem:
            raise ConfigError(f"resume from {folder} with {world} process(es): {problem}")
        return plan


def restore_rank_state(state: dict[str, Any], rank: int, world: int, seed: int) -> tuple[set[str], int]:
    """Put back this rank's random generators and return its share of the bookkeeping (ids of training records with
    a bad image, items used so far). At the checkpoint's world size each rank gets its own; at another size the
    generators are reseeded from (seed, step, rank) and rank 0 takes all of the bookkeeping (its sums are what
    counts)."""
    from ..rng import seed_all, set_rng_state

    bad, usable = state.get("bad_train_records", []), state.get("usable_items", 0)
    per_rank = bool(bad) and isinstance(bad[0], list)  # older checkpoints: one list
    saved = state["rng"]
    if len(saved) == world:
        set_rng_state(saved[rank])
        return (set(bad[rank] if per_rank else bad),
                int(usable[rank] if isinstance(usable, list) else usable))
    seed_all(int(np.random.SeedSequence([seed, int(state["step"]), rank]).generate_state(1)[0]))
    if rank:
        return set(), 0
    return ({i for part in bad for i in part} if per_rank else set(bad),
            int(sum(usable) if isinstance(usable, list) else usable))
