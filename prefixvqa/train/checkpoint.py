"""What makes a training run's output folder safe to resume: one writer at a time, complete checkpoints, same recipe.

* **Lock.** A run holds ``output_dir/prefixvqa.lock`` (an exclusive ``flock`` plus the holder's pid, host and start
  time as JSON) for its whole life. A second run into the folder refuses, naming the holder. The kernel drops the
  ``flock`` when its process dies, so a lock file left by a killed run on this host is detected as stale and taken
  over; a lock naming another host is never taken over silently (that host's run may be alive on a shared disk).
* **Complete checkpoints.** A checkpoint folder carries the sha256 manifest of all its files (adapter and
  ``trainer_state/``); a kill between the two renames of a swap leaves ``.last.old-*`` / ``.last.tmp-*``, from which
  :func:`recover_checkpoint` puts back the newest complete one (``fileio.recover_dir``).
* **Same recipe.** A checkpoint records a signature of everything that changes the result (the training settings,
  the model config, the base models and the data); resuming with a different one is refused with the differences
  listed, unless ``train.resume_with_changes`` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PrefixVQAError
from ..fileio import MANIFEST_NAME, IntegrityError, recover_dir, verify_manifest

if TYPE_CHECKING:
    from ..data.records import VQARecord
    from ..model import MedVQAAdapter
    from .trainer import TrainConfig

__all__ = ["LOCK_NAME", "RunLockedError", "CheckpointError", "output_lock", "run_lock", "checkpoint_problem",
           "recover_checkpoint", "run_signature", "signature_differences", "check_same_recipe"]

log = logging.getLogger(__name__)

LOCK_NAME = "prefixvqa.lock"
STATE_DIR = "trainer_state"
STATE_FILE = f"{STATE_DIR}/state.json"
# TrainConfig fields that never change the trained weights: how a run reports, where it writes, how fast it reads
NON_RESULT_FIELDS = frozenset({"output_dir", "resume", "resume_with_changes", "progress", "tensorboard", "plot",
                               "log_every", "num_workers", "save_every_steps", "feature_cache", "eval_batch_size"})


class RunLockedError(PrefixVQAError, RuntimeError):
    """Another training run holds the output folder."""


class CheckpointError(PrefixVQAError, ValueError):
    """A checkpoint cannot be resumed from: incomplete, damaged, or written by a different recipe."""


# ----------------------------------------------------------------------------------------------------------- lock
_HELD: dict[Path, list[int]] = {}  # lock path -> [file descriptor, nesting depth] of locks this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "holder unknown"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started', '?')}"


def _acquire(path: Path) -> int:
    """An fd holding an exclusive flock on ``path`` with this process's description written into it."""
    import fcntl

    host = socket.gethostname()
    for _ in range(20):  # retried only when a releasing run unlinked the file between our open and flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunLockedError(f"{path.parent} is in use by another training run ({_describe(_read_owner(path))}):"
                                 f" wait for it to finish or choose another output_dir") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:
            os.close(fd)
            continue
        owner = _read_owner(path)
        if owner.get("host") not in (None, host):
            os.close(fd)
            raise RunLockedError(f"{path} names a run on another host ({_describe(owner)}); if no run is using "
                                 f"{path.parent}, delete the lock file")
        if owner:
            log.warning("taking over the stale lock %s of %s (that process is no longer running)", path,
                        _describe(owner))
        record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return fd
    raise RunLockedError(f"{path}: could not take the lock (it kept being replaced)")


def _acquire_without_flock(path: Path) -> int:
    """Platforms without fcntl: an exclusively created file; a same-host holder whose pid is gone is stale."""
    host = socket.gethostname()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner.get("host") == host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
                log.warning("removing the stale lock %s of %s", path, _describe(owner))
                path.unlink(missing_ok=True)
                continue
            raise RunLockedError(f"{path.parent} is in use by another training run ({_describe(owner)}); if no run "
                                 f"is using it, delete {path}") from None
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": host,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode())
        return fd
    raise RunLockedError(f"{path}: could not take the lock")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s run lock for the block (re-entrant within one process: a recipe and its stages nest)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield path
        finally:
            _HELD[path][1] -= 1
        return
    try:
        import fcntl  # noqa: F401
        fd = _acquire(path)
    except ImportError:
        fd = _acquire_without_flock(path)
    _HELD[path] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the flock: a waiting opener sees a new inode and retries
        os.close(fd)


