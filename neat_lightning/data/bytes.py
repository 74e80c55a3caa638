"""Byte-level text data: corpus loading and :class:`ByteTextDataModule`.

Sources, in the order they are looked at:
  (a) local text files or globs (``train_files`` / ``val_files``), read as raw bytes (non-UTF-8 is fine);
  (b) a Hugging Face ``datasets`` dataset: a ``save_to_disk`` directory (``hf_path``), a ``load_dataset("text",
      data_files=...)`` spec (``hf_data_files``), or a ``datasets.Dataset`` object passed in Python (``dataset``);
  (c) a byte store written by ``neat prepare`` (``data_dir``): a corpus larger than RAM, read by windows;
  (d) a built-in corpus from what ships with every Python (``builtin``, see
      :mod:`neat_lightning.data.generators.corpus`): ``pydoc_topics`` (the default, 0.47 MB), ``stdlib_docs``
      (the topics plus the standard library's docstrings, 2.4 MB on Python 3.11) or ``stdlib_code`` (its source).
Nothing else on the machine is ever read, and nothing is downloaded.

Every source is split by whole document (:func:`split_documents`, by name). In-memory sources become one int16 id
stream per split; a store's splits are :class:`~neat_lightning.data.id_streams.SegmentIds` streams that read the
store by windows, so RAM holds four int64 per document whatever its size. The batchers below read either through
``IdStream.windows`` and draw the same windows from both for the same documents and seed.

Training batches are random windows of ``block_size + 1`` ids. Batch ``k`` of a run depends only on
``(seed, k, rank)``, and the loader starts each epoch's iterator at the trainer's current global step, so a run
resumed mid-epoch sees exactly the batches the uninterrupted run would have seen. See docs/byte_data.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.codec import EOS_ID, ids_from_bytes
from neat_lightning.data.byte_store import ByteStore, StoreDocuments
from neat_lightning.data.generators.corpus import Document, builtin_documents, builtin_sha256, corpus_sha256
from neat_lightning.data.id_streams import IdStream, SegmentIds, TensorIds, as_id_stream
from neat_lightning.data.loading import (
    PlacedLoader,
    ShardedSequentialBatches,
    StepAlignedBatches,
    batch_generator,
    check_positive,
    resolve_paths,
)

log = logging.getLogger(__name__)

Builtin = Literal["pydoc_topics", "stdlib_docs", "stdlib_code"]
PAIR_SCAN_BYTES = 8 * 2**20  # validation_pairs reads at most this much held-out text


@dataclass(frozen=True)
class CorpusInfo:
    """What a run trained on: logged at setup, written to the loggers' hyperparameters and to checkpoints."""

    origin: str  # the source, e.g. "builtin=stdlib_docs", "data_dir=/data/web", "train_files=[...]"
    documents: int
    bytes: int
    sha256: str  # generators.corpus.corpus_sha256 of the source's documents (names and bytes), before the split


# ----------------------------------------------------------------------------------------------------------------------
# corpus loading


def file_documents(patterns: Sequence[str], field: str) -> list[Document]:
    return [Document(str(p), p.read_bytes()) for p in resolve_paths(patterns, field)]


def hf_rows(dataset: Any, text_column: str, origin: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each row of a ``datasets.Dataset`` (or of the ``train`` split of a dict of splits), read
    in batches; names are ``origin[i]``. Column and split problems raise before the first row."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # DatasetDict
        if "train" not in dataset:
            raise ValueError(f"{origin}: dataset has splits {sorted(dataset.keys())}, expected a 'train' split")
        dataset = dataset["train"]
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"{origin}: expected a datasets.Dataset, got {type(dataset).__name__}")
    if text_column not in columns:
        raise ValueError(f"{origin}: text_column={text_column!r} is not a column; columns are {columns}")

    def rows() -> Iterator[tuple[str, bytes]]:
        i = 0
        for batch in dataset.select_columns([text_column]).iter(batch_size=1024):
            for text in batch[text_column]:
                data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text or b"")
                yield f"{origin}[{i}]", data
                i += 1

    return rows()


def hf_documents(dataset: Any, text_column: str, origin: str) -> list[Document]:
    """Rows of a ``datasets.Dataset`` (or a dict of splits: the ``train`` split) -> documents."""
    return [Document(name, data) for name, data in hf_rows(dataset, text_column, origin)]


