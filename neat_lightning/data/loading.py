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
