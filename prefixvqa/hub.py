"""The adapter hub: a folder (or any fsspec URL) holding adapter folders and an index of what they are.

Layout of a hub root (default ``checkpoints/``, or ``$PREFIXVQA_HUB``)::

    index.json                  every adapter version: its files with sha256 and size, its config (so base models
                                can be checked before anything is fetched), base-model names and fingerprints, task,
                                metrics, description
    <name>/<version>/...        the adapter folder as saved (weights, peft files, tokenizer, manifest, card)

Why an index beside the per-folder manifest: the manifest travels with the folder (a copied adapter checks itself),
while the index is the hub's own record, so a folder whose files *and* manifest were replaced is still caught.
`pull` and `resolve` check every file against both and refuse a tampered or truncated file by name. Names and
versions are single path components (letters, digits, ``.``, ``_``, ``-``), and every path read from an index is
checked to stay inside the hub root; the index is checked entry by entry as it is read (`hub_index`).

Nothing lost: `pull` replaces an existing destination only when it is an earlier adapter prefixvqa wrote (its manifest
proves it) or the caller asks; a push killed mid-copy leaves a hidden sibling that the next push (or `verify`) clears
under the push lock, putting back the previous folder when an overwriting push died between its two renames.

Hugging Face Hub: `push_to_hf` uploads an adapter folder with a model card built by ``huggingface_hub.ModelCard``;
`pull_from_hf` downloads with ``snapshot_download`` and checks the folder's manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from .fileio import (MANIFEST_NAME, IntegrityError, atomic_dir, atomic_write, sha256_file, verify_manifest,
                     write_manifest)
from .hub_index import NAME_PATTERN, HubError, check_name, parse_ref, read_index

__all__ = ["HubError", "Hub", "default_hub", "parse_ref", "push_to_hf", "pull_from_hf", "hf_model_card",
           "INDEX_NAME", "DEFAULT_HUB"]

INDEX_NAME = "index.json"
DEFAULT_HUB = "checkpoints"
_LEFTOVER = re.compile(r"\.(.+)\.(?:tmp|old)-[A-Za-z0-9_]+")  # fileio.atomic_dir / replace_dir's hidden siblings


def default_hub() -> str:
    """The hub root used when none is named: ``$PREFIXVQA_HUB``, else ``checkpoints/`` (where training writes)."""
    return os.environ.get("PREFIXVQA_HUB", DEFAULT_HUB)


def _check_target(dest: Path, overwrite: bool) -> None:
    """A pull replaces ``dest`` only when it is new, empty, an earlier adapter prefixvqa wrote (every file in it listed
    in its manifest and unchanged), or the caller asked (``overwrite``); anything else may be the user's own work,
    which the folder swap would delete, so it is refused naming the folder."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise HubError(f"{dest} exists and is not a folder; give a new or empty folder")
    if overwrite or not dest.exists():
        return
    found = set()
    for top, dirs, names in os.walk(dest):
        rel = Path(top).relative_to(dest)
        found |= {(rel / n).as_posix() for n in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]}
    if not found:
        return
    try:
        listed = set(verify_manifest(dest, required=True))
        unlisted = sorted(found - listed - {MANIFEST_NAME})
        if unlisted or "prefixvqa_config.json" not in listed:
            raise IntegrityError(f"it holds files no prefixvqa adapter manifest lists: {unlisted[:3] or 'all'}")
    except IntegrityError as exc:
        raise HubError(f"{dest} exists and is not an earlier adapter written by prefixvqa ({exc}); give a new or "
                       f"empty folder, or pass --force (overwrite=True) to replace it and delete its files") from None


def _version_key(v: str) -> tuple:
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _flat_metrics(data: Any) -> dict[str, Any]:
    """Scalar metrics of a metrics.json (its "overall" part when it is an evaluation result)."""
    if isinstance(data, dict) and isinstance(data.get("overall"), dict):
        data = data["overall"]
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