def _stable_unit(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) from ``key`` (independent of PYTHONHASHSEED and of document order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def val_mask(names: Iterable[str], val_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool, True for the documents held out: those whose name scores below ``val_fraction``. Each side keeps
    at least one document (the lowest-scoring one goes to validation, the highest-scoring one to training)."""
    scores = np.fromiter((_stable_unit(name, seed) for name in names), dtype=np.float64)
    val = scores < val_fraction
    if not val.any():
        val[int(np.argmin(scores))] = True
    if val.all():
        val[int(np.argmax(scores))] = False
    return val


def single_document_cut(n_bytes: int, val_fraction: float) -> int:
    """Where a lone document is cut: its last ``val_fraction`` of bytes (at least one) go to validation."""
    return n_bytes - max(1, int(n_bytes * val_fraction))


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split by name (independent of document order). Each side gets at least one
    document when there are two or more.

    A single document is split by bytes instead (its last ``val_fraction`` goes to validation), since a document
    split would leave one side empty.
    """
    if len(docs) == 1:
        data = docs[0].data
        cut = single_document_cut(len(data), val_fraction)
        return [Document(docs[0].name + "[train]", data[:cut])], [Document(docs[0].name + "[val]", data[cut:])]
    val = val_mask((d.name for d in docs), val_fraction, seed)
    return [d for d, v in zip(docs, val) if not v], [d for d, v in zip(docs, val) if v]


def split_store(store: ByteStore, val_fraction: float, seed: int) -> tuple[StoreDocuments, StoreDocuments]:
    """:func:`split_documents` for a store, as lazy document views: the same names give the same split."""
    offsets = store.offsets()
    starts, lengths = offsets[:-1], np.diff(offsets)
    if store.n_documents == 1:
        cut = single_document_cut(int(lengths[0]), val_fraction)
        one = np.zeros(1, dtype=np.int64)
        return (StoreDocuments(store, one, one, np.array([cut]), "[train]"),
                StoreDocuments(store, one, np.array([cut]), np.array([int(lengths[0]) - cut]), "[val]"))
    val = val_mask(store.names(), val_fraction, seed)
    train_ids, val_ids = np.flatnonzero(~val), np.flatnonzero(val)
    return (StoreDocuments(store, train_ids, starts[train_ids], lengths[train_ids]),
            StoreDocuments(store, val_ids, starts[val_ids], lengths[val_ids]))


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


def id_stream(docs: Sequence[Document]) -> IdStream:
    """The split's id stream: read by windows from the store for store documents, built in RAM otherwise."""
    if isinstance(docs, StoreDocuments):
        return SegmentIds(docs.store.read, docs.starts, docs.lengths)
    return TensorIds(stream_from_documents(docs))


def split_sizes(docs: Sequence[Document]) -> int:
    """Bytes in ``docs`` (without reading a store's documents)."""
    if isinstance(docs, StoreDocuments):
        return int(docs.lengths.sum())
    return sum(len(d.data) for d in docs)


# ----------------------------------------------------------------------------------------------------------------------
# datasets


class RandomWindowBatches(StepAlignedBatches):
    """Yields ``(batch_size, block_size + 1)`` int64 batches of random windows from ``stream`` (an id tensor or an
    :class:`~neat_lightning.data.id_streams.IdStream`, e.g. a byte store's; the windows are the same for both).

    Batch ``k`` on ``rank`` is a pure function of ``(seed, k, rank)``. One epoch is ``batches_per_epoch`` batches
    per rank; an iterator starts at ``start_batch`` and runs to the end of that batch's epoch. With several loader
    workers, worker ``w`` makes batches ``k = start + w, start + w + n_workers, ...``; the DataLoader reads workers
    round-robin, so the order is the same for any ``num_workers``.
    """

    def __init__(self, stream: torch.Tensor | IdStream, block_size: int, batch_size: int, batches_per_epoch: int,
                 seed: int):
        super().__init__(batches_per_epoch)
        self.stream = as_id_stream(stream)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, k: int) -> torch.Tensor:
        n_starts = len(self.stream) - self.block_size
        starts = torch.randint(n_starts, (self.batch_size,), generator=batch_generator(self.seed, k, self.rank))
        return self.stream.windows(starts, self.block_size + 1)  # (B, T + 1) int64


class WindowList:
    """Windows ``index`` of ``stream``: window ``w`` is ids ``w * block_size .. w * block_size + block_size`` (PAD
    past the end). Slicing gives another :class:`WindowList`; :meth:`tensor` reads the ids. Nothing is read before."""

    def __init__(self, stream: IdStream, block_size: int, index: range) -> None:
        self.stream, self.block_size, self.index = stream, block_size, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: slice) -> WindowList:
        return WindowList(self.stream, self.block_size, self.index[i])

    def tensor(self) -> torch.Tensor:
        starts = torch.tensor(list(self.index), dtype=torch.long) * self.block_size
        return self.stream.windows(starts, self.block_size + 1)  # (len, T + 1) int64


