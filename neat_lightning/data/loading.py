"""Pieces every DataModule shares to make step-aligned, resumable batch streams (see ``data/bytes.py``).

Batch ``k`` of a stream is a pure function of ``(seed, k, rank)`` (:func:`batch_generator`), and a
:class:`PlacedLoader` tells its dataset the rank and the first batch (derived from the trainer's global step) each
time an iterator is made, so a run resumed mid-epoch continues with exactly the batches it would have seen.
:class:`SwitchLoader` hands one epoch over from one loader to another at a batch index, :func:`resolve_paths`
expands the files and globs a DataModule is given, and :func:`check_positive` checks its count arguments. Plain torch:
no Lightning here.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset


def batch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (e.g. ``(seed, k, rank)``) independently of PYTHONHASHSEED."""
    seed = int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def resolve_paths(patterns: str | os.PathLike | Sequence[str], field: str) -> list[Path]:
    """Expand files and globs; a missing path or an empty glob raises naming the pattern and the field."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{field}: the glob {pattern!r} matches no file")
            paths.extend(matches)
        else:
            p = Path(pattern)
            if not p.exists():
                raise FileNotFoundError(f"{field}: no such file: {pattern!r}")
            if p.is_dir():
                raise IsADirectoryError(f"{field}: {pattern!r} is a directory; give files or a glob like '{p}/*.txt'")
            paths.append(p)
    return paths


def check_positive(**values: int) -> None:
    """Refuse the first of ``values`` (argument name -> value, checked in the order given) that is below 1, e.g.
    ``check_positive(batch_size=batch_size)`` raises ``ValueError("batch_size=0 must be >= 1")``."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


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


class SwitchLoader:
    """One epoch of training batches that switches from a first loader to a step-aligned stream at a batch index.

    Batch ``k`` comes from ``first`` (e.g. a pretraining corpus) while ``k < switch_batch(len(self))``, then from
    ``second.batch(k)``; ``switch_batch`` returning ``None`` means no switch this epoch (``first`` throughout). With
    ``replay > 0`` the first ``round(replay * second.batch_size)`` rows of each batch after the switch are the rows
    of ``first``'s batch ``k`` (rehearsal). The epoch starts at ``second.start_batch``, which ``place(second)`` sets
    (from the trainer's global step), and ``first`` must place itself the same way (e.g. a :class:`PlacedLoader`),
    so a resumed run sees the very batches of the uninterrupted one. Without ``first`` it serves ``second`` alone.

    Args:
        second: the stream after the switch; ``batch(k)`` is a pure function of ``(seed, k, rank)``.
        first: the loader before the switch, or ``None``; its length sets the epoch's.
        place: sets ``second``'s rank and start batch each time an iterator is made.
        switch_batch: epoch length -> index of the first batch of ``second`` (``None``: no switch).
        replay: share of each batch's rows taken from ``first`` after the switch, in [0, 1).
        names: what the two sources hold, for error messages.
    """

    def __init__(
        self,
        second: StepAlignedBatches,
        first: Iterable | None,
        place: Callable[[StepAlignedBatches], None],
        switch_batch: Callable[[int], int | None],
        replay: float = 0.0,
        names: tuple[str, str] = ("pretraining", "scene"),
    ) -> None:
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay={replay} must be in [0, 1)")
        self.second, self.first, self.place, self.switch_batch = second, first, place, switch_batch
        self.replay, self.names = replay, names

    def __len__(self) -> int:
        return len(self.first) if self.first is not None else len(self.second)

    def __iter__(self) -> Iterator[Any]:
        self.place(self.second)
        start, n = self.second.start_batch, len(self)
        end = (start // n + 1) * n
        switch = self.switch_batch(n)
        n_replay = round(self.replay * self.second.batch_size) if self.first is not None else 0
        first_batches = None
        for k in range(start, end):
            use_first = self.first is not None and (switch is None or k < switch)
            if use_first or n_replay:
                if first_batches is None:
                    first_batches = iter(self.first)  # it places itself at the same global step
                try:
                    first_batch = next(first_batches)  # batch k of the first loader
                except StopIteration:
                    return
            if use_first:
                yield first_batch
                continue
            batch = self.second.batch(k)
            if n_replay:  # rehearsal: the first rows come from the first loader
                if first_batch.shape[1:] != batch.shape[1:]:
                    raise ValueError(
                        f"replay={self.replay} mixes rows of both corpora, but {self.names[0]} windows have shape "
                        f"{tuple(first_batch.shape[1:])} and {self.names[1]} windows {tuple(batch.shape[1:])}: use "
                        "the same block_size"
                    )
                batch = torch.cat([first_batch[:n_replay], batch[n_replay:]])
            yield batch
