"""The DataLoader pipeline shared by training and evaluation.

Worker processes decode images (DICOM, NIfTI, PNG ...) with each record's view settings and tokenise through the
processor; the main process only moves finished tensors to the device. Batch order comes from a batch sampler that
replays a precomputed list of index batches from a start position, so a resumed run sees exactly the batches an
uninterrupted one would have seen, whatever the number of workers.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from .processor import MedVQAProcessor
    from .cache import FeatureCache
    from .records import VQARecord


class RecordDataset(Dataset):
    """Records -> processor items. With `cache_keys`, cached encoder features are read (memory-mapped) instead of
    decoding images; a record without features (its image failed when the cache was filled) becomes an error item."""

    def __init__(self, records: Sequence[VQARecord], processor: MedVQAProcessor, *, answers: bool = True,
                 cache: FeatureCache | None = None, cache_keys: Sequence[str | None] | None = None):
        self.records, self.processor, self.answers = list(records), processor, answers
        self.cache, self.cache_keys = cache, cache_keys

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        if self.cache is None:
            return self.processor.encode_record(record, answer=self.answers)
        item = self.processor.encode_record(record, pixels=False, answer=self.answers)
        key = self.cache_keys[i] if self.cache_keys is not None else None
        feats = self.cache.get(key) if key is not None else None
        if feats is None:
            return {**item, "error": "no cached features (the image could not be loaded)"}
        return {**item, "features": torch.from_numpy(np.array(feats))}


class BatchList(Sampler):
    """Yields `batches[start:]`; `set(batches, start)` before each pass (epoch order and resume point)."""

    def __init__(self, batches: Sequence[Sequence[int]] = ()):
        self.batches: list[list[int]] = [list(b) for b in batches]
        self.start = 0

    def set(self, batches: Sequence[Sequence[int]], start: int = 0) -> "BatchList":
        """Replace the batches and the position to start from (the epoch's order, and a resumed run's next batch);
        the DataLoader keeps this sampler, so persistent workers survive across epochs."""
        self.batches, self.start = [list(b) for b in batches], start
        return self

    def __iter__(self):
        yield from self.batches[self.start:]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


def default_workers() -> int:
    """Workers when unset: on a GPU, enough to keep it fed; on CPU none (the cores are busy with the model)."""
    import os

    return min(4, max(1, (os.cpu_count() or 2) - 1)) if torch.cuda.is_available() else 0


def make_loader(dataset: RecordDataset, sampler: BatchList, *, num_workers: int | None = None,
                padding_side: str = "right", prefetch_factor: int = 2, pack: int | None = None) -> DataLoader:
    """The one DataLoader of training and evaluation: items from `dataset` (decoded in workers), batches in the
    sampler's order, collated by the processor; its own seeded generator leaves the global RNG untouched. `pack`:
    each batch's records packed into rows of that many positions (`train.packing`, see packing.py)."""
    workers = default_workers() if num_workers is None else num_workers
    cuda = torch.cuda.is_available()
    collate: Callable = partial(dataset.processor.collate, padding_side=padding_side)
    if pack is not None:
        from .packing import pack_collate

        collate = partial(pack_collate, processor=dataset.processor, capacity=pack)
    # its own generator: each new iterator draws a worker seed, which must not advance the global RNG (dropout
    # masks after a resume would differ from those of an uninterrupted run)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=cuda,
                      persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensor part of a collated batch on `device` (ids and errors stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
