import random
from types import SimpleNamespace

import lightning as L
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


# -- built-in corpora and what a run records about its corpus ---------------------------------------------------------


def test_builtin_corpus_by_name_splits_whole_modules_and_logs_size_and_hash(caplog):
    from neat_lightning.data.generators.corpus import builtin_sha256

    dm = ByteTextDataModule(builtin="stdlib_code", block_size=16)
    with caplog.at_level("INFO", logger="neat_lightning.data.bytes"):
        dm.setup()
    docs = {d.name: d.data for d in builtin_documents("stdlib_code")}
    assert dm.corpus.origin == "builtin=stdlib_code" and dm.corpus.documents == len(docs)
    assert dm.corpus.bytes == sum(map(len, docs.values())) and dm.corpus.sha256 == builtin_sha256("stdlib_code")
    assert all(docs[d.name] == d.data for d in dm.val_docs)  # whole modules, never a part of one
    assert {d.name for d in dm.val_docs}.isdisjoint(d.name for d in dm.train_docs)
    assert dm.corpus.sha256 in caplog.text and f"{dm.corpus.bytes} bytes" in caplog.text
    assert dm.state_dict() == {"corpus": {"origin": "builtin=stdlib_code", "documents": len(docs),
                                          "bytes": dm.corpus.bytes, "sha256": dm.corpus.sha256}}
    with pytest.raises(ValueError, match=r"builtin='wiki' is not a built-in corpus"):
        ByteTextDataModule(builtin="wiki")


def test_corpus_goes_to_the_logger_and_the_checkpoint_and_a_changed_corpus_warns(tmp_path, caplog):
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from neat_lightning.modules import ByteLM

    dm = ByteTextDataModule(block_size=16, batch_size=2, batches_per_epoch=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, logger=CSVLogger(tmp_path), default_root_dir=tmp_path)
    trainer.fit(ByteLM(dim=32, n_layers=1, heads=2, block_size=16), dm)
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["corpus_sha256"] == dm.corpus.sha256 and hparams["corpus_bytes"] == dm.corpus.bytes
    ckpt = torch.load(next((tmp_path / "lightning_logs").rglob("*.ckpt")), weights_only=False)
    assert ckpt["ByteTextDataModule"]["corpus"]["sha256"] == dm.corpus.sha256

    other = ByteTextDataModule(builtin="stdlib_code", block_size=16)
    other.load_state_dict(ckpt["ByteTextDataModule"])  # before setup, as a resumed fit restores it after
    with caplog.at_level("WARNING", logger="neat_lightning.data.bytes"):
        other.setup()
    assert "the checkpoint was trained on builtin=pydoc_topics" in caplog.text and "batches differ" in caplog.text


# -- byte stores on disk (`neat prepare`) ----------------------------------------------------------------------------


