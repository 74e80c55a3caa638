"""The on-disk byte store: a corpus larger than RAM as raw byte shards plus a document index.

Layout of a store directory (written by ``neat prepare``, see :mod:`neat_lightning.commands.prepare`)::

    manifest.json        format, counts, content hash, and size + sha256 of every file below
    shard-00000.bin ...  the documents' bytes back to back (uint8, readable as numpy memmaps), cut every
                         ``shard_bytes``; a document may continue in the next shard
    offsets.bin          int64 little-endian, documents + 1 entries: document i is bytes offsets[i] .. offsets[i+1]-1
                         of the shards taken as one byte space
    names.bin            the documents' names (UTF-8) back to back; a name is the key of the train/val split
    name_offsets.bin     int64 little-endian, documents + 1 entries into names.bin

A store is written into a temporary sibling directory and renamed into place when complete, so an interrupted
``neat prepare`` leaves no half store under the target name. Opening a store (:class:`ByteStore`) checks the
manifest, the format version and every file's size (cheap); :meth:`ByteStore.verify` recomputes every sha256
(``neat prepare --verify DIR``). Reads go through ``os.pread``, not memory maps, so a reader's resident memory does
not grow with the bytes it has read (the page cache holds them, outside the process). Plain Python + numpy.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neat_lightning.data.generators.corpus import Document, document_record

FORMAT = 1  # the store format this version writes and the newest it reads
KIND = "neat-byte-store"
MANIFEST = "manifest.json"
OFFSETS, NAMES, NAME_OFFSETS = "offsets.bin", "names.bin", "name_offsets.bin"
DEFAULT_SHARD_BYTES = 256 * 2**20
_INDEX_FLUSH = 65536  # index entries buffered before a write
_HASH_CHUNK = 8 * 2**20


def _file_entry(name: str, n_bytes: int, digest: Any) -> dict[str, Any]:
    return {"name": name, "bytes": n_bytes, "sha256": digest.hexdigest()}


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.<random>.KIND``."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}"


class _HashedFile:
    """A file written sequentially while its size and sha256 are kept."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.bytes, self.digest = path, open(path, "wb"), 0, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return _file_entry(self.path.name, self.bytes, self.digest)


class StoreWriter:
    """Writes a byte store document by document; use as a context manager.

    ``add(name, chunks)`` appends one document given as an iterable of byte chunks (so a large file is never held in
    memory whole); :meth:`finish` writes the index and the manifest and renames the temporary directory to ``out``.
    Leaving the ``with`` block without :meth:`finish` (an error, an interrupt) removes the temporary directory.

    Args:
        out: the store directory to create.
        shard_bytes: bytes per shard (the last one holds the rest).
        overwrite: replace an existing ``out`` (only once the new store is complete).
        source: what the store was made from, recorded in the manifest.
    """

    def __init__(self, out: str | os.PathLike, shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 source: Sequence[str] = ()) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes={shard_bytes} must be >= 1")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"--out: {str(self.out)!r} already exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.overwrite, self.source = shard_bytes, overwrite, list(source)
        self.tmp = _sibling(self.out, "tmp")
        self.tmp.mkdir()  # mode from the umask, like any directory the user makes
        self.shards: list[dict[str, Any]] = []
        self._shard: _HashedFile | None = None
        self.n_documents = self.n_bytes = 0
        self._content = hashlib.sha256()
        self._names = _HashedFile(self.tmp / NAMES)
        self._offsets, self._name_offsets = _HashedFile(self.tmp / OFFSETS), _HashedFile(self.tmp / NAME_OFFSETS)
        self._pending_offsets, self._pending_name_offsets = [0], [0]

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp.exists():
            self._abort()

    def _abort(self) -> None:
        for f in (self._shard, self._names, self._offsets, self._name_offsets):
            if f is not None and not f.file.closed:
                f.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _write_bytes(self, data: memoryview) -> None:
        while len(data):
            if self._shard is None:
                self._shard = _HashedFile(self.tmp / f"shard-{len(self.shards):05d}.bin")
            room = self.shard_bytes - self._shard.bytes
            self._shard.write(data[:room])
            data = data[room:]
            if self._shard.bytes == self.shard_bytes:
                self.shards.append(self._shard.close())
                self._shard = None

    def _flush_index(self, force: bool = False) -> None:
        if force or len(self._pending_offsets) >= _INDEX_FLUSH:
            self._offsets.write(np.asarray(self._pending_offsets, dtype="<i8").tobytes())
            self._name_offsets.write(np.asarray(self._pending_name_offsets, dtype="<i8").tobytes())
            self._pending_offsets, self._pending_name_offsets = [], []

    def add(self, name: str, chunks: Iterable[bytes]) -> int:
        """Append one document; returns its size in bytes."""
        doc_digest, size = hashlib.sha256(), 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            doc_digest.update(view)
            self._write_bytes(view)
            size += len(view)
        encoded = name.encode("utf-8", errors="surrogatepass")
        self._names.write(encoded)
        self._content.update(document_record(name, size, doc_digest.digest()))
        self.n_documents += 1
        self.n_bytes += size
        self._pending_offsets.append(self.n_bytes)
        self._pending_name_offsets.append(self._names.bytes)
        self._flush_index()
        return size

    def finish(self) -> dict[str, Any]:
        """Write the index and the manifest, then move the store into place; returns the manifest."""
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard = None
        self._flush_index(force=True)
        manifest = {
            "kind": KIND,
            "format": FORMAT,
            "documents": self.n_documents,
            "bytes": self.n_bytes,
            "content_sha256": self._content.hexdigest(),
            "shard_bytes": self.shard_bytes,
            "shards": self.shards,
            "index": {"offsets": self._offsets.close(), "names": self._names.close(),
                      "name_offsets": self._name_offsets.close()},
            "source": self.source,
        }
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.out.exists():  # --overwrite: move the old store aside only now that the new one is complete
            old = _sibling(self.out, "old")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def write_store(out: str | os.PathLike, documents: Iterable[Document], shard_bytes: int = DEFAULT_SHARD_BYTES,
                overwrite: bool = False, source: Sequence[str] = ()) -> dict[str, Any]:
    """Write in-memory ``documents`` as a store at ``out``; returns the manifest."""
    with StoreWriter(out, shard_bytes, overwrite, source) as writer:
        for doc in documents:
            writer.add(doc.name, [doc.data])
        return writer.finish()


