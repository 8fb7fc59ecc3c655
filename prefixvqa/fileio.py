"""Small file helpers shared by the whole package: all-or-nothing writes, and files shipped inside installed packages.

Why one module: adapters, checkpoints, the feature cache, the GGUF copy and evaluation results are all read back by
other processes (or after a crash), so each must appear complete or not at all; and several optional packages ship
data files (presets, DICOM samples, model weights) that are found without importing the package. Only the standard
library is imported here (safetensors lazily, by :func:`save_safetensors`).

**Nothing of the user's is replaced.** A folder swap (:func:`atomic_dir`, :func:`replace_dir`) replaces an existing
folder only when a proof says prefixvqa wrote it: by default :func:`written_by_prefixvqa` (empty, or its sha256
manifest lists every file in it); a caller with another marker passes its own proof, and ``overwrite=True`` only where
the user asked for the replacement. Anything else raises :class:`OverwriteRefused` naming the path and a file in it,
before anything is written. :func:`atomic_write` replaces files by name (its callers write inside folders they own);
a caller writing a file a user named checks it first with :func:`refuse_foreign`.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from .errors import PrefixVQAError

__all__ = ["atomic_write", "atomic_write_with", "atomic_dir", "replace_dir", "recover_dir", "package_file",
           "MANIFEST_NAME", "IntegrityError", "sha256_file", "write_manifest", "verify_manifest", "OverwriteRefused",
           "Proof", "written_by_prefixvqa", "unlisted_files", "holds_only", "refuse_foreign", "save_safetensors",
           "safetensors_errors"]

MANIFEST_NAME = "manifest.sha256.json"

PathLike = str | os.PathLike
Proof = Callable[[Path], bool]  # does this existing path hold only what prefixvqa wrote (so it may be replaced)?
OWNED = "a folder prefixvqa saved"

# Called between the two renames of a folder swap (after the old folder moved aside, before the new one moved in).
# None in normal use; fault-injection tests set it to kill the process exactly there.
_between_renames: Callable[[Path, Path], Any] | None = None


class OverwriteRefused(PrefixVQAError, FileExistsError, ValueError):
    """A path the caller named holds something prefixvqa did not write (or is one of the command's inputs): nothing
    was written, so a mistyped ``--out`` never costs the user a file. The message is one line naming the path."""


def _temp_sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to ``path``: same folder (so os.replace is a rename), never a name readers look for."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _replace_with(path: PathLike, write: Callable[[Path], Any], suffix: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, suffix)
    try:
        write(tmp)
        with open(tmp, "r+b") as fh:  # the bytes must be on disk before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # on a read-only disk even removing the absent file fails (EROFS)
            tmp.unlink(missing_ok=True)
        raise _naming(exc, tmp, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def _naming(exc: OSError, tmp: Path, target: Path, note: str = "") -> OSError:
    """The same error naming what the caller asked to write, never the hidden temporary sibling ``tmp``: a file
    name inside ``tmp`` is shown inside ``target``, and an error naming no file (ENOSPC from ``write()``) names
    ``target``. An error naming another real path (a read-only parent) and prefixvqa's own errors pass unchanged."""
    if isinstance(exc, PrefixVQAError):
        return exc
    if exc.filename is None:
        return OSError(exc.errno, f"{exc.strerror or exc}{note}", str(target)) if exc.errno else \
            OSError(f"{exc}{note or f' (while writing {target})'}")
    try:
        inside = Path(os.path.abspath(os.fsdecode(exc.filename))).relative_to(os.path.abspath(tmp))
    except ValueError:
        return exc
    named = target / inside if inside.parts else target
    return OSError(exc.errno, f"{exc.strerror or exc}{note}", str(named))


def atomic_write(path: PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` (str is encoded) to ``path`` via a temporary sibling, fsync and ``os.replace``.

    Readers see the old file or the new one, never a half-written one, even if the process dies mid-write. An
    existing ``path`` is replaced: callers write inside folders they own; a path a user named is checked first
    (:func:`refuse_foreign`). A failure names ``path``, never the temporary file.
    """
    payload = data.encode(encoding) if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(payload)

    return _replace_with(path, write, "")


def atomic_write_with(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Like :func:`atomic_write`, for writers that want a file name (``np.save``, ``save_file``, ``fig.savefig``).

    ``write(tmp)`` must create ``tmp``; the temporary name keeps ``path``'s suffix, because such writers pick the
    format from it (or, like ``np.save``, append one). If ``write`` raises, nothing is left behind.
    """
    return _replace_with(path, write, Path(path).suffix)


# ---------------------------------------------------------------------------------------- replacing only our own
def unlisted_files(folder: PathLike) -> list[str]:
    """Files under ``folder`` (hidden ones included) that its sha256 manifest does not list: every file when it has
    no readable manifest. What replacing the folder would lose that prefixvqa did not write."""
    folder = Path(folder)
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() != MANIFEST_NAME)
    try:
        listed = set(json.loads((folder / MANIFEST_NAME).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return found
    return [name for name in found if name not in listed]


def written_by_prefixvqa(path: PathLike) -> bool:
    """The default proof that an existing folder may be replaced: it is empty, or its manifest lists every file in
    it (an adapter, checkpoint or export prefixvqa saved and nobody added to). A file or a link is never proven."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or
                                                        ((path / MANIFEST_NAME).is_file() and not unlisted_files(path)))


def holds_only(*patterns: str) -> Proof:
    """A proof for a folder prefixvqa fills with entries of known names (a feature cache, a sweep's results): an
    empty folder, or one whose every top-level entry matches one of the ``fnmatch`` patterns."""
    def proof(path: Path) -> bool:
        return path.is_dir() and not path.is_symlink() and all(
            any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns) for entry in path.iterdir())

    return proof


def _foreign_example(path: Path) -> str:
    if not path.is_dir() or path.is_symlink():
        return "it is not a folder" if path.is_file() or path.is_symlink() else ""
    listed = (path / MANIFEST_NAME).is_file()  # else only the top level: never walk a whole home folder
    names = (unlisted_files(path) if listed else []) or sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"it holds {shown}" if shown else ""


def refuse_foreign(path: PathLike, proof: Proof | bool = written_by_prefixvqa, what: str = OWNED, *,
                   file: bool = False) -> None:
    """Raise :class:`OverwriteRefused` (one line naming ``path``) unless ``path`` does not exist, ``proof`` is True,
    or ``proof(path)`` shows it holds only what prefixvqa wrote (``what`` says what that is, for the message; ``file``:
    the path names a file, so a file there is described by ``what`` alone).
    Writers of user-named paths call it before doing any work, so a refusal costs nothing."""
    path = Path(path)
    if proof is True or not (path.exists() or path.is_symlink()) or (callable(proof) and proof(path)):
        return
    example = "" if file and path.is_file() else _foreign_example(path)  # ``file``: a file is expected there
    raise OverwriteRefused(f"{path} exists and is not {what}{f' ({example})' if example else ''}; nothing was "
                           f"written: give a new path, or move it away first")


def replace_dir(src: PathLike, dst: PathLike, *, overwrite: Proof | bool = written_by_prefixvqa,
                what: str = OWNED) -> bool:
    """Move the finished folder ``src`` to ``dst``; an existing ``dst`` is swapped out only once ``src`` is complete,
    and only when ``overwrite(dst)`` proves prefixvqa wrote it (default :func:`written_by_prefixvqa`), or
    ``overwrite=True`` (the caller's explicit request). Otherwise :class:`OverwriteRefused` is raised, ``src`` is
    deleted and ``dst`` is untouched.

    With ``overwrite=False`` an existing ``dst`` wins (another process made an equivalent one first) and ``src`` is
    deleted. Returns whether ``src`` took the place.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        try:
            src.rename(dst)
            return True
        except OSError:
            if not dst.exists():  # a real failure, not a folder that appeared meanwhile
                raise
    if overwrite is False:  # lost a race, or it was there before: keep it
        shutil.rmtree(src, ignore_errors=True)
        return False
    try:
        refuse_foreign(dst, overwrite, what)
    except OverwriteRefused:
        shutil.rmtree(src, ignore_errors=True)
        raise
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    dst.rename(old)
    if _between_renames is not None:
        _between_renames(old, dst)
    try:
        src.rename(dst)
    except BaseException:
        old.rename(dst)  # put the previous folder back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def recover_dir(dst: PathLike, is_complete: Callable[[Path], bool],
                newer: Callable[[Path], Any] | None = None) -> Path | None:
    """After a crash, put back the newest complete version of ``dst`` and delete what interrupted swaps left.

    A process killed inside :func:`atomic_dir` / :func:`replace_dir` leaves hidden siblings: ``.NAME.tmp-*`` (the
    new folder, complete or half-written) and ``.NAME.old-*`` (the previous folder, moved aside between the two
    renames). When ``dst`` is missing, the first complete one (new before old, then newest first) takes its place;
    with ``newer`` (a sort key, e.g. a checkpoint's step) the complete candidate with the largest key wins, and also
    replaces an existing ``dst`` with a smaller one (killed after the new folder was complete, before its swap); an
    existing ``dst`` that is not complete is replaced by the best complete candidate.
    Afterwards every leftover is removed. If ``dst`` is missing and a previous folder exists but none passes
    ``is_complete``, :class:`IntegrityError` is raised and nothing is deleted (a damaged checkpoint is evidence, not
    garbage). Only call it while no other process writes ``dst`` (hold the run's lock). Returns ``dst`` if it exists.
    """
    dst = Path(dst)
    pattern = glob.escape(str(dst.parent / f".{dst.name}"))

    def newest_first(kind: str) -> list[Path]:
        found = [Path(p) for p in glob.glob(f"{pattern}.{kind}-*") if Path(p).is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    tmps, olds = newest_first("tmp"), newest_first("old")
    complete = [c for c in (*tmps, *olds) if is_complete(c)]
    if newer is not None:
        complete.sort(key=newer, reverse=True)  # stable: ties keep new-before-old order
    if not dst.exists():
        if not complete and olds:
            raise IntegrityError(f"{dst} is missing and the earlier version(s) left by an interrupted swap "
                                 f"({', '.join(p.name for p in olds)}) are incomplete or damaged")
        if complete:
            complete[0].rename(dst)
    elif complete and (not is_complete(dst) or (newer is not None and newer(complete[0]) > newer(dst))):
        replace_dir(complete[0], dst, overwrite=True)  # a damaged dst never wins over a complete leftover
    for leftover in (*tmps, *olds):
        shutil.rmtree(leftover, ignore_errors=True)
    return dst if dst.exists() else None


@contextlib.contextmanager
def atomic_dir(target: PathLike, *, overwrite: Proof | bool = written_by_prefixvqa, what: str = OWNED
               ) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``target``; on success it is renamed to ``target``.

    If the block raises, the temporary folder is removed and ``target`` is untouched; an existing ``target`` is
    replaced only after the new folder is complete, and only when ``overwrite`` proves prefixvqa wrote it (default:
    its manifest lists every file in it) or is True (the user asked); else :class:`OverwriteRefused` is raised before
    the block runs (and again at the swap, should the folder have changed meanwhile). ``overwrite=False`` keeps an
    existing ``target`` (see :func:`replace_dir`). An OSError (a full disk) names ``target``, never the temporary
    folder, and says that ``target`` was left as it was.
    """
    target = Path(target)
    if overwrite is not False:
        refuse_foreign(target, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:  # names the random temporary folder: name the target instead
        raise OSError(exc.errno, exc.strerror, str(target)) if exc.errno else exc from None
    try:
        yield tmp
        replace_dir(tmp, target, overwrite=overwrite, what=what)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(exc, tmp, target, f" while saving {target} (left as it was)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ safetensors
@contextlib.contextmanager
def safetensors_errors(path: PathLike) -> Iterator[None]:
    """Turn a failed safetensors write inside the block into the OSError it stands for, naming ``path``.

    Why: safetensors raises its own ``SafetensorError`` (not an OSError) for a full disk ("I/O error: No space left
    on device (os error 28)"), which the CLI would print as a long traceback naming no folder. Inside
    :func:`atomic_dir` the OSError then names the target folder and the previous one stays. Wrap every safetensors
    write, including the ones transformers and peft make for us (``save_pretrained``)."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError):
            raise
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), os.fspath(path)) from None
        raise OSError(errno.EIO, f"safetensors could not write the file: {exc}", os.fspath(path)) from None


def save_safetensors(tensors: dict[str, Any], path: PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with a failed write (a full disk) raised as an OSError naming ``path`` (see
    :func:`safetensors_errors`): the one way prefixvqa writes its own tensors."""
    from safetensors.torch import save_file

    with safetensors_errors(path):
        save_file(tensors, os.fspath(path), metadata=metadata)
    return Path(path)


def package_file(package: str, relative: str = "", install_hint: str | None = None, *, purpose: str | None = None,
                 error: type[Exception] = FileNotFoundError) -> Path:
    """Path of ``relative`` inside the installed package ``package``, found without importing the package.

    Why: data-only packages (presets, DICOM samples, model weights) are looked up by location; importing them could
    be slow or have side effects. For a namespace package the first folder holding ``relative`` is returned (the
    first folder if none does; the caller decides whether the file must exist). A missing package raises ``error``
    naming the package and the pip command (``install_hint``, default ``pip install <top-level name>``).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        spec = None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    if not folders:
        hint = install_hint or f"pip install {package.split('.')[0].replace('_', '-')}"
        raise error(f"{purpose or 'this'} needs the Python package {package!r}, which is not installed: {hint}")
    for folder in folders:
        if (folder / relative).exists():
            return folder / relative
    return folders[0] / relative


class IntegrityError(PrefixVQAError, ValueError):
    """A file of a folder does not match the sha256 manifest written when the folder was saved."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte blocks so multi-GB weights never sit in memory whole: the one
    digest that manifests, the hub index and their checks compare."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))


def write_manifest(folder: PathLike) -> dict[str, str]:
    """Record the sha256 and size of every file in ``folder`` (hidden files excepted) in ``MANIFEST_NAME``.

    Why: a flipped byte in a weights file still loads and gives wrong answers; the manifest lets every reader
    (adapter loading, the hub) refuse such a file by name. Call it last, once every other file is written.
    """
    folder = Path(folder)
    files = {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
             for name in _folder_files(folder)}
    atomic_write(folder / MANIFEST_NAME, json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")
    return {name: meta["sha256"] for name, meta in files.items()}


def verify_manifest(folder: PathLike, *, required: bool = True, extra_ok: bool = True) -> dict[str, str]:
    """Check every file listed in ``folder``'s manifest; raise :class:`IntegrityError` naming the first bad file.

    A missing manifest raises only with ``required``. Files present but unlisted are an error unless ``extra_ok``
    (a user may add notes to a folder; weights are always listed). Returns the manifest's name -> sha256 map.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        if required:
            raise IntegrityError(f"{path} is missing: the folder cannot be checked")
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        expected = {str(name): (str(meta["sha256"]), int(meta["size"])) for name, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{path} is damaged: {exc.__class__.__name__}: {exc}") from None
    for name, (sha, size) in sorted(expected.items()):
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{path} lists {name!r}, which is outside the folder")
        if not file.is_file():
            raise IntegrityError(f"{file} is missing (listed in {MANIFEST_NAME})")
        if file.stat().st_size != size:
            raise IntegrityError(f"{file} has {file.stat().st_size} bytes, the manifest says {size}: truncated or "
                                 f"replaced")
        if sha256_file(file) != sha:
            raise IntegrityError(f"{file} does not match its sha256 in {MANIFEST_NAME}: the file is damaged or was "
                                 f"changed after saving")
    if not extra_ok:
        extra = sorted(set(_folder_files(folder)) - set(expected))
        if extra:
            raise IntegrityError(f"{folder}: files not in {MANIFEST_NAME}: {extra[:5]}")
    return {name: sha for name, (sha, _) in expected.items()}
