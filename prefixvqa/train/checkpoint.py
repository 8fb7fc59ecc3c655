"""A training run's output folder: one writer at a time, complete checkpoints, the trainer state they hold, same recipe.

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
* **Trainer state.** ``trainer_state/`` holds the optimizer's tensors as safetensors and everything else (counters,
  scheduler, random states, the signature) as JSON (no pickle): :func:`write_checkpoint`, :func:`read_trainer_state`.
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

from ..errors import ConfigError, PrefixVQAError
from ..fileio import MANIFEST_NAME, IntegrityError, recover_dir, verify_manifest
from .config import DEFAULT_LR, TrainConfig

if TYPE_CHECKING:
    import torch

    from ..data.records import VQARecord
    from ..model import MedVQAAdapter

__all__ = ["LOCK_NAME", "STATE_DIR", "RUN_ENTRIES", "RunLockedError", "CheckpointError", "output_lock", "run_lock",
           "check_output_dir",
           "checkpoint_problem", "recover_checkpoint", "recover_output", "resume_folder", "run_signature",
           "signature_differences", "check_same_recipe", "write_checkpoint", "read_trainer_state", "optimizer_tensors",
           "optimizer_from_tensors", "scheduler_json", "describe_last"]

log = logging.getLogger(__name__)

LOCK_NAME = "prefixvqa.lock"
STATE_DIR = "trainer_state"
STATE_FILE = f"{STATE_DIR}/state.json"
# TrainConfig fields that never change the trained weights: how a run reports, where it writes, how fast it reads
NON_RESULT_FIELDS = frozenset({"output_dir", "resume", "resume_with_changes", "progress", "tensorboard", "plot",
                               "log_every", "num_workers", "save_every_steps", "feature_cache", "eval_batch_size",
                               "save_on_signal",
                               "packing", "packing_length"})  # packing lays out the same records with the same loss


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


#: What a training run writes into its output folder by name: checkpoints, the log, the loss plot, TensorBoard/W&B
#: logs and a recipe's tiny test decoder. Anything else in the folder (a recipe, data) is never touched.
RUN_ENTRIES = ("last", "best", "log.jsonl", "loss.png", "tb", "wandb", "_tiny")


def _run_wrote(entry: Path) -> bool:
    """Whether ``entry`` (named as in `RUN_ENTRIES`) is what an earlier run wrote: a checkpoint folder (manifest or
    trainer state), a log whose first row is a run's, a loss plot beside such a log or checkpoint, a tracker folder."""
    if entry.is_symlink():
        return False
    if entry.name in ("last", "best"):
        return entry.is_dir() and ((entry / MANIFEST_NAME).is_file() or (entry / STATE_DIR).is_dir())
    if entry.name == "log.jsonl":
        try:
            with entry.open("rb") as fh:
                first = fh.readline(1 << 16)
            return not first.strip() or "kind" in json.loads(first)
        except (OSError, ValueError, TypeError):
            return False
    if entry.name == "loss.png":
        return entry.is_file() and any(_run_wrote(entry.parent / n) for n in ("log.jsonl", "last", "best")
                                       if (entry.parent / n).exists())
    return entry.is_dir()  # tb/, wandb/, _tiny/


def check_output_dir(folder: str | os.PathLike) -> None:
    """Refuse, before anything trains, an output folder where a file or folder of a name the run writes
    (`RUN_ENTRIES`) is not an earlier run's: the run would replace a user's ``log.jsonl``, ``loss.png``, ``last/``
    or ``best/`` by name. Other files (a recipe kept beside its runs) are left alone. One line naming the path. Only
    the main process of a launch checks (the others share its folder)."""
    from ..fileio import OverwriteRefused

    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0 or not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise OverwriteRefused(f"train.output_dir {folder} exists and is not a folder; nothing was written")
    for name in RUN_ENTRIES:
        entry = folder / name
        if (entry.exists() or entry.is_symlink()) and not _run_wrote(entry):
            raise OverwriteRefused(f"{entry} is not a file of an earlier training run, and a run writes {name} "
                                   f"into its output folder; nothing was written: give another train.output_dir, or "
                                   f"move {name} away first")


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


