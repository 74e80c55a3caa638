"""Pieces every DataModule shares to make step-aligned, resumable batch streams (see ``data/bytes.py``).

Batch ``k`` of a stream is a pure function of ``(seed, k, rank)`` (:func:`batch_generator`), and a
:class:`PlacedLoader` tells its dataset the rank and the first batch (derived from the trainer's global step) each
time an iterator is made, so a run resumed mid-epoch continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset


def batch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (e.g. ``(seed, k, rank)``) independently of PYTHONHASHSEED."""
    seed = int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class PlacedLoader(DataLoader):
    """A DataLoader of whole batches that calls ``place(dataset)`` each time an iterator is made (to set the
    dataset's rank and start batch from the trainer)."""

    def __init__(self, dataset: IterableDataset, place: Callable[[IterableDataset], None], **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._place = place

    def __iter__(self):
        self._place(self.dataset)
        return super().__iter__()


def worker_slot() -> tuple[int, int]:
    """(this loader worker's index, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class StepAlignedBatches(IterableDataset):
    """Base of the training streams: subclasses define ``batch(k)``, a pure function of ``(seed, k, rank)``.

    One epoch is ``batches_per_epoch`` batches per rank; an iterator starts at ``start_batch`` (set by a
    :class:`PlacedLoader` from the trainer's global step) and runs to the end of that batch's epoch. Worker ``w`` of
    ``n`` makes batches ``start + w, start + w + n, ...``; the DataLoader reads workers round-robin, so the order is
    the same for any number of workers.
    """

    def __init__(self, batches_per_epoch: int) -> None:
        super().__init__()
        self.batches_per_epoch = batches_per_epoch
        self.start_batch = 0
        self.rank, self.world_size = 0, 1

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, k: int) -> Any:
        raise NotImplementedError

    def __iter__(self):
        worker, n_workers = worker_slot()
        end = (self.start_batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        for k in range(self.start_batch + worker, end, n_workers):
            yield self.batch(k)


class ShardedSequentialBatches(IterableDataset):
    """A fixed evaluation set ``items`` (N, ...) in order, dealt to ranks round-robin (no padding duplicates, unlike
    a DistributedSampler) and cut into batches; ``convert`` maps each batch (e.g. dtype)."""

    def __init__(self, items: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.items, self.batch_size = items, batch_size
        self.rank, self.world_size = 0, 1

    def convert(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def _mine(self) -> torch.Tensor:
        return self.items[self.rank :: self.world_size]

    def __len__(self) -> int:
        return -(-len(self._mine()) // self.batch_size)

    def __iter__(self):
        worker, n_workers = worker_slot()
        mine = self._mine()
        for b in range(worker, len(self), n_workers):
            yield self.convert(mine[b * self.batch_size : (b + 1) * self.batch_size])
