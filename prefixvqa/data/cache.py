"""Frozen-feature cache: encoder outputs stored once per image as numpy `.npy` files, read back memory-mapped.

With a frozen encoder every epoch (and every run with the same encoder) recomputes identical features; decoding
DICOM/NIfTI and running a ViT dominates small-adapter training. The key of one entry is

    sha256(image file bytes [+ view arguments]) under a namespace sha256(encoder fingerprint, preprocess fingerprint)

so a different encoder checkpoint or a different preprocessing transform lands in a different namespace folder and
old entries are never reused (invalidation by construction). Entries are written to a temporary file and renamed,
so concurrent writers (several ranks, several runs) and interrupted runs never leave a half-written array.

`encoder_key` is the one rule for a model's encoder fingerprint, used by every caller through
`FeatureCache.for_model` (training, `prefixvqa cache-features`, few-shot retrieval): the base encoder's fingerprint
only while the encoder is the untouched base, else a fingerprint of its live weights, so features of a trained
encoder never land where a frozen-encoder run reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_write
from .processor import record_label, view_args
from .images import ImageLoadError, image_bytes_hash

if TYPE_CHECKING:
    import torch

    from ..model import MedVQAAdapter
    from .records import VQARecord

__all__ = ["FeatureCache", "cache_features", "encoder_key", "default_root"]


def encoder_key(model: MedVQAAdapter) -> str:
    """The encoder fingerprint that keys the model's feature-cache namespace.

    The base encoder's fingerprint (shared by every adapter on that base) only when the encoder is untouched: frozen
    by the config and never trained, merged or loaded from an adapter (`model.changed_parts`). Otherwise the
    fingerprint of its live weights, marked as trained, so those features can never be read as the base encoder's.
    """
    if model.config.encoder.freeze and "encoder" not in model.changed_parts:
        return model.base_fingerprints["encoder"]
    from ..decoder import fingerprint

    return fingerprint(model.encoder.visual, {"name": model.config.encoder.name, "trained": True})


def default_root() -> Path:
    """Where features are cached when the caller names no folder: ``features/`` in prefixvqa's cache folder."""
    from ..decoder import cache_dir

    return cache_dir() / "features"