def describe_last(out: Path, found: str, missing: str) -> str:
    """``found`` formatted with a run's complete ``last/`` checkpoint and its step, or ``missing`` when there is none:
    what a stopped or failed run's message says the user can resume from."""
    last = Path(out) / "last"
    if checkpoint_problem(last) is not None:
        return missing
    return found.format(last, json.loads((last / STATE_FILE).read_text())["step"])


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


def _resumes_automatically(resume: bool | str) -> bool:
    return resume is True or resume == "auto"


def recover_output(out: Path, resume: bool | str) -> None:
    """Put back what an interrupted checkpoint swap left in a run's output folder and delete leftovers, before the
    checkpoint to resume from is chosen (the main process, holding the lock). Leftovers that cannot be recovered
    stop a resuming run and are kept, with a warning, by a fresh one."""
    out.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(out / "best", trainer_state=False)
    try:
        recover_checkpoint(out / "last")
    except CheckpointError:
        if _resumes_automatically(resume):
            raise
        log.warning("%s: leftovers of an interrupted checkpoint swap are kept (train.resume is false)", out)


def resume_folder(out: Path, resume: bool | str, warn: bool = True) -> Path | None:
    """The checkpoint a run with ``train.resume=resume`` continues from (None: a fresh start); never a silent fresh
    start while a checkpoint exists that cannot be used. ``warn``: log the fresh-start warnings (main process)."""
    last = out / "last"
    if not resume:
        if warn and (last.exists() or (out / "best").exists()):
            log.warning("%s holds checkpoints of an earlier run; train.resume is false, so this run starts "
                        "afresh and replaces them", out)
        return None
    auto = _resumes_automatically(resume)
    folder = last if auto else Path(resume)
    if not folder.is_dir():
        if not auto:
            raise ConfigError(f"train.resume={resume!r}: no such checkpoint folder")
        if (out / "best").is_dir():
            log.warning("%s has no last/ checkpoint (best/ holds no trainer state): starting afresh", out)
        return None
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"train.resume: {folder} cannot be resumed: {problem}. Move it away to start afresh "
                              f"or set train.resume=false")
    return folder


# ------------------------------------------------------------------------------------------------------ signature
def run_signature(cfg: TrainConfig, model: MedVQAAdapter, train_records: Sequence[VQARecord],
                  eval_records: Sequence[VQARecord]) -> dict[str, Any]:
    """Everything a checkpoint's weights depend on, as JSON data, for comparing a resumed run with its checkpoint."""
    from ..data.records import content_hash

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


# ---------------------------------------------------------------------------------------------------- trainer state
def optimizer_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into flat tensors (safetensors) and the JSON rest."""
    import torch

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
    """The `optimizer.state_dict()` that :func:`optimizer_tensors` split (parameter keys as they were: indices, or
    names for torch.distributed.checkpoint's full state dicts)."""
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in tensors.items():  # "state.<index or parameter name>.<state name>"
        idx, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    for idx, values in rest["scalars"].items():
        state.setdefault(int(idx) if idx.isdigit() else idx, {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def scheduler_json(state: dict[str, Any]) -> dict[str, Any]:
    """A learning-rate scheduler's state_dict without its functions (JSON data; the run rebuilds them)."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def write_checkpoint(model: MedVQAAdapter, folder: Path, trainer_state: dict[str, Any] | None,
                     optimizer_state: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Adapter (+ trainer_state/) into a temporary sibling, then renamed over `folder`: all or nothing. The manifest
    is rewritten last to cover trainer_state/ too, so a complete checkpoint is one whose manifest verifies.
    `state_dict`: the full tensors a sharded run gathered (else the model's live tensors are written)."""
    from ..adapter_io import write_adapter_files
    from ..fileio import atomic_dir, save_safetensors, write_manifest

    with atomic_dir(folder) as tmp:
        write_adapter_files(model, tmp, card, state_dict)
        if trainer_state is not None:
            state_dir = tmp / STATE_DIR
            state_dir.mkdir()
            rest: dict[str, Any] = {}
            if optimizer_state is not None:
                tensors, rest = optimizer_tensors(optimizer_state)
                save_safetensors(tensors, state_dir / "optimizer.safetensors")  # a full disk: one line naming it
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
