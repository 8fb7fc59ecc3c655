"""Stopping a training run on SIGTERM or Ctrl-C at a safe point, with the output folder left resumable.

A cluster scheduler (Slurm, Kubernetes) and ``docker stop`` send SIGTERM and wait a grace period before SIGKILL;
Ctrl-C sends SIGINT. While a run holds its output folder (:func:`stop_signals`, entered by ``train()`` and
``run_recipe()``), the first such signal does not kill the process:

* inside the training loop it only sets a flag, read at the end of every optimizer step (and epoch), where all ranks
  of a multi-process run agree on it (one tiny gather). The run stops there: ``last/`` keeps the last checkpoint (or,
  with ``train.save_on_signal``, the stopped step is saved), the lock is released, and :class:`TrainingInterrupted`
  names the step and the checkpoint to resume from;
* outside the loop (reading data, building the model, between curriculum stages), and at a second signal (more
  than ``SAME_REQUEST_S`` after the first: a launcher passing on the terminal's Ctrl-C repeats it), the run
  stops at once with :class:`SignalInterrupt`, a ``KeyboardInterrupt`` (so ``except Exception`` on the way cannot
  swallow it); the lock is released on the way out.

Only handlers still at their defaults are replaced (a caller's own SIGTERM handler keeps working), and the previous
ones are put back when the outermost run ends; processes forked during the run (DataLoader workers) ignore the
signals and are stopped by their parent. A signal that arrives as the run finishes is raised after it finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import PrefixVQAError

__all__ = ["SIGNALS", "TrainingInterrupted", "SignalInterrupt", "StopState", "stop_signals", "current",
           "signal_name", "agreed_signal"]

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what schedulers, `docker stop` and Ctrl-C send
_DEFAULTS = (signal.SIG_DFL, signal.default_int_handler)
# a repeat this soon after the first signal is the same request delivered twice (Ctrl-C reaches torchrun and its ranks
# through the terminal, and torchrun passes it on; Slurm signals every process of a step), not "stop at once"
SAME_REQUEST_S = 2.0


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15: what messages call a signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(PrefixVQAError, RuntimeError):
    """A signal stopped the run at the end of an optimizer step; the message names the step and the checkpoint kept.

    ``signum`` is the signal (a command exits with 128 + signum, as a process killed by it would); ``result`` is the
    run's TrainResult (its ``last_dir`` is the checkpoint to resume from, or None)."""

    def __init__(self, message: str, signum: int, result: Any = None):
        super().__init__(message)
        self.signum, self.result = signum, result


class SignalInterrupt(KeyboardInterrupt):
    """A signal stopped the run at once (outside the loop's safe points, or a second signal): a KeyboardInterrupt,
    as Ctrl-C's own, so no ``except Exception`` on the way swallows it; ``signum`` as in TrainingInterrupted."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopState:
    """The signal a run was asked to stop by (``signum``, None while none came) and whether a loop is checking it.

    The training loop enters :meth:`safe_points` for its lifetime and reads ``signum`` at the end of each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = 0  # signals this process got (a rank may stop on another rank's signal before its own)
        self.deferring = 0  # > 0 while a training loop checks `signum` at its safe points
        self.stopping = False  # the loop decided to stop: a late first signal changes nothing
        self.first_at = 0.0  # time.monotonic() of the first signal
        self.pid = os.getpid()  # a forked child (DataLoader worker) inherits the handler but not the decision

    def handle(self, signum: int, frame: Any) -> None:
        """The installed handler: defer the first signal to the loop's next safe point, else stop at once."""
        if os.getpid() != self.pid:
            return
        now = time.monotonic()
        if self.received and now - self.first_at < SAME_REQUEST_S:
            return
        self.received += 1
        first = self.received == 1
        if first:
            self.first_at = now
        if self.signum is None:
            self.signum = signum
        if first and self.stopping:
            return
        if first and self.deferring:
            log.warning("%s received: stopping at the end of this optimizer step (send it again to stop at once)",
                        signal_name(signum))
            return
        why = "outside a training step" if first else "a second time, before the step ended"
        raise SignalInterrupt(f"stopped by {signal_name(signum)} ({why}); checkpoints already written are kept "
                              f"(resume with train.resume=true)", signum)

    @contextlib.contextmanager
    def safe_points(self) -> Iterator[StopState]:
        """The block in which a signal waits for the next safe point; one that came before it stops the run now."""
        if self.signum is not None:
            raise SignalInterrupt(f"stopped by {signal_name(self.signum)} before training (re)started", self.signum)
        self.deferring += 1
        try:
            yield self
        finally:
            self.deferring -= 1


_ACTIVE: StopState | None = None


def agreed_signal(state: StopState, acc: Any) -> int:
    """The signal any rank of the run received (0: none), the same on every rank: one gather of one number per step,
    so all ranks stop at the same safe point. Every rank must call it at the same points."""
    import torch

    flag = torch.tensor([state.signum or 0], device=acc.device)
    return int((acc.gather(flag) if acc.num_processes > 1 else flag).max())


def current() -> StopState:
    """The running :func:`stop_signals` block's state, or an inert one (no handler: the flag is never set)."""
    return _ACTIVE if _ACTIVE is not None else StopState()


@contextlib.contextmanager
def stop_signals() -> Iterator[StopState]:
    """Handle SIGTERM and SIGINT as described in the module doc for the block (re-entrant: a recipe's stages nest).

    In a thread other than the main one (where Python cannot install handlers) the block runs without them."""
    global _ACTIVE
    if _ACTIVE is not None or threading.current_thread() is not threading.main_thread():
        yield current()
        return
    state = _ACTIVE = StopState()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous = {s: old for s, old in previous.items() if old in _DEFAULTS}  # a caller's own handler stays
    for s in previous:
        signal.signal(s, state.handle)
    try:
        yield state
        pending = state.signum  # reached only without an exception: a signal that came as the run finished
    finally:
        _ACTIVE = None
        for s, old in previous.items():
            signal.signal(s, old)
    if pending is not None:
        raise SignalInterrupt(f"stopped by {signal_name(pending)} as the run finished (its checkpoints are complete)",
                              pending)
