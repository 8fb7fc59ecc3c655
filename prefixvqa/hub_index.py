"""The hub's names and its index format: what a hub may call an adapter, and what an index entry must hold.

Why apart from `hub`: every operation reads the index first, so it is checked in one place as it is read. A damaged or
hand-edited entry, or a name or version twice (two machines' indexes merged as text, which ``json`` would silently
reduce to one), is refused in one line naming it; names and versions are single path components, so no name read
from an index or typed by a user can point outside the hub root.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any, Iterator

from .errors import PrefixVQAError
from .fileio import MANIFEST_NAME

__all__ = ["HubError", "check_name", "parse_ref", "read_index"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one path component: never "..", "/" or "\\"


class HubError(PrefixVQAError, ValueError):
    """A hub operation cannot go ahead; the message names the adapter, version and file."""


def check_name(value: str, what: str = "name") -> str:
    """A name or version is one path component: it can never point outside the hub root."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or value.endswith("."):
        raise HubError(f"adapter {what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' "
                       f"(at most 100, starting with a letter or digit); no '/', no '..'")
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """"name" or "name@version" -> (name, version or None), both checked."""
    name, _, version = str(ref).partition("@")
    return check_name(name), (check_name(version, "version") if version else None)


def _safe_file(name: str, where: str) -> str:
    """A file name from an index or manifest: relative, inside the folder."""
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")):
        raise HubError(f"{where} lists the file {name!r}, which would be outside the adapter folder")
    return name


def read_index(raw: bytes | str, where: str) -> dict[str, Any]:
    """Parse an index.json and check every entry (`_check_index`); ``where`` (the index's URL) starts each message."""
    try:
        data = json.loads(raw, object_pairs_hook=_Pairs)
    except ValueError as exc:
        raise HubError(f"{where} is not a hub index: {exc}") from None
    _check_index(data, where)
    return data


class _Pairs(dict):
    """A JSON object that remembers the keys it had more than once (``json.loads`` keeps only the last of each)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        seen: set[str] = set()
        self.twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})


def _twice(data: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """Each key that appears twice in one object of a parsed index, said as what it is (adapter, version, key)."""
    if isinstance(data, _Pairs):
        for key in data.twice:
            yield (f"the adapter {key!r}" if path == ("adapters",) else
                   f"the version {path[1]}@{key}" if len(path) == 2 and path[0] == "adapters" else
                   f"the key {'/'.join((*path, key))!r}")
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _twice(value, (*path, key))


def _check_index(data: Any, where: str) -> None:
    """Refuse an index whose shape the hub relies on is broken; the message names the first bad entry."""
    twice = list(_twice(data))
    if twice:
        raise HubError(f"{where} lists {', '.join(twice[:5])} more than once (two indexes merged as text?): its "
                       f"entries would silently replace each other; keep one of each and run hub verify")
    if not isinstance(data, dict) or not isinstance(data.get("adapters"), dict):
        raise HubError(f"{where} is not a hub index: no 'adapters' object")
    for name, versions in data["adapters"].items():
        if not isinstance(versions, dict):
            raise HubError(f"{where}: the adapter {name!r} is not an object of versions")
        for version, entry in versions.items():
            try:
                check_name(name)
                check_name(version, "version")
                problem = _entry_problem(entry)
            except HubError as exc:
                problem = str(exc)
            if problem:
                raise HubError(f"{where} entry {name}@{version}: {problem}; the index is damaged or was edited "
                               f"by hand: fix or remove that entry")


def _entry_problem(entry: Any) -> str:
    """What is wrong with one index entry ("" if nothing): the fields `list`, `pull`, `resolve` and `verify` read.
    File names are checked to stay inside the adapter folder (raises HubError)."""
    if not isinstance(entry, dict):
        return "it is not an object"
    files = entry.get("files")
    if not isinstance(files, dict) or MANIFEST_NAME not in files:
        return f"it has no file list with {MANIFEST_NAME}"
    for file, meta in files.items():
        _safe_file(file, "it")
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64
                and isinstance(meta.get("size"), int) and not isinstance(meta["size"], bool) and meta["size"] >= 0):
            return f"the file {file!r} has no sha256 and size"
    if not isinstance(entry.get("config"), dict):
        return "it has no 'config' object"
    bases = entry.get("base_models")
    for part in ("encoder", "decoder"):
        if not isinstance(bases, dict) or not isinstance(bases.get(part), dict) \
                or not isinstance(bases[part].get("name"), str):
            return f"it has no base_models.{part}.name"
    for key, kind in (("metrics", dict), ("task", str), ("description", str)):
        if key in entry and not isinstance(entry[key], kind):
            return f"its {key!r} is not a{'n object' if kind is dict else ' string'}"
    return ""