class FeatureCache:
    """Content-addressed store of (N, D) float32 feature arrays for one encoder + preprocessing."""

    def __init__(self, root: str | Path, encoder_fingerprint: str, preprocess_fingerprint: str):
        self.root = Path(root)
        self.encoder_fingerprint, self.preprocess_fingerprint = encoder_fingerprint, preprocess_fingerprint
        self.namespace = hashlib.sha256(f"{encoder_fingerprint}\0{preprocess_fingerprint}".encode()).hexdigest()[:16]
        self.dir = self.root / self.namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache_info.json"
        if not info.exists():  # human-readable provenance of the namespace; written atomically
            atomic_write(info, json.dumps({"encoder_fingerprint": encoder_fingerprint,
                                                 "preprocess_fingerprint": preprocess_fingerprint}, indent=2))
        self._hashes: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256): no re-hash per epoch
        self.hits = self.misses = 0

    @classmethod
    def for_model(cls, model: MedVQAAdapter, root: str | Path | None = None) -> FeatureCache:
        """The cache of the model's encoder as it is now (namespace from `encoder_key` and the processor's image
        transform) under ``root`` (default: `default_root`): the one way callers open a model's cache."""
        return cls(root if root is not None else default_root(), encoder_key(model),
                   model.processor.transform_fingerprint())

    # --- keys -------------------------------------------------------------------------------------------------------
    def content_hash(self, ref: Any) -> str:
        """sha256 of the encoded bytes; paths are re-hashed only when their size or mtime changed."""
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return image_bytes_hash(bytes(ref))
        if isinstance(ref, dict):  # {bytes, path} cell
            return self.content_hash(ref.get("bytes") or ref.get("path"))
        path = os.fspath(ref)
        try:
            st = os.stat(path)
        except OSError as err:
            raise ImageLoadError(f"{path}: image file not found ({err.strerror})") from err
        known = self._hashes.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        digest = image_bytes_hash(path)
        self._hashes[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def key(self, record: VQARecord) -> str:
        """Content hash, extended by the view arguments (frame/slice/window) when the record sets any."""
        digest = self.content_hash(record.image)
        view = view_args(record)
        if view:
            digest = hashlib.sha256((digest + json.dumps(view, sort_keys=True)).encode()).hexdigest()
        return digest

    def path(self, key: str) -> Path:
        """The entry's file (two-character fan-out folders keep directories small)."""
        return self.dir / key[:2] / f"{key}.npy"

    # --- entries ----------------------------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The cached (N, D) features, memory-mapped, or None when absent or damaged (the caller recomputes)."""
        file = self.path(key)
        if not file.is_file():
            return None
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError):  # damaged entry (e.g. disk full mid-rename on an odd FS): recompute it
            return None

    def put(self, key: str, features: np.ndarray) -> None:
        """Store features as float32 atomically: concurrent writers of one key leave one whole entry."""
        # serialised in memory first so the temporary file ends in ".tmp", never "*.npy" (what __len__ counts)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        atomic_write(self.path(key), buf.getvalue())

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.npy"))

    def fill(self, model: MedVQAAdapter, records: Sequence[VQARecord], batch_size: int = 32,
             on_error: Callable[[VQARecord, ImageLoadError], None] | None = None) -> list[str | None]:
        """Encode every record's image not cached yet; returns each record's key (None where the image failed)."""
        keys: list[str | None] = [None] * len(records)
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            _, kept = self.features(model, chunk, on_error=on_error)
            for i in kept:
                keys[s + i] = self.key(chunk[i])
        return keys

    # --- batch lookup -----------------------------------------------------------------------------------------------
    def features(self, model: MedVQAAdapter, records: Sequence[VQARecord],
                 on_error: Callable[[VQARecord, ImageLoadError], None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Features (K, N, D) for the records whose image could be had, and their indices into `records`.

        Misses are loaded, encoded in one batch with the encoder in eval mode and stored. A bad image calls
        `on_error(record, err)` (which may raise) and is left out; without `on_error` the error propagates.
        """
        import torch

        found: dict[int, np.ndarray] = {}
        missing: list[tuple[int, str, Any]] = []
        for i, record in enumerate(records):
            try:
                key = self.key(record)
                cached = self.get(key)
                if cached is not None:
                    found[i] = cached
                    self.hits += 1
                    continue
                missing.append((i, key, model.processor.transform(model.processor.load_record_image(record))))
            except ImageLoadError as err:
                if on_error is None:
                    raise
                on_error(record, err)
        if missing:
            self.misses += len(missing)
            for (i, key, _), feats in zip(missing, _encode(model, [m[2] for m in missing])):
                self.put(key, feats)
                found[i] = feats
        order = sorted(found)
        if not order:
            return torch.empty(0), []
        return torch.from_numpy(np.stack([np.asarray(found[i]) for i in order])), order


def _encode(model: MedVQAAdapter, images: list[Any]) -> np.ndarray:
    """Encoder forward in eval mode without grad: what a frozen encoder computes during training."""
    import torch

    was = model.encoder.training
    model.encoder.eval()
    try:
        with torch.no_grad():
            return model.encode_pixels(torch.stack(images)).cpu().numpy()
    finally:
        model.encoder.train(was)


def cache_features(model: MedVQAAdapter, records: Sequence[VQARecord], root: str | Path,
                   batch_size: int = 32, on_bad_image: str = "skip") -> dict[str, Any]:
    """Fill the cache for every distinct image of `records` (the `prefixvqa cache-features` command).

    Returns stats: images (distinct), cached (newly written), reused (already there), failed (names), seconds.
    """
    if on_bad_image not in ("skip", "stop"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'stop', got {on_bad_image!r}")
    cache = FeatureCache.for_model(model, root)
    start = time.perf_counter()
    failed: list[str] = []

    def note(record: VQARecord, err: ImageLoadError) -> None:
        if on_bad_image == "stop":
            raise err
        label = record_label(record)
        failed.append(str(err) if label in str(err) else f"{label}: {err}")

    unique: dict[str, VQARecord] = {}
    for record in records:
        if record.image is None:
            continue
        try:
            unique.setdefault(cache.key(record), record)
        except ImageLoadError as err:
            note(record, err)
    todo = list(unique.values())
    for i in range(0, len(todo), batch_size):
        cache.features(model, todo[i:i + batch_size], on_error=note)
    return {"images": len(unique), "cached": cache.misses, "reused": cache.hits, "failed": failed,
            "root": str(cache.dir), "seconds": round(time.perf_counter() - start, 3)}