class Hub:
    """One hub root: a local folder, or any fsspec URL (``memory://``, ``s3://``, ``file://`` ...)."""

    def __init__(self, root: str | os.PathLike | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(root if root is not None else default_hub())
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Hub({self.url!r})"

    # --- paths --------------------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        path = "/".join([self.root, *parts])
        if self.local:  # symlinks included: a folder linked to elsewhere is outside the hub too
            real, root = os.path.realpath(path), os.path.realpath(self.root)
            if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                raise HubError(f"{'/'.join(parts)} resolves to {real}, outside the hub root {root}")
        return path

    def folder(self, name: str, version: str) -> str:
        """The path (in the hub's filesystem) of one adapter version's folder; names are checked first, so it is
        always inside the root."""
        return self._path(check_name(name), check_name(version, "version"))

    # --- index --------------------------------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        """The hub's index.json as a dict (an empty index for a new hub); the record `pull`/`resolve` check files
        against. Every entry is checked as it is read (`hub_index.read_index`): a damaged or hand-edited index, or
        one with a name or version twice (two indexes merged as text), is refused in one line naming the bad entry,
        rather than failing later with a KeyError or silently keeping one of the twins."""
        path = self._path(INDEX_NAME)
        if not self.fs.exists(path):
            return {"format": "prefixvqa-hub", "version": 1, "adapters": {}}
        return read_index(self.fs.cat_file(path), f"{self.url}/{INDEX_NAME}")

    def _write_index(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        if self.local:
            atomic_write(self._path(INDEX_NAME), text)
            return
        tmp = self._path(f".{INDEX_NAME}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.pipe_file(tmp, text.encode())
        self.fs.mv(tmp, self._path(INDEX_NAME))

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[bool]:
        """Pushes to a local hub take turns (an exclusive flock on ``.index.lock``), so two pushes never pick the
        same version or lose each other's index entry. Remote hubs have no lock: push to them from one place.
        Yields whether the lock is held: with ``wait=False`` it is not taken (False) while a push is running."""
        if not self.local:
            yield True
            return
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, ".index.lock"), "a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def clean(self, wait: bool = True) -> list[str]:
        """Finish what killed pushes left in a local hub; returns the leftovers found (hub-relative paths).

        A push copies into a hidden ``<name>/.<version>.tmp-*`` folder (and an overwriting one moves the previous
        folder to ``.<version>.old-*``) under the push lock, so while this holds the lock no push is running and
        every such folder is dead: the one matching the index entry is put back (`fileio.recover_dir`) and the rest
        deleted, as are half-written index files. A version whose only copy is damaged is left alone (hub verify
        names it). `push` calls this; `verify` too, without waiting (it skips cleaning while a push runs)."""
        if not self.local or not os.path.isdir(self.root):  # nothing to clean; and never create the root here
            return []
        with self._locked(wait) as held:
            return self._clean() if held else []

    def _clean(self) -> list[str]:
        """`clean` with the lock held (or on a remote hub, where there is nothing to do)."""
        from .fileio import recover_dir

        if not self.local:
            return []
        root, adapters = Path(self.root), self.index()["adapters"]
        found = [p for p in root.glob(f".{INDEX_NAME}.*.tmp*") if p.is_file()]
        for p in found:
            p.unlink(missing_ok=True)
        for folder in root.iterdir():
            if not NAME_PATTERN.fullmatch(folder.name) or not folder.is_dir() or folder.is_symlink():
                continue
            left: dict[str, list[Path]] = {}
            for p in folder.iterdir():
                if (m := _LEFTOVER.fullmatch(p.name)) and NAME_PATTERN.fullmatch(m[1]):
                    left.setdefault(m[1], []).append(p)
            for version, paths in sorted(left.items()):
                entry = adapters.get(folder.name, {}).get(version)
                try:
                    recover_dir(folder / version, lambda c, e=entry: e is not None and self._matches(c, e))
                except IntegrityError:  # no intact copy: keep what is there as evidence (verify names it)
                    continue
                found += paths
            if not any(folder.iterdir()) and folder.name not in adapters:  # a first push of this name was killed
                folder.rmdir()
        return sorted(p.relative_to(root).as_posix() for p in found)

    def _matches(self, folder: Path, entry: dict[str, Any]) -> bool:
        """Whether ``folder`` holds every file of an index entry, unchanged (size and sha256)."""
        try:
            for file, meta in entry["files"].items():
                if not (folder / file).is_file():
                    return False
                self._check_bytes(folder.name, file, folder / file, meta)
        except HubError:
            return False
        return True

    def entry(self, ref: str) -> tuple[str, str, dict[str, Any]]:
        """(name, version, index entry) of "name" (its latest version) or "name@version"."""
        name, version = parse_ref(ref)
        versions = self.index()["adapters"].get(name)
        if not versions:
            raise HubError(f"no adapter named {name!r} in the hub {self.url}")
        if version is None:
            version = max(versions, key=_version_key)
        if version not in versions:
            raise HubError(f"{name} has no version {version!r} in the hub {self.url}; it has "
                           f"{sorted(versions, key=_version_key)}")
        return name, version, versions[version]

    def __contains__(self, ref: str) -> bool:
        try:
            self.entry(ref)
            return True
        except HubError:
            return False

    # --- push ---------------------------------------------------------------------------------------------------
    def push(self, folder: str | os.PathLike, name: str | None = None, version: str | None = None, *,
             task: str | None = None, overwrite: bool = False) -> str:
        """Copy a saved adapter folder into the hub and record it in the index; returns "name@version".

        The folder must check out against its own manifest (a damaged adapter is never shared). The version
        defaults to one more than the highest numeric version of that name."""
        src = Path(folder)
        files = self._checked_source(src)
        cfg = json.loads((src / "prefixvqa_config.json").read_text())
        name = check_name(name or cfg.get("name") or src.name)
        with self._locked():
            self._clean()  # under the lock: what a killed push left is dead, never a running push's copy
            return self._push(src, files, cfg, name, version, task, overwrite)

    def _push(self, src: Path, files: dict[str, Any], cfg: dict[str, Any], name: str, version: str | None,
              task: str | None, overwrite: bool) -> str:
        from ._version import __version__

        index = self.index()
        versions = index["adapters"].setdefault(name, {})
        if version is None:
            numeric = [int(v) for v in versions if v.isdigit()]
            version = str(max(numeric, default=0) + 1)
        check_name(version, "version")
        if version in versions and not overwrite:
            raise HubError(f"{name}@{version} is already in the hub {self.url} (pass overwrite to replace it)")
        metrics = _flat_metrics(json.loads((src / "metrics.json").read_text())) if "metrics.json" in files else {}
        dest = self.folder(name, version)
        self._upload(src, files, dest)
        versions[version] = {
            "path": f"{name}/{version}",
            "files": files,
            "config": cfg,
            "base_models": {
                "encoder": {"name": cfg["encoder"]["name"], "pretrained": cfg["encoder"].get("pretrained"),
                            "backend": cfg["encoder"].get("backend", "open_clip"),
                            "revision": cfg["encoder"].get("revision"),
                            "fingerprint": cfg.get("fingerprints", {}).get("encoder")},
                "decoder": {"name": cfg["decoder"]["name"], "revision": cfg["decoder"].get("revision"),
                            "layout": cfg["decoder"].get("layout"), "release": cfg["decoder"].get("release"),
                            "gguf_file": cfg["decoder"].get("gguf_file"),
                            "fingerprint": cfg.get("fingerprints", {}).get("decoder")}},
            "task": task or metrics.get("task") or metrics.get("protocol") or "visual question answering",
            "metrics": {k: v for k, v in metrics.items() if k not in ("task", "protocol")},
            "description": cfg.get("description") or "",
            "prefixvqa_version": __version__,
            "pushed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self._write_index(index)
        return f"{name}@{version}"

    @staticmethod
    def _checked_source(src: Path) -> dict[str, dict[str, Any]]:
        if not (src / "prefixvqa_config.json").is_file():
            raise HubError(f"{src} is not a prefixvqa adapter folder (no prefixvqa_config.json)")
        if not (src / MANIFEST_NAME).is_file():
            raise HubError(f"{src} has no {MANIFEST_NAME}; load and save the adapter again to write one")
        try:
            verify_manifest(src)
        except IntegrityError as exc:
            raise HubError(f"refusing to push a damaged adapter: {exc}") from None
        listed = json.loads((src / MANIFEST_NAME).read_text())["files"]  # just verified: its digests are the files'
        files = {n: {"sha256": meta["sha256"], "size": int(meta["size"])} for n, meta in sorted(listed.items())}
        manifest = src / MANIFEST_NAME
        files[MANIFEST_NAME] = {"sha256": sha256_file(manifest), "size": manifest.stat().st_size}
        return files

    def _upload(self, src: Path, files: dict[str, Any], dest: str) -> None:
        """All files into a hidden sibling, then one rename: a reader never finds half an adapter."""
        if self.local:
            with atomic_dir(dest) as tmp:
                for n in files:
                    (tmp / n).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / n, tmp / n)
            return
        parent, leaf = dest.rsplit("/", 1)
        tmp = f"{parent}/.{leaf}.{uuid.uuid4().hex[:8]}.tmp"
        for n in files:
            self.fs.put_file(str(src / n), f"{tmp}/{n}")
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        self.fs.mv(tmp, dest, recursive=True)

    # --- read ---------------------------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        """One row per adapter version: name, version, base models, task, metrics, and whether the base models are
        available on this machine (``available``; ``missing`` says what is not)."""
        rows = []
        for name, versions in sorted(self.index()["adapters"].items()):
            for version, entry in sorted(versions.items(), key=lambda kv: _version_key(kv[0])):
                missing = self.missing_bases(entry)
                rows.append({"name": name, "version": version, "ref": f"{name}@{version}",
                             "encoder": entry["base_models"]["encoder"]["name"],
                             "decoder": entry["base_models"]["decoder"]["name"], "task": entry.get("task", ""),
                             "metrics": entry.get("metrics", {}), "available": not missing, "missing": missing,
                             "description": entry.get("description", "")})
        return rows

    @staticmethod
    def missing_bases(entry: dict[str, Any]) -> str:
        """Empty if the entry's encoder and decoder can be built here, else what is missing (no download tried).

        Only the base-model sections are read, without the fields this version does not know (an adapter pushed by
        a newer release may add some): the version rule itself is applied once, when the folder is loaded
        (`adapter_io.AdapterFolder`), so a hub adapter is accepted or refused exactly as the same folder would be."""
        from dataclasses import fields

        from .config import AdapterConfig, ConfigError, DecoderConfig, EncoderConfig, MapperConfig
        from .decoder import check_available
        from .vision import ModelNotAvailableError

        try:  # the mapper too: a patch-feature encoder is refused beside the default (pooled-only) mapper kind
            bases = {part: {k: v for k, v in (entry["config"].get(part) or {}).items()
                            if k in {f.name for f in fields(kind)}}
                     for part, kind in (("encoder", EncoderConfig), ("mapper", MapperConfig),
                                        ("decoder", DecoderConfig))}
            check_available(AdapterConfig.from_dict(bases))
        except (ModelNotAvailableError, ConfigError) as exc:
            return str(exc).replace("\n", "; ")
        return ""

    def _check_bytes(self, ref: str, file: str, data: bytes | Path, meta: dict[str, Any]) -> None:
        """A file's bytes (remote) or local path against the index entry: size first, then sha256 (streamed)."""
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if size != int(meta["size"]):
            raise HubError(f"{ref}: {file} has {size} bytes, the hub index says {meta['size']}: truncated or "
                           f"replaced; refusing to use it")
        digest = sha256_file(data) if isinstance(data, Path) else hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise HubError(f"{ref}: {file} does not match its sha256 in the hub index: the file was changed after "
                           f"it was pushed; refusing to use it")

    def verify(self, ref: str | None = None) -> list[str]:
        """Problems found (empty: all good): every file of every (or one) adapter version against the index, extra
        files the index does not list, and each folder's own manifest. On a local hub, what killed pushes left is
        cleaned first (`clean`) unless a push is running."""
        self.clean(wait=False)
        refs = [ref] if ref else [f"{n}@{v}" for n, vs in self.index()["adapters"].items() for v in vs]
        problems = []
        for r in refs:
            try:
                name, version, entry = self.entry(r)
                folder = self.folder(name, version)
                files = entry["files"]
                for file, meta in sorted(files.items()):
                    path = self._path(name, version, file)
                    if not self.fs.isfile(path):
                        problems.append(f"{name}@{version}: {file} is missing")
                        continue
                    try:
                        self._check_bytes(f"{name}@{version}", file, self.fs.cat_file(path), meta)
                    except HubError as exc:
                        problems.append(str(exc))
                present = {p[len(folder) + 1:] for p in self.fs.find(folder)}
                extra = sorted(p for p in present - set(files) if not p.rsplit("/", 1)[-1].startswith("."))
                if extra:
                    problems.append(f"{name}@{version}: files not in the hub index: {extra[:5]}")
            except HubError as exc:
                problems.append(str(exc))
        return problems

    def pull(self, ref: str, dest: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Copy an adapter version to a local folder (default: the prefixvqa cache), checking every file against
        the index as it arrives and the folder against its manifest; nothing is left at ``dest`` on failure.

        An existing ``dest`` is replaced (whole, once the new copy is complete) only when it is empty or an earlier
        adapter prefixvqa wrote, as its manifest proves, or with ``overwrite``; a folder with anything else in it
        is refused by name before any transfer, so a mistyped ``--to`` never deletes the user's files."""
        from .decoder import cache_dir

        name, version, entry = self.entry(ref)
        files = entry["files"]
        if dest is None:  # the cache is prefixvqa's own: a stale or damaged copy there is simply replaced
            hub_id = hashlib.sha256(self.url.encode()).hexdigest()[:12]
            dest = cache_dir() / "hub" / hub_id / name / version
        else:
            _check_target(Path(dest), overwrite)
        dest = Path(dest)
        with atomic_dir(dest, overwrite=True) as tmp:  # replacing was decided above (_check_target, or the cache)
            for file, meta in sorted(files.items()):
                path = self._path(name, version, file)
                if not self.fs.isfile(path):
                    raise HubError(f"{name}@{version}: {file} is missing from the hub {self.url}")
                data = self.fs.cat_file(path)
                self._check_bytes(f"{name}@{version}", file, data, meta)
                (tmp / file).parent.mkdir(parents=True, exist_ok=True)
                (tmp / file).write_bytes(data)
            try:
                verify_manifest(tmp, extra_ok=False)
            except IntegrityError as exc:
                raise HubError(f"{name}@{version}: {exc}") from None
        return dest

    def resolve(self, ref: str) -> Path:
        """A local folder to load ``ref`` from: checked in place on a local hub, pulled into the cache otherwise.
        Base models are checked first, so an adapter for a base this machine lacks fails before any transfer."""
        name, version, entry = self.entry(ref)
        missing = self.missing_bases(entry)
        if missing:
            raise HubError(f"{name}@{version} needs base models that are not available here: {missing}")
        if not self.local:
            return self.pull(f"{name}@{version}")
        files = entry["files"]
        for file, meta in sorted(files.items()):
            path = Path(self._path(name, version, file))
            if not path.is_file():
                raise HubError(f"{name}@{version}: {file} is missing from the hub {self.url}")
            self._check_bytes(f"{name}@{version}", file, path, meta)
        return Path(self.folder(name, version))


# ----------------------------------------------------------------------------------------------- Hugging Face Hub
def _hub_model_id(name: str) -> str | None:
    """A decoder name that is a Hugging Face model id (not a local path or a package file)."""
    if name.startswith(("pkg:", ".", "/", "~")) or os.path.exists(name):
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def hf_model_card(folder: str | os.PathLike) -> Any:
    """A ``huggingface_hub.ModelCard`` for an adapter folder: the folder's own card text, with metadata (library,
    tags, pipeline, base model when it is a hub id, metric names) set through ``ModelCardData``."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    cfg = json.loads((folder / "prefixvqa_config.json").read_text())
    text = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    body = text.split("---", 2)[2].lstrip("\n") if text.startswith("---") and text.count("---") >= 2 else text
    metrics = _flat_metrics(json.loads((folder / "metrics.json").read_text())) if (folder / "metrics.json").is_file() \
        else {}
    data = ModelCardData(library_name="prefixvqa", pipeline_tag="visual-question-answering",
                         tags=["prefixvqa", "medical", "medical-vqa", "peft", cfg["tuning"]["mode"],
                               f"mapper-{cfg['mapper']['kind']}"],
                         base_model=_hub_model_id(cfg["decoder"]["name"]),
                         metrics=sorted(k for k, v in metrics.items() if isinstance(v, (int, float))) or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def push_to_hf(folder: str | os.PathLike, repo_id: str, *, api: Any = None, token: str | None = None,
               private: bool = True, revision: str | None = None, commit_message: str | None = None) -> Any:
    """Upload an adapter folder to a Hugging Face Hub model repo with a ``ModelCard``; returns upload_folder's
    result. The folder is checked against its manifest first; the card replaces README.md in a staged copy whose
    manifest is rewritten, so the uploaded folder checks out on the other side. ``api`` defaults to ``HfApi``."""
    src = Path(folder)
    Hub._checked_source(src)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="prefixvqa-hf-") as stage_dir:
        stage = Path(stage_dir) / "adapter"
        names = json.loads((src / MANIFEST_NAME).read_text())["files"]
        for n in names:
            (stage / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / n, stage / n)
        hf_model_card(src).save(stage / "README.md")
        write_manifest(stage)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"prefixvqa adapter {src.name}")


def pull_from_hf(repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool | None = None, token: str | None = None,
                 to: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Download (or find in the cache) an adapter repo with ``snapshot_download`` and check it against its manifest;
    a tampered or truncated file is refused by name. With ``to`` the checked folder is copied there (all or
    nothing) and that path returned; an existing ``to`` is replaced under the same rule as `Hub.pull`."""
    from huggingface_hub import snapshot_download

    from .vision import hub_offline

    if to is not None:
        _check_target(Path(to), overwrite)
    path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=hub_offline() if local_files_only is None else local_files_only))
    try:
        verify_manifest(path, required=True)
    except IntegrityError as exc:
        raise HubError(f"{repo_id}: {exc}") from None
    if to is None:
        return path
    # like every adapter folder: the old one stays until the copy is complete; replacing was decided by _check_target
    with atomic_dir(to, overwrite=True) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True)
    return Path(to)


def iter_compatible(hub: Hub, fingerprints: dict[str, str]) -> Iterable[str]:
    """Refs of hub adapters trained on exactly these base models (encoder and decoder fingerprints)."""
    for name, versions in sorted(hub.index()["adapters"].items()):
        for version, entry in sorted(versions.items(), key=lambda kv: _version_key(kv[0])):
            base = entry.get("base_models", {})
            if all(base.get(part, {}).get("fingerprint") == fingerprints.get(part) for part in ("encoder", "decoder")):
                yield f"{name}@{version}"
