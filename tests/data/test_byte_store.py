"""The on-disk byte store (`data/byte_store.py`): byte-exact round trips across shards, atomic writes, the cheap
checks at open and the full checksum check, each failure naming its file."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from neat_lightning.data.byte_store import FORMAT, ByteStore, StoreWriter, write_store
from neat_lightning.data.generators.corpus import Document, corpus_sha256

DOCS = [
    Document("a.txt", b"first document\n" * 20),
    Document("empty", b""),
    Document("bin", bytes(range(256)) * 3),  # not UTF-8
    Document("n\u00e4me with \u00fcnicode", "caf\u00e9 \u2603\n".encode() * 7),
    Document("tiny", b"x"),
]


@pytest.fixture
def store_dir(tmp_path):
    write_store(tmp_path / "store", DOCS, shard_bytes=100)  # documents straddle shards
    return tmp_path / "store"


def test_round_trip_is_byte_exact_across_shards(store_dir):
    store = ByteStore(store_dir)
    assert len(store.shards) == -(-sum(len(d.data) for d in DOCS) // 100) > 1
    assert store.n_documents == len(DOCS) and store.n_bytes == sum(len(d.data) for d in DOCS)
    assert list(store) == DOCS
    assert list(store.names()) == [d.name for d in DOCS]
    assert list(store.names(chunk=2)) == [d.name for d in DOCS]
    assert store.content_sha256 == corpus_sha256((d.name, d.data) for d in DOCS)
    everything = b"".join(d.data for d in DOCS)
    for start, n in [(0, len(everything)), (95, 10), (199, 2), (250, 333)]:
        assert store.read(start, n) == everything[start : start + n]
    offsets = store.offsets()
    assert offsets.tolist() == [0, *__import__("itertools").accumulate(len(d.data) for d in DOCS)]
    with pytest.raises(IndexError, match="of a store holding"):
        store.read(len(everything) - 1, 2)


def test_streamed_chunks_equal_one_piece_and_the_hash_sees_names(tmp_path):
    with StoreWriter(tmp_path / "chunks", shard_bytes=7) as w:
        w.add("doc", [b"abc", b"", b"defghij", b"k" * 20])
        w.finish()
    whole = write_store(tmp_path / "whole", [Document("doc", b"abcdefghij" + b"k" * 20)])
    renamed = write_store(tmp_path / "renamed", [Document("other", b"abcdefghij" + b"k" * 20)])
    assert ByteStore(tmp_path / "chunks").document(0) == ByteStore(tmp_path / "whole").document(0)
    assert ByteStore(tmp_path / "chunks").content_sha256 == whole["content_sha256"] != renamed["content_sha256"]


def test_an_error_while_writing_leaves_nothing(tmp_path):
    def chunks():
        yield b"some bytes"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"), StoreWriter(tmp_path / "out") as w:
        w.add("doc", chunks())
    assert os.listdir(tmp_path) == []


def test_a_killed_prepare_leaves_no_store_under_the_name(tmp_path):
    """SIGKILL in the middle of writing: the temporary directory may stay (hidden), the store name never appears."""
    script = textwrap.dedent(f"""
        import os, signal
        from neat_lightning.data.byte_store import StoreWriter
        def chunks():
            yield b"x" * 1000
            os.kill(os.getpid(), signal.SIGKILL)
        with StoreWriter({str(tmp_path / "out")!r}, shard_bytes=100) as w:
            w.add("doc", chunks())
            w.finish()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    assert all(name.startswith(".out.") and name.endswith(".tmp") for name in os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir: no such byte store"):
        ByteStore(tmp_path / "out")


def test_overwrite_replaces_only_when_asked(store_dir):
    with pytest.raises(FileExistsError, match=r"--out: '.*store' already exists; pass --overwrite"):
        StoreWriter(store_dir)
    write_store(store_dir, [Document("new", b"new bytes")], overwrite=True)
    assert list(ByteStore(store_dir)) == [Document("new", b"new bytes")]
    assert os.listdir(store_dir.parent) == ["store"]


def test_a_store_pickles_by_path_and_reads_after(store_dir):
    store = ByteStore(store_dir)
    store.read(0, 10)  # opens a file descriptor, which must not travel
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fds == {} and list(clone) == DOCS


def _manifest(store_dir):
    return json.loads((store_dir / "manifest.json").read_text())


def test_checks_at_open_name_the_problem(store_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data_dir: '.*' is not a byte store \(no manifest.json\); write one with "
                                         r"`neat prepare --input FILES --out"):
        ByteStore(tmp_path / "store" / "..")
    manifest = _manifest(store_dir)
    (store_dir / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT + 1}))
    with pytest.raises(ValueError, match=rf"written by a newer neat_lightning \(store format {FORMAT + 1}\); this "
                                         rf"version reads formats up to {FORMAT}"):
        ByteStore(store_dir)
    (store_dir / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "index"}))
    with pytest.raises(ValueError, match=r"manifest.json lacks index, index.offsets"):
        ByteStore(store_dir)
    (store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON"):
        ByteStore(store_dir)
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    shard = store_dir / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shard 'shard-00001.bin' has 99 bytes, the manifest says 100 \(truncated"):
        ByteStore(store_dir)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 'shard-00001.bin' is missing"):
        ByteStore(store_dir)


def test_verify_recomputes_checksums_and_names_the_shard(store_dir):
    ByteStore(store_dir).verify()
    shard = store_dir / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # same size: only the full check sees it
    shard.write_bytes(bytes(data))
    store = ByteStore(store_dir, "--verify")
    with pytest.raises(ValueError, match=r"--verify: '.*store': shard 'shard-00002.bin' does not match its checksum"):
        store.verify()


def test_an_inconsistent_index_is_refused(store_dir):
    offsets = store_dir / "offsets.bin"
    raw = bytearray(offsets.read_bytes())
    raw[16:24], raw[24:32] = raw[24:32], raw[16:24]  # documents 1 and 2 end out of order
    offsets.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"index file 'offsets.bin' decreases at document 2"):
        ByteStore(store_dir).offsets()