# ----------------------------------------------------------------------------------------------------------------------
# reading


class ByteStore:
    """A byte store opened for reading. Opening checks the manifest and every file's size; nothing is loaded.

    Args:
        path: the store directory.
        field: the option that named it, for error messages (``data_dir``, ``--verify``).

    Raises:
        FileNotFoundError: no such directory, or a file the manifest lists is missing (the message names it).
        ValueError: not a store, a manifest that does not parse or lacks a key, a store of a newer format, a file
            whose size differs from the manifest's (the message names the shard), an inconsistent index.
    """

    def __init__(self, path: str | os.PathLike, field: str = "data_dir") -> None:
        self.path, self.field = Path(path), field
        self.manifest = self._read_manifest()
        self.shards = [s["name"] for s in self.manifest["shards"]]
        sizes = np.array([s["bytes"] for s in self.manifest["shards"]], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._shard_bounds = self._shard_starts.tolist()  # bisect on a list beats numpy for one value
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._check_sizes()

    def _where(self) -> str:
        return f"{self.field}: {str(self.path)!r}"

    def _read_manifest(self) -> dict[str, Any]:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.field}: no such byte store: {str(self.path)!r}")
        if not (self.path / MANIFEST).is_file():
            raise ValueError(f"{self._where()} is not a byte store (no {MANIFEST}); write one with "
                             f"`neat prepare --input FILES --out {self.path}`")
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self._where()}: {MANIFEST} is not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise ValueError(f"{self._where()}: {MANIFEST} is not a byte-store manifest (kind != {KIND!r})")
        found = manifest.get("format")
        if not isinstance(found, int):
            raise ValueError(f"{self._where()}: {MANIFEST} has no integer 'format'")
        if found > FORMAT:
            raise ValueError(f"{self._where()} was written by a newer neat_lightning (store format {found}); this "
                             f"version reads formats up to {FORMAT}")
        missing = [k for k in ("documents", "bytes", "content_sha256", "shards", "index") if k not in manifest]
        missing += [f"index.{k}" for k in ("offsets", "names", "name_offsets") if k not in manifest.get("index", {})]
        if missing:
            raise ValueError(f"{self._where()}: {MANIFEST} lacks {', '.join(missing)}")
        return manifest

    def files(self) -> list[dict[str, Any]]:
        """Every data file of the store with the size and sha256 the manifest records."""
        index = self.manifest["index"]
        return [*self.manifest["shards"], index["offsets"], index["names"], index["name_offsets"]]

    def _what(self, name: str) -> str:
        return f"shard {name!r}" if name in self.shards else f"index file {name!r}"

    def _check_sizes(self) -> None:
        for entry in self.files():
            path = self.path / entry["name"]
            if not path.is_file():
                raise FileNotFoundError(f"{self._where()}: {self._what(entry['name'])} is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ValueError(f"{self._where()}: {self._what(entry['name'])} has {size} bytes, the manifest says "
                                 f"{entry['bytes']} (truncated or replaced)")
        n_docs, n_bytes = self.manifest["documents"], self.manifest["bytes"]
        if int(self._shard_starts[-1]) != n_bytes:
            raise ValueError(f"{self._where()}: the shards hold {int(self._shard_starts[-1])} bytes, the manifest "
                             f"says {n_bytes}")
        for key in ("offsets", "name_offsets"):
            entry = self.manifest["index"][key]
            if entry["bytes"] != 8 * (n_docs + 1):
                raise ValueError(f"{self._where()}: index file {entry['name']!r} holds {entry['bytes'] // 8} offsets, "
                                 f"expected documents + 1 = {n_docs + 1}")
        first, last = self._index_entry(OFFSETS, 0), self._index_entry(OFFSETS, n_docs)
        if first != 0 or last != n_bytes:
            raise ValueError(f"{self._where()}: index file {OFFSETS!r} runs from {first} to {last}, expected 0 to "
                             f"{n_bytes}")

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def n_documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def n_bytes(self) -> int:
        return int(self.manifest["bytes"])

    @property
    def content_sha256(self) -> str:
        return str(self.manifest["content_sha256"])

    # -- low-level reads -------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:  # loader workers reopen the files
        return {**self.__dict__, "_fds": {}}

    def _fd(self, name: str) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def _pread(self, name: str, n: int, offset: int) -> bytes:
        data = os.pread(self._fd(name), n, offset)
        if len(data) != n:
            raise ValueError(f"{self._where()}: {self._what(name)} ended early ({len(data)} of {n} bytes at {offset})")
        return data

    def _index_entry(self, name: str, i: int) -> int:
        return int.from_bytes(self._pread(name, 8, 8 * i), "little", signed=True)

    def read(self, start: int, n: int) -> bytes:
        """``n`` bytes of the corpus from byte ``start`` (documents back to back, across shards)."""
        if n <= 0:
            return b""
        bounds = self._shard_bounds
        if start < 0 or start + n > bounds[-1]:
            raise IndexError(f"bytes {start}..{start + n - 1} of a store holding {bounds[-1]}")
        shard = bisect.bisect_right(bounds, start) - 1
        if start + n <= bounds[shard + 1]:  # within one shard
            return self._pread(self.shards[shard], n, start - bounds[shard])
        parts = []
        while n > 0:
            offset = start - bounds[shard]
            k = min(n, bounds[shard + 1] - start)
            parts.append(self._pread(self.shards[shard], k, offset))
            start, n, shard = start + k, n - k, shard + 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- documents -------------------------------------------------------------------------------------------------

    def offsets(self) -> np.ndarray:
        """(documents + 1,) int64 byte offsets, loaded and checked to be non-decreasing."""
        offsets = np.fromfile(self.path / OFFSETS, dtype="<i8").astype(np.int64, copy=False)
        if len(offsets) > 1 and bool((np.diff(offsets) < 0).any()):
            i = int(np.argmax(np.diff(offsets) < 0))
            raise ValueError(f"{self._where()}: index file {OFFSETS!r} decreases at document {i}")
        return offsets

    def name(self, i: int) -> str:
        lo, hi = self._index_entry(NAME_OFFSETS, i), self._index_entry(NAME_OFFSETS, i + 1)
        return self._pread(NAMES, hi - lo, lo).decode("utf-8", errors="surrogatepass")

    def names(self, chunk: int = _INDEX_FLUSH) -> Iterator[str]:
        """Every document's name in order, read ``chunk`` at a time."""
        for lo in range(0, self.n_documents, chunk):
            hi = min(lo + chunk, self.n_documents)
            bounds = np.frombuffer(self._pread(NAME_OFFSETS, 8 * (hi - lo + 1), 8 * lo), dtype="<i8")
            blob = self._pread(NAMES, int(bounds[-1] - bounds[0]), int(bounds[0]))
            cuts = (bounds - bounds[0]).tolist()
            for a, b in itertools.pairwise(cuts):
                yield blob[a:b].decode("utf-8", errors="surrogatepass")

    def document(self, i: int) -> Document:
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document {i} of a store with {self.n_documents}")
        lo, hi = self._index_entry(OFFSETS, i), self._index_entry(OFFSETS, i + 1)
        return Document(self.name(i), self.read(lo, hi - lo))

    def __len__(self) -> int:
        return self.n_documents

    def __iter__(self) -> Iterator[Document]:
        for i in range(self.n_documents):
            yield self.document(i)

    # -- full check --------------------------------------------------------------------------------------------------

    def verify(self) -> None:
        """Recompute the sha256 of every file; a mismatch raises naming the shard."""
        for entry in self.files():
            digest = hashlib.sha256()
            with open(self.path / entry["name"], "rb") as f:
                while block := f.read(_HASH_CHUNK):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                raise ValueError(f"{self._where()}: {self._what(entry['name'])} does not match its checksum (sha256 "
                                 f"{digest.hexdigest()[:16]}..., the manifest says {entry['sha256'][:16]}...)")


class StoreDocuments(Sequence):
    """Documents of a store as a lazy sequence of :class:`Document`: segment ``i`` (bytes ``starts[i] ..
    starts[i] + lengths[i] - 1`` of document ``docs[i]``) is read when asked for. ``suffix`` is appended to the names
    (``"[train]"`` for the part of a single document that a byte-level split gives one side)."""

    def __init__(self, store: ByteStore, docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 suffix: str = "") -> None:
        self.store, self.docs, self.starts, self.lengths, self.suffix = store, docs, starts, lengths, suffix

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        i = i % len(self)
        name = self.store.name(int(self.docs[i])) + self.suffix
        return Document(name, self.store.read(int(self.starts[i]), int(self.lengths[i])))