def make_files(root, n=14):
    """``n`` text files of very different sizes (some shorter than a window), one of them not UTF-8. The words are
    seeded random numbers, not a repeated phrase, so two windows at different places almost never hold equal bytes
    (tests that tell ranks apart by content rely on it)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = random.Random(i)
        body = (f"file {i}: " + " ".join(str(words.randrange(10**6)) for _ in range(3 * (i * i + 1)))).encode()
        write(root / f"doc{i:02d}.txt", body if i != 3 else body + bytes(range(256)))
    return str(root / "*.txt")


def make_store(tmp_path, pattern, name="store", shard_bytes=1000):
    from neat_lightning.commands.prepare import prepare_store

    prepare_store(tmp_path / name, input=[pattern], shard_bytes=shard_bytes)
    return str(tmp_path / name)


def both(pattern, store, **kw):
    kw = {"block_size": 24, "batch_size": 5, "batches_per_epoch": 7, "val_fraction": 0.3, **kw}
    memory, disk = ByteTextDataModule(train_files=[pattern], **kw), ByteTextDataModule(data_dir=store, **kw)
    memory.setup()
    disk.setup()
    return memory, disk


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_store_gives_the_windows_of_its_files_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names are paths as given: the same relative glob for both
    make_files(tmp_path / "corpus")
    pattern = "corpus/*.txt"
    store = make_store(tmp_path, pattern)
    memory, disk = both(pattern, store)
    assert memory.corpus.sha256 == disk.corpus.sha256 and memory.corpus.bytes == disk.corpus.bytes
    assert [d.name for d in memory.val_docs] == [d.name for d in disk.val_docs]
    assert list(memory.val_docs) == list(disk.val_docs) and memory.val_bytes() == disk.val_bytes()
    assert len(memory.train_stream) == len(disk.train_stream)
    for dm in (memory, disk):  # second epoch, rank 1 of 2: still the same windows
        dm.trainer = SimpleNamespace(global_rank=1, world_size=2, global_step=7, accumulate_grad_batches=1)
    assert same(list(memory.train_dataloader()), list(disk.train_dataloader()))
    assert same(list(memory.val_dataloader()), list(disk.val_dataloader()))
    assert memory.validation_pairs(4) == disk.validation_pairs(4)
    disk.num_workers = 2  # the store travels to loader workers by path
    assert same(list(memory.train_dataloader()), list(disk.train_dataloader()))


def test_a_store_of_one_document_splits_by_bytes_like_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "one.txt", "a single long document. " * 100)
    memory, disk = both("one.txt", make_store(tmp_path, "one.txt", shard_bytes=333))
    assert [d.name for d in disk.val_docs] == ["one.txt[val]"] and disk.train_docs[0].name == "one.txt[train]"
    assert disk.train_docs[0].data + disk.val_docs[0].data == (tmp_path / "one.txt").read_bytes()
    assert same(list(memory.train_dataloader()), list(disk.train_dataloader()))
    assert same(list(memory.val_dataloader()), list(disk.val_dataloader()))


def test_a_store_with_val_files_trains_on_every_document(tmp_path):
    store = make_store(tmp_path, make_files(tmp_path / "corpus", n=4))
    val = write(tmp_path / "val.txt", "held out " * 30)
    dm = ByteTextDataModule(data_dir=store, val_files=[val], block_size=16, batch_size=2)
    dm.setup()
    assert len(dm.train_docs) == 4 and dm.val_bytes() == b"held out " * 30


def test_a_store_keeps_an_index_in_ram_not_the_bytes(tmp_path):
    from neat_lightning.data.byte_store import StoreDocuments
    from neat_lightning.data.id_streams import SegmentIds

    store = make_store(tmp_path, make_files(tmp_path / "corpus"))
    dm = ByteTextDataModule(data_dir=store, block_size=16)
    dm.setup()
    assert isinstance(dm.train_docs, StoreDocuments) and isinstance(dm.train_stream, SegmentIds)
    stream = dm.train_stream
    index_bytes = stream.starts.nbytes + stream.lengths.nbytes + stream.bounds.nbytes
    assert index_bytes <= 8 * (3 * len(dm.train_docs) + 1) < dm.corpus.bytes / 10


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_on_a_store_reproduces_the_uninterrupted_run(tmp_path):
    """8 steps == 3 steps (mid-epoch: epochs are 5 batches), checkpoint, resume to 8; windows read from a store."""
    from neat_lightning.modules import ByteLM

    store = make_store(tmp_path, make_files(tmp_path / "corpus"))

    def run(ckpt_path=None, stop=None, root="a"):
        L.seed_everything(5)
        model = ByteLM(dim=32, n_layers=1, heads=2, block_size=24, warmup_steps=2, dropout=0.1)
        dm = ByteTextDataModule(data_dir=store, block_size=24, batch_size=3, batches_per_epoch=5)
        trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, deterministic=True, default_root_dir=tmp_path / root,
                            num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=4,
                            check_val_every_n_epoch=None, callbacks=[StopAt(stop)] if stop else [])
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, trainer

    full, _ = run(root="full")
    half, t_half = run(stop=3, root="half")
    assert t_half.global_step == 3
    t_half.save_checkpoint(tmp_path / "half.ckpt")
    resumed, t_resumed = run(ckpt_path=tmp_path / "half.ckpt", root="resumed")
    assert t_resumed.global_step == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(half.model.embed.weight, full.model.embed.weight)


DDP_STORE_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import lightning as L, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, {repo!r})
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.modules import ByteLM


class Record(Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch.tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch.tolist())

    def on_train_end(self, trainer, pl_module):
        with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
            json.dump({{"train": self.train, "val": self.val}}, f)


L.seed_everything(0)
model = ByteLM(dim=32, n_layers=1, heads=2, block_size=16, warmup_steps=2)
data = ByteTextDataModule(data_dir={store!r}, block_size=16, batch_size=2, batches_per_epoch=3)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, num_sanity_val_steps=0,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    val_check_interval=4, check_val_every_n_epoch=None, callbacks=[Record()])
trainer.fit(model, data)
"""


@pytest.mark.slow
def test_ddp_ranks_read_distinct_windows_from_a_store(tmp_path):
    """2 CPU processes on a store: rank r's batch k is RandomWindowBatches(seed, k, r), ranks differ, and the
    validation windows are dealt between ranks without overlap and cover the split once."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    store = make_store(tmp_path, make_files(tmp_path / "corpus"))
    script = tmp_path / "ddp_store.py"
    repo = str(Path(__file__).resolve().parents[2])
    script.write_text(textwrap.dedent(DDP_STORE_SCRIPT.format(repo=repo, out=str(tmp_path), store=store)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    dm = ByteTextDataModule(data_dir=store, block_size=16, batch_size=2, batches_per_epoch=3)
    dm.setup()
    for r, seen in enumerate(ranks):
        expected = RandomWindowBatches(dm.train_stream, 16, 2, 3, dm.seed)
        expected.rank = r
        assert seen["train"] == [expected.batch(k).tolist() for k in range(4)]
    assert not any(a == b for a, b in zip(ranks[0]["train"], ranks[1]["train"]))
    val_windows = [tuple(w) for rank in ranks for batch in rank["val"] for w in batch]
    every = [tuple(w) for batch in SequentialWindowBatches(dm.val_stream, 16, 2) for w in batch.tolist()]
    assert sorted(val_windows) == sorted(every)
