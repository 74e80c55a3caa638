"""Byte-level text data: corpus loading and :class:`ByteTextDataModule`.

Sources, in the order they are looked at:
  (a) local text files or globs (``train_files`` / ``val_files``), read as raw bytes (non-UTF-8 is fine);
  (b) a Hugging Face ``datasets`` dataset: a ``save_to_disk`` directory (``hf_path``), a ``load_dataset("text",
      data_files=...)`` spec (``hf_data_files``), or a ``datasets.Dataset`` object passed in Python (``dataset``);
  (c) the built-in corpus: the CPython documentation topics that ship with every Python (``pydoc_data.topics``).
Nothing else on the machine is ever read, and nothing is downloaded.

Training batches are random windows of ``block_size + 1`` ids. Batch ``k`` of a run depends only on
``(seed, k, rank)``, and the loader starts each epoch's iterator at the trainer's current global step, so a run
resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.data.loading import (
    PlacedLoader,
    ShardedSequentialBatches,
    StepAlignedBatches,
    batch_generator,
    resolve_paths,
)
from neat_lightning.codec import EOS_ID, PAD_ID, ids_from_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    name: str  # stable key used by the train/val split (topic name, file path, row index)
    data: bytes


# ----------------------------------------------------------------------------------------------------------------------
# corpus loading


def builtin_documents() -> list[Document]:
    """The built-in corpus: CPython's documentation topics (~466 KB of English prose and code), one per topic."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{name}", text.encode("utf-8")) for name, text in sorted(topics.items())]


def file_documents(patterns: Sequence[str], field: str) -> list[Document]:
    return [Document(str(p), p.read_bytes()) for p in resolve_paths(patterns, field)]


def hf_documents(dataset: Any, text_column: str, origin: str) -> list[Document]:
    """Rows of a ``datasets.Dataset`` (or a dict of splits: the ``train`` split) -> documents."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # DatasetDict
        if "train" not in dataset:
            raise ValueError(f"{origin}: dataset has splits {sorted(dataset.keys())}, expected a 'train' split")
        dataset = dataset["train"]
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"{origin}: expected a datasets.Dataset, got {type(dataset).__name__}")
    if text_column not in columns:
        raise ValueError(f"{origin}: text_column={text_column!r} is not a column; columns are {columns}")
    docs = []
    for i, text in enumerate(dataset[text_column]):
        data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text or b"")
        docs.append(Document(f"{origin}[{i}]", data))
    return docs


def _stable_unit(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) from ``key`` (independent of PYTHONHASHSEED and of document order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split. Each side gets at least one document when there are two or more.

    A single document is split by bytes instead (its last ``val_fraction`` goes to validation), since a document
    split would leave one side empty.
    """
    if len(docs) == 1:
        data = docs[0].data
        cut = len(data) - max(1, int(len(data) * val_fraction))
        return [Document(docs[0].name + "[train]", data[:cut])], [Document(docs[0].name + "[val]", data[cut:])]
    scores = [_stable_unit(d.name, seed) for d in docs]
    val = [d for d, s in zip(docs, scores) if s < val_fraction]
    train = [d for d, s in zip(docs, scores) if s >= val_fraction]
    if not val:  # the lowest-scoring document goes to validation
        i = min(range(len(docs)), key=scores.__getitem__)
        val, train = [docs[i]], docs[:i] + docs[i + 1 :]
    if not train:
        i = max(range(len(docs)), key=scores.__getitem__)
        train, val = [docs[i]], docs[:i] + docs[i + 1 :]
    return train, val


def stream_from_documents(docs: Sequence[Document]) -> torch.Tensor:
    """Documents -> one (N,) int16 id stream, each document followed by EOS."""
    parts = []
    for d in docs:
        parts.append(ids_from_bytes(d.data).to(torch.int16))
        parts.append(torch.tensor([EOS_ID], dtype=torch.int16))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int16)


def raw_bytes(docs: Sequence[Document]) -> bytes:
    """The documents' bytes concatenated: what the compression baselines compress."""
    return b"".join(d.data for d in docs)


# ----------------------------------------------------------------------------------------------------------------------
# datasets


