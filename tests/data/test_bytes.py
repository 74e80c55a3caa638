from types import SimpleNamespace

import pytest
import torch

from neat_lightning.codec import EOS_ID, PAD_ID
from neat_lightning.data.bytes import (
    ByteTextDataModule,
    Document,
    RandomWindowBatches,
    SequentialWindowBatches,
    builtin_documents,
    split_documents,
    stream_from_documents,
)


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_builtin_corpus_is_pydoc_topics():
    docs = builtin_documents()
    assert len(docs) > 50
    assert 400_000 < sum(len(d.data) for d in docs) < 2_000_000
    assert all(d.name.startswith("pydoc:") for d in docs)


def test_document_split_is_deterministic_and_order_independent():
    docs = [Document(f"d{i}", b"x" * 10) for i in range(50)]
    train, val = split_documents(docs, 0.2, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.2, seed=0)
    assert {d.name for d in val} == {d.name for d in val2}
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in docs}
    assert not {d.name for d in train} & {d.name for d in val}
    assert 3 <= len(val) <= 20
    _, val3 = split_documents(docs, 0.2, seed=1)
    assert {d.name for d in val3} != {d.name for d in val}


def test_single_document_is_split_by_bytes():
    train, val = split_documents([Document("one", bytes(range(100)))], 0.1, seed=0)
    assert train[0].data + val[0].data == bytes(range(100))
    assert len(val[0].data) == 10


def test_train_and_val_files_and_globs(tmp_path):
    for i in range(3):
        write(tmp_path / f"a{i}.txt", f"document {i} " * 40)
    val = write(tmp_path / "val.txt", "held out text " * 10)
    dm = ByteTextDataModule(train_files=[str(tmp_path / "a*.txt")], val_files=[val], block_size=16, batch_size=2)
    dm.setup()
    assert len(dm.train_docs) == 3 and [d.name for d in dm.val_docs] == [val]
    assert dm.val_bytes() == b"held out text " * 10


def test_non_utf8_bytes_are_fine(tmp_path):
    data = bytes(range(256)) * 4
    dm = ByteTextDataModule(train_files=[write(tmp_path / "bin.dat", data)], block_size=16, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 17) and batch.dtype == torch.long


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"train_files": ["/nonexistent/corpus.txt"]}, FileNotFoundError, r"train_files: no such file: '/nonexistent/corpus.txt'"),
        ({"train_files": ["/nonexistent/*.txt"]}, FileNotFoundError, r"train_files: the glob '/nonexistent/\*.txt' matches no file"),
        ({"val_files": ["/nonexistent/val.txt"]}, FileNotFoundError, r"val_files: no such file"),
        ({"hf_path": "/nonexistent/ds"}, FileNotFoundError, r"hf_path: no such dataset directory"),
        ({"hf_data_files": "/nonexistent/x.txt"}, FileNotFoundError, r"hf_data_files: no such file"),
    ],
)
def test_missing_paths_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ByteTextDataModule(**kwargs).setup()


def test_empty_and_short_corpora_say_so_with_sizes(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=r"empty \(0 bytes in 1 documents\)"):
        ByteTextDataModule(train_files=[empty]).setup()
    short = write(tmp_path / "short.txt", "tiny text")
    with pytest.raises(ValueError, match=r"train split has \d+ bytes, fewer than one window of block_size \+ 1 = 257"):
        ByteTextDataModule(train_files=[short], val_files=[short], block_size=256).setup()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ByteTextDataModule(train_files=[str(tmp_path)]).setup()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "block_size=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_fraction": 1.5}, "val_fraction=1.5"),
        ({"train_files": ["a"], "hf_path": "b"}, "at most one training source"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ByteTextDataModule(**kwargs)


def test_hugging_face_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"row {i} " * 30 for i in range(20)]}
    ds = datasets.Dataset.from_dict(rows)
    dm = ByteTextDataModule(dataset=ds, block_size=16, batch_size=2)
    dm.setup()
    assert len(dm.train_docs) + len(dm.val_docs) == 20

    ds.save_to_disk(str(tmp_path / "saved"))
    dm = ByteTextDataModule(hf_path=str(tmp_path / "saved"), block_size=16)
    dm.setup()
    assert len(dm.train_docs) + len(dm.val_docs) == 20

    for i in range(4):
        write(tmp_path / f"t{i}.txt", f"file {i} " * 50)
    dm = ByteTextDataModule(hf_data_files=str(tmp_path / "t*.txt"), block_size=16)
    dm.setup()
    assert len(dm.train_docs) + len(dm.val_docs) == 4  # one document per file

    with pytest.raises(ValueError, match=r"text_column='body' is not a column; columns are \['text'\]"):
        ByteTextDataModule(dataset=ds, text_column="body").setup()


def test_random_windows_are_a_function_of_seed_and_batch_index():
    stream = stream_from_documents([Document("d", bytes(range(200)) * 5)])
    ds = RandomWindowBatches(stream, block_size=8, batch_size=4, batches_per_epoch=5, seed=3)
    batches = list(ds)
    assert len(batches) == 5 and all(b.shape == (4, 9) for b in batches)
    ds.start_batch = 2  # a resumed iterator continues mid-epoch with the same batches
    assert all(torch.equal(a, b) for a, b in zip(list(ds), batches[2:]))
    assert len(list(ds)) == 3
    ds.start_batch = 5  # the next epoch is new data
    assert not torch.equal(next(iter(ds)), batches[0])
    other = RandomWindowBatches(stream, block_size=8, batch_size=4, batches_per_epoch=5, seed=4)
    assert not torch.equal(next(iter(other)), batches[0])
    # consecutive ids in each window are consecutive in the stream
    for b in batches:
        for row in b:
            start = int(((stream == row[0]).nonzero())[0])
            assert torch.equal(stream[start : start + 9].long(), row) or (row[0] == EOS_ID)


def test_ranks_get_distinct_batches_and_workers_keep_order(tmp_path):
    write(tmp_path / "a.txt", "abcdefghij" * 200)
    dm = ByteTextDataModule(train_files=[str(tmp_path / "a.txt")], block_size=8, batch_size=4, batches_per_epoch=6)
    dm.setup()
    ranks = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        ranks.append(list(dm.train_dataloader()))
    assert not any(torch.equal(a, b) for a, b in zip(*ranks))
    dm.num_workers = 2
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, global_step=0, accumulate_grad_batches=1)
    with_workers = list(dm.train_dataloader())
    assert len(with_workers) == 6 and all(torch.equal(a, b) for a, b in zip(with_workers, ranks[0]))


def test_validation_covers_every_byte_once_across_ranks():
    stream = torch.arange(4, 4 + 101, dtype=torch.int16)
    seen = []
    for rank in (0, 1):
        ds = SequentialWindowBatches(stream, block_size=10, batch_size=3)
        ds.rank, ds.world_size = rank, 2
        for batch in ds:
            targets = batch[:, 1:]
            seen.extend(int(t) for t in targets.reshape(-1) if t != PAD_ID)
    assert sorted(seen) == list(range(5, 4 + 101))  # every id after the first, exactly once


def test_validation_pairs_are_held_out_prefixes_and_continuations():
    dm = ByteTextDataModule(block_size=16)
    pairs = dm.validation_pairs(8)
    assert len(pairs) == 8
    val_text = dm.val_bytes().decode("utf-8", errors="replace")
    for prompt, reference in pairs:
        assert prompt and reference and (prompt + reference) in val_text