class SequentialWindowBatches(ShardedSequentialBatches):
    """Covers ``stream`` (an id tensor or an IdStream) once with windows of ``block_size + 1`` overlapping by one id,
    so every id after the first is predicted exactly once. The last window is padded with PAD (ignored by the loss).
    Windows are dealt to ranks round-robin, without the duplicates a DistributedSampler would add; each batch is read
    when it is made."""

    def __init__(self, stream: torch.Tensor | IdStream, block_size: int, batch_size: int):
        stream = as_id_stream(stream)
        n_windows = max(1, math.ceil((len(stream) - 1) / block_size))
        super().__init__(WindowList(stream, block_size, range(n_windows)), batch_size)
        self.block_size = block_size

    def convert(self, batch: WindowList) -> torch.Tensor:
        return batch.tensor()


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class ByteTextDataModule(L.LightningDataModule):
    """Byte windows for language modelling from local files, a Hugging Face dataset, a byte store on disk, or a
    built-in corpus.

    Args:
        train_files: text files or globs for training (raw bytes; any encoding).
        val_files: text files or globs for validation. Without them, validation documents are split off the
            training documents (document level, deterministic from ``split_seed``).
        data_dir: a byte store written by ``neat prepare`` (corpora larger than RAM; read by windows, never loaded).
        hf_path: a directory written by ``datasets.Dataset.save_to_disk``.
        hf_data_files: a ``load_dataset("text", data_files=...)`` spec: one file, a list, or a glob.
        dataset: a ``datasets.Dataset`` object (Python use only).
        text_column: column holding the text in Hugging Face datasets.
        builtin: the built-in corpus used when no other training source is given: ``pydoc_topics`` (0.47 MB),
            ``stdlib_docs`` (2.4 MB, the one to train on) or ``stdlib_code`` (11 MB); sizes on Python 3.11.
        block_size: context length; windows are ``block_size + 1`` ids (inputs and shifted targets).
        batch_size: windows per batch (per device).
        batches_per_epoch: training batches per epoch and rank (windows are sampled, so an epoch is a convention).
        val_fraction: share of documents held out for validation when ``val_files`` is not given.
        seed: seed of the training windows.
        split_seed: seed of the train/val document split.
        num_workers: DataLoader worker processes.

    Attributes:
        corpus: a :class:`CorpusInfo` (source, documents, bytes, sha256) once :meth:`setup` has run.
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
        data_dir: str | None = None,
        builtin: Builtin = "pydoc_topics",
    ) -> None:
        super().__init__()
        check_positive(block_size=block_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if sum(x is not None for x in (train_files, hf_path, hf_data_files, dataset, data_dir)) > 1:
            raise ValueError(
                "give at most one training source: train_files, data_dir, hf_path, hf_data_files or dataset"
            )
        if builtin not in Builtin.__args__:
            raise ValueError(f"builtin={builtin!r} is not a built-in corpus; choose one of {list(Builtin.__args__)}")
        self.save_hyperparameters(ignore=["dataset"])
        self.train_files, self.val_files, self.data_dir = train_files, val_files, data_dir
        self.hf_path, self.hf_data_files, self.dataset = hf_path, hf_data_files, dataset
        self.text_column, self.builtin = text_column, builtin
        self.block_size, self.batch_size = block_size, batch_size
        self.batches_per_epoch, self.val_fraction = batches_per_epoch, val_fraction
        self.seed, self.split_seed, self.num_workers = seed, split_seed, num_workers
        self.train_docs: Sequence[Document] = []
        self.val_docs: Sequence[Document] = []
        self.corpus: CorpusInfo | None = None
        self._restored_corpus: dict[str, Any] | None = None

    # -- sources ---------------------------------------------------------------------------------------------------

    def source_documents(self) -> tuple[list[Document], str]:
        """Training-source documents held in memory and a name for error messages (not for ``data_dir``)."""
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
        return list(builtin_documents(self.builtin)), f"builtin={self.builtin}"

    def _split_source(self) -> tuple[str, CorpusInfo]:
        """Fill ``train_docs`` / ``val_docs``; returns the origin and what the training source holds."""
        if self.data_dir is not None:
            store = ByteStore(self.data_dir, "data_dir")
            origin = f"data_dir={self.data_dir}"
            info = CorpusInfo(origin, store.n_documents, store.n_bytes, store.content_sha256)
            if self.val_files is not None:
                offsets = store.offsets()
                docs = np.arange(store.n_documents)
                self.train_docs = StoreDocuments(store, docs, offsets[:-1], np.diff(offsets))
            elif store.n_bytes > 0:
                self.train_docs, self.val_docs = split_store(store, self.val_fraction, self.split_seed)
            return origin, info
        docs, origin = self.source_documents()
        if self.train_files is None and self.hf_path is None and self.hf_data_files is None and self.dataset is None:
            sha = builtin_sha256(self.builtin)
        else:
            sha = corpus_sha256((d.name, d.data) for d in docs)
        info = CorpusInfo(origin, len(docs), sum(len(d.data) for d in docs), sha)
        if self.val_files is not None:
            self.train_docs = docs
        elif info.bytes > 0:
            self.train_docs, self.val_docs = split_documents(docs, self.val_fraction, self.split_seed)
        return origin, info

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        origin, info = self._split_source()
        if self.val_files is not None:
            self.val_docs = file_documents(self.val_files, "val_files")
        elif info.bytes == 0:
            raise ValueError(f"{origin}: the corpus is empty (0 bytes in {info.documents} documents)")
        need = self.block_size + 1
        for split, split_docs in (("train", self.train_docs), ("val", self.val_docs)):
            n = split_sizes(split_docs)
            src = origin if split == "train" or self.val_files is None else f"val_files={self.val_files}"
            if n == 0:
                raise ValueError(f"{src}: the {split} split is empty (0 bytes in {len(split_docs)} documents)")
            if split == "train" and n + len(split_docs) < need:
                raise ValueError(
                    f"{src}: the train split has {n} bytes, fewer than one window of block_size + 1 = {need}"
                )
        self.train_stream, self.val_stream = id_stream(self.train_docs), id_stream(self.val_docs)
        self.corpus = info
        log.info(
            "byte data from %s (%d docs, %d bytes, sha256 %s): train %d docs / %d ids, val %d docs / %d ids",
            origin, info.documents, info.bytes, info.sha256, len(self.train_docs), len(self.train_stream),
            len(self.val_docs), len(self.val_stream),
        )
        for logger in getattr(self.trainer, "loggers", None) or []:
            logger.log_hyperparams({f"corpus_{k}": v for k, v in asdict(info).items()})
        self._check_restored_corpus()

    # -- checkpoints: which corpus a run trained on ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"corpus": asdict(self.corpus)} if self.corpus is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_corpus = state_dict.get("corpus")
        self._check_restored_corpus()

    def _check_restored_corpus(self) -> None:
        saved, self._restored_corpus = self._restored_corpus, None
        if saved and self.corpus is not None and saved.get("sha256") != self.corpus.sha256:
            log.warning(
                "the checkpoint was trained on %s (%s bytes, sha256 %s), this run reads %s (%d bytes, sha256 %s): "
                "the resumed batches differ from the uninterrupted run's",
                saved.get("origin"), saved.get("bytes"), saved.get("sha256"),
                self.corpus.origin, self.corpus.bytes, self.corpus.sha256,
            )
        elif saved and self.corpus is None:
            self._restored_corpus = saved

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
        continuation up to ``reference_bytes`` (cut at the line end). Fixed prompts for the BLEU monitor. Lines come
        from the first validation documents, up to ``PAIR_SCAN_BYTES`` of them."""
        self.setup()
        lines, scanned = [], 0
        for d in self.val_docs:
            lines += [ln for ln in d.data.decode("utf-8", errors="replace").splitlines()
                      if len(ln.strip()) >= prompt_bytes // 2 + 8]
            scanned += len(d.data)
            if scanned >= PAIR_SCAN_BYTES:
                break
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
        """The validation documents' raw bytes, for compression baselines on the very same text (all of them: a
        store's validation split is read whole)."""
        return raw_bytes(self.val_docs)