class RandomWindowBatches(StepAlignedBatches):
    """Yields ``(batch_size, block_size + 1)`` int64 batches of random windows from ``stream``.

    Batch ``k`` on ``rank`` is a pure function of ``(seed, k, rank)``. One epoch is ``batches_per_epoch`` batches
    per rank; an iterator starts at ``start_batch`` and runs to the end of that batch's epoch. With several loader
    workers, worker ``w`` makes batches ``k = start + w, start + w + n_workers, ...``; the DataLoader reads workers
    round-robin, so the order is the same for any ``num_workers``.
    """

    def __init__(self, stream: torch.Tensor, block_size: int, batch_size: int, batches_per_epoch: int, seed: int):
        super().__init__(batches_per_epoch)
        self.stream = stream
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self._span = torch.arange(block_size + 1)

    def batch(self, k: int) -> torch.Tensor:
        n_starts = len(self.stream) - self.block_size
        starts = torch.randint(n_starts, (self.batch_size,), generator=batch_generator(self.seed, k, self.rank))
        return self.stream[starts[:, None] + self._span].long()  # (B, T + 1)



class SequentialWindowBatches(ShardedSequentialBatches):
    """Covers ``stream`` once with windows of ``block_size + 1`` overlapping by one id, so every id after the first
    is predicted exactly once. The last window is padded with PAD (ignored by the loss). Windows are dealt to ranks
    round-robin, without the duplicates a DistributedSampler would add."""

    def __init__(self, stream: torch.Tensor, block_size: int, batch_size: int):
        n_windows = max(1, math.ceil((len(stream) - 1) / block_size))
        padded = torch.full((n_windows * block_size + 1,), PAD_ID, dtype=torch.int16)
        padded[: len(stream)] = stream
        super().__init__(padded.unfold(0, block_size + 1, block_size), batch_size)  # (n_windows, T + 1)
        self.block_size = block_size

    def convert(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.long()


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class ByteTextDataModule(L.LightningDataModule):
    """Byte windows for language modelling from local files, a Hugging Face dataset, or the built-in corpus.

    Args:
        train_files: text files or globs for training (raw bytes; any encoding).
        val_files: text files or globs for validation. Without them, validation documents are split off the
            training documents (document level, deterministic from ``split_seed``).
        hf_path: a directory written by ``datasets.Dataset.save_to_disk``.
        hf_data_files: a ``load_dataset("text", data_files=...)`` spec: one file, a list, or a glob.
        dataset: a ``datasets.Dataset`` object (Python use only).
        text_column: column holding the text in Hugging Face datasets.
        block_size: context length; windows are ``block_size + 1`` ids (inputs and shifted targets).
        batch_size: windows per batch (per device).
        batches_per_epoch: training batches per epoch and rank (windows are sampled, so an epoch is a convention).
        val_fraction: share of documents held out for validation when ``val_files`` is not given.
        seed: seed of the training windows.
        split_seed: seed of the train/val document split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        hf_path: str | None = None,
        hf_data_files: str | list[str] | None = None,
        dataset: Any = None,
        text_column: str = "text",
        block_size: int = 256,
        batch_size: int = 32,
        batches_per_epoch: int = 1000,
        val_fraction: float = 0.1,
        seed: int = 1234,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch={batches_per_epoch} must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if sum(x is not None for x in (train_files, hf_path, hf_data_files, dataset)) > 1:
            raise ValueError("give at most one training source: train_files, hf_path, hf_data_files or dataset")
        self.save_hyperparameters(ignore=["dataset"])
        self.train_files, self.val_files = train_files, val_files
        self.hf_path, self.hf_data_files, self.dataset = hf_path, hf_data_files, dataset
        self.text_column = text_column
        self.block_size, self.batch_size = block_size, batch_size
        self.batches_per_epoch, self.val_fraction = batches_per_epoch, val_fraction
        self.seed, self.split_seed, self.num_workers = seed, split_seed, num_workers
        self.train_docs: list[Document] = []
        self.val_docs: list[Document] = []

    # -- sources ---------------------------------------------------------------------------------------------------

    def source_documents(self) -> tuple[list[Document], str]:
        """Training-source documents and a name for error messages."""
        if self.train_files is not None:
            return file_documents(self.train_files, "train_files"), f"train_files={self.train_files}"
        if self.hf_path is not None:
            import datasets

            if not Path(self.hf_path).exists():
                raise FileNotFoundError(f"hf_path: no such dataset directory: {self.hf_path!r}")
            return hf_documents(datasets.load_from_disk(self.hf_path), self.text_column, self.hf_path), "hf_path"
        if self.hf_data_files is not None:
            import datasets

            spec = self.hf_data_files
            for pattern in [spec] if isinstance(spec, str) else spec:
                resolve_paths([pattern], "hf_data_files")  # clear error before datasets' own
            ds = datasets.load_dataset("text", data_files=spec, sample_by="document", split="train")
            return hf_documents(ds, "text", f"hf_data_files={spec}"), "hf_data_files"
        if self.dataset is not None:
            return hf_documents(self.dataset, self.text_column, "dataset"), "dataset"
        return builtin_documents(), "the built-in corpus"

    def setup(self, stage: str | None = None) -> None:
        if self.train_docs or self.val_docs:
            return
        docs, origin = self.source_documents()
        if self.val_files is not None:
            self.train_docs = docs
            self.val_docs = file_documents(self.val_files, "val_files")
        else:
            if sum(len(d.data) for d in docs) == 0:
                raise ValueError(f"{origin}: the corpus is empty (0 bytes in {len(docs)} documents)")
            self.train_docs, self.val_docs = split_documents(docs, self.val_fraction, self.split_seed)
        need = self.block_size + 1
        for split, split_docs in (("train", self.train_docs), ("val", self.val_docs)):
            n = sum(len(d.data) for d in split_docs)
            src = origin if split == "train" or self.val_files is None else f"val_files={self.val_files}"
            if n == 0:
                raise ValueError(f"{src}: the {split} split is empty (0 bytes in {len(split_docs)} documents)")
            if split == "train" and n + len(split_docs) < need:
                raise ValueError(
                    f"{src}: the train split has {n} bytes, fewer than one window of block_size + 1 = {need}"
                )
        self.train_stream = stream_from_documents(self.train_docs)
        self.val_stream = stream_from_documents(self.val_docs)
        log.info(
            "byte data from %s: train %d docs / %d bytes, val %d docs / %d bytes",
            origin, len(self.train_docs), len(self.train_stream), len(self.val_docs), len(self.val_stream),
        )

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _place(self, ds: IterableDataset) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomWindowBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds: IterableDataset) -> DataLoader:
        self._place(ds)  # rank is known once the trainer has set up its strategy; len() depends on it
        return PlacedLoader(
            ds, self._place, num_workers=self.num_workers, persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            # a loader without its own generator draws worker seeds from the global RNG at every iter(),
            # which would shift dropout masks between an uninterrupted and a resumed run
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        ds = RandomWindowBatches(self.train_stream, self.block_size, self.batch_size, self.batches_per_epoch, self.seed)
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader:
        return self._loader(SequentialWindowBatches(self.val_stream, self.block_size, self.batch_size))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def validation_pairs(
        self, n: int | None = 32, prompt_bytes: int = 48, reference_bytes: int = 32
    ) -> list[tuple[str, str]]:
        """``n`` (prompt, reference) pairs from held-out text: a line's first ``prompt_bytes`` and the true
        continuation up to ``reference_bytes`` (cut at the line end). Fixed prompts for the BLEU monitor."""
        self.setup()
        lines = [
            ln for d in self.val_docs for ln in d.data.decode("utf-8", errors="replace").splitlines()
            if len(ln.strip()) >= prompt_bytes // 2 + 8
        ]
        if not lines:
            raise ValueError(f"the validation split has no line long enough for prompts of {prompt_bytes} bytes")
        n = len(lines) if n is None else n
        step = max(1, len(lines) // max(1, n))
        pairs = []
        for ln in lines[::step][:n]:
            data = ln.encode("utf-8")
            cut = min(prompt_bytes, len(data) // 2)
            pairs.append((data[:cut].decode("utf-8", errors="replace"),
                          data[cut : cut + reference_bytes].decode("utf-8", errors="replace")))
        return pairs

    def val_bytes(self) -> bytes:
        """The validation documents' raw bytes, for compression baselines on the very same text."""
        return raw_bytes(self.val_docs)
