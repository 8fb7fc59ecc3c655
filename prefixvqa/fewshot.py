"""Few-shot in-context answering in the Med-Flamingo manner: k (image, question, answer) shots before each query.

Med-Flamingo (Moor et al. 2023) prompts an interleaved sequence ``<image>Question: q Answer: a.<|endofchunk|>`` per
shot, then the query's ``<image>Question: q Answer:``, and picks shots per query. Here each image enters as its own
visual prefix at its place in the text (the processor renders shots; see `prompts.TEMPLATES["med_flamingo"]`).

Shots are given explicitly, or retrieved from a support pool by image similarity: cosine between the mean-pooled
encoder features of the query's image and of each pool image. Features come from the feature cache
(`data.cache.FeatureCache`), so each image is encoded once across queries, runs and the prompts themselves (the model
reads the same cached features for every slot). Retrieval never returns the query record nor any record whose image
has the same content (hash of bytes and view) as the query's. Among several questions on one pool image, the one
sharing most words with the query question is used, and each shot image appears once; the most similar shot is
placed last, next to the query.

Answering after the shots is the one answering loop's job (`inference.answer_records` with ``retriever=`` and
``shots=``); this module only picks the shots.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import PrefixVQAError

if TYPE_CHECKING:
    from .data.cache import FeatureCache
    from .data.records import VQARecord
    from .model import MedVQAAdapter

log = logging.getLogger(__name__)

__all__ = ["ShotRetriever", "ShotPoolError", "feature_cache"]


class ShotPoolError(PrefixVQAError, ValueError):
    """A shot pool or shot count that cannot give shots (no usable record, a negative count)."""


def feature_cache(model: "MedVQAAdapter", root: str | Path | None = None) -> "FeatureCache":
    """The feature cache for the model's encoder as it is now (`FeatureCache.for_model`, the one key rule): a
    trained encoder is keyed by its own weights, so its features never mix with the base encoder's."""
    from .data.cache import FeatureCache

    return FeatureCache.for_model(model, root)


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


class ShotRetriever:
    """Nearest pool records by image-feature cosine, excluding the query and its image. Built once per pool: every
    pool image is encoded into the feature cache here, so retrieval and the shots' image slots read cached features.
    A pool image that cannot be loaded is left out with a warning."""

    def __init__(self, model: "MedVQAAdapter", pool: Sequence["VQARecord"], *, cache: "FeatureCache | None" = None,
                 cache_dir: str | Path | None = None, batch_size: int = 32):
        self.model = model
        self.cache = cache if cache is not None else feature_cache(model, cache_dir)
        usable = [r for r in pool if r.image is not None and r.answer is not None]
        if not usable:
            raise ShotPoolError("the shot pool has no records with an image and an answer")
        failed: list[str] = []
        keys = self.cache.fill(model, usable, batch_size, on_error=lambda r, err: failed.append(f"{r.id}: {err}"))
        if failed:
            log.warning("shot pool: %d image(s) could not be loaded and are left out, e.g. %s", len(failed), failed[0])
        self.pool = [r for r, k in zip(usable, keys) if k is not None]
        self.keys = [k for k in keys if k is not None]
        self.embeddings = self._pooled(self.keys)  # (P, D), unit length
        self._words = [_words(r.question) for r in self.pool]

    def _pooled(self, keys: Sequence[str]) -> torch.Tensor:
        feats = torch.stack([torch.from_numpy(self.cache.get(k).copy()).float().mean(0) for k in keys])  # (M, D)
        return torch.nn.functional.normalize(feats, dim=-1)

    def features(self, keys: Sequence[str]) -> torch.Tensor:
        """Cached encoder features (M, N, D) of the given cache keys: what the model reads for each image slot."""
        return torch.stack([torch.from_numpy(self.cache.get(k).copy()) for k in keys])

    def query_keys(self, queries: Sequence["VQARecord"], batch_size: int = 32) -> list[str]:
        """Cache keys of the queries' images (encoding those not cached yet). A bad image raises, naming it."""
        from .data.images import ImageLoadError

        keys = self.cache.fill(self.model, list(queries), batch_size)
        for record, key in zip(queries, keys):
            if key is None:
                raise ImageLoadError(f"record {record.id!r}: its image could not be loaded")
        return list(keys)

    def retrieve(self, queries: Sequence["VQARecord"], k: int, keys: Sequence[str] | None = None
                 ) -> list[list["VQARecord"]]:
        """Per query, k pool records (fewer if the pool has fewer other images), least similar first."""
        if k < 0:
            raise ShotPoolError(f"shots must be >= 0, got {k}")
        if k == 0 or not queries:
            return [[] for _ in queries]
        keys = list(keys) if keys is not None else self.query_keys(queries)
        sims = self._pooled(keys) @ self.embeddings.T  # (Q, P)
        out = []
        for q, (record, key) in enumerate(zip(queries, keys)):
            chosen: dict[str, int] = {}  # pool image key -> pool index of the question used for it
            words = _words(record.question)
            for j in torch.argsort(sims[q], descending=True, stable=True).tolist():
                pool_key = self.keys[j]
                if pool_key == key or self.pool[j].id == record.id:
                    continue  # the query itself, or its image under another question
                if pool_key in chosen:
                    best = chosen[pool_key]
                    if len(self._words[j] & words) > len(self._words[best] & words):
                        chosen[pool_key] = j
                    continue
                if len(chosen) == k:
                    break
                chosen[pool_key] = j
            out.append([self.pool[j] for j in reversed(list(chosen.values()))])
        return out