def run_lock(folder: str | os.PathLike) -> contextlib.AbstractContextManager:
    """:func:`output_lock` in the main process of a (torchrun/accelerate) launch, nothing in the others: the ranks
    of one run share its folder."""
    return output_lock(folder) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- completeness
def checkpoint_problem(folder: Path, trainer_state: bool = True) -> str | None:
    """Why ``folder`` is not a usable checkpoint (None if it is): a missing state, a damaged or missing file."""
    folder = Path(folder)
    if trainer_state and not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    if (folder / MANIFEST_NAME).is_file():
        try:
            listed = verify_manifest(folder)
        except IntegrityError as exc:
            return str(exc)
        if trainer_state and STATE_FILE not in listed:  # killed before the manifest covered the trainer state
            return f"{MANIFEST_NAME} does not list {STATE_FILE}: the checkpoint was not finished"
    elif trainer_state:  # written before checkpoints carried manifests: check what can be checked
        log.warning("%s has no %s: its files cannot be checked for damage", folder, MANIFEST_NAME)
    if trainer_state:
        try:
            json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            return f"{folder / STATE_FILE} is damaged: {exc}"
    return None


def recover_checkpoint(folder: Path, trainer_state: bool = True) -> Path | None:
    """Make ``folder`` the newest complete checkpoint an interrupted swap left (see ``fileio.recover_dir``)."""
    def step(candidate: Path) -> int:
        return int(json.loads((candidate / STATE_FILE).read_text()).get("step", 0))

    try:
        # a leftover counts only with a verifying manifest: a half-written best/ has none yet
        return recover_dir(folder, lambda c: (c / MANIFEST_NAME).is_file() and checkpoint_problem(c, trainer_state)
                           is None, newer=step if trainer_state else None)
    except IntegrityError as exc:
        raise CheckpointError(f"cannot resume: {exc}; move them away to start afresh") from None


# ------------------------------------------------------------------------------------------------------ signature
def run_signature(cfg: TrainConfig, model: MedVQAAdapter, train_records: Sequence[VQARecord],
                  eval_records: Sequence[VQARecord]) -> dict[str, Any]:
    """Everything a checkpoint's weights depend on, as JSON data, for comparing a resumed run with its checkpoint."""
    from ..data.records import content_hash
    from .trainer import DEFAULT_LR

    settings = {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_FIELDS}
    settings["lr"] = {group: cfg.group_lr(group) for group in DEFAULT_LR}  # defaults spelled out: same if omitted
    model_cfg = {k: v for k, v in model.config.to_dict().items()
                 if k not in ("fingerprints", "version", "name", "description")}
    return {"train": settings, "model": model_cfg, "base_models": dict(model.base_fingerprints),
            "data": {name: {"records": len(recs), "sha256": content_hash(recs)}
                     for name, recs in (("train", train_records), ("eval", eval_records))}}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every leaf that differs (sections a checkpoint did not record are skipped)."""
    a, b = _flat({k: v for k, v in saved.items() if k in current}), _flat({k: v for k, v in current.items()
                                                                             if k in saved})
    missing = object()
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}" for key in sorted(set(a) | set(b))
            if a.get(key, missing) != b.get(key, missing)]


def check_same_recipe(folder: Path, saved: dict[str, Any] | None, current: dict[str, Any], allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) a resume whose result-changing settings differ from the checkpoint."""
    if not saved:
        log.warning("%s records no run signature (written by an older prefixvqa): the recipe cannot be compared",
                    folder)
        return
    diffs = signature_differences(saved, current)
    if not diffs:
        return
    shown = "; ".join(diffs[:12]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 12 else "")
    if allow:
        log.warning("resuming %s with changed settings (train.resume_with_changes): %s", folder, shown)
        return
    raise CheckpointError(f"resume from {folder}: the run's settings differ from the checkpoint's: {shown}. "
                          f"Resume with the original recipe, pass --resume-with-changes (train.resume_with_changes="
                          f"true) to continue with the new settings, or choose another output_dir")
