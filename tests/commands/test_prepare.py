"""``neat prepare``: files and Hugging Face datasets into a byte store, ``--verify``, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neat_lightning.commands.prepare import main, prepare_store
from neat_lightning.data.byte_store import ByteStore
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.data.generators.corpus import Document
from tests.conftest import neat


def files(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"t{i}.txt").write_bytes(f"text file number {i}. ".encode() * (20 + 10 * i))
    return root


def test_files_become_documents_named_by_path(tmp_path, capsys):
    src = files(tmp_path / "src")
    assert main(["--input", str(src / "t[0-2].txt"), str(src / "t5.txt"), "--out", str(tmp_path / "s"),
                 "--shard-mb", "0.001"]) == 0
    assert "4 documents" in capsys.readouterr().out
    store = ByteStore(tmp_path / "s")
    expected = [str(src / f"t{i}.txt") for i in (0, 1, 2, 5)]
    assert list(store) == [Document(p, Path(p).read_bytes()) for p in expected]
    assert len(store.shards) > 1
    assert main(["--verify", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 4 and out["content_sha256"] == store.content_sha256


def test_large_files_are_read_in_chunks(tmp_path, monkeypatch):
    from neat_lightning.commands import prepare

    monkeypatch.setattr(prepare, "READ_CHUNK", 7)
    src = files(tmp_path / "src", n=2)
    assert len(list(prepare.file_chunks(src / "t0.txt"))) == -(-(src / "t0.txt").stat().st_size // 7)
    prepare_store(tmp_path / "s", input=[str(src / "*.txt")], shard_bytes=50)
    assert [d.data for d in ByteStore(tmp_path / "s")] == [p.read_bytes() for p in sorted(src.glob("*.txt"))]


def test_hugging_face_sources_keep_the_datamodules_names_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i} " * (5 + i) for i in range(30)], "id": list(range(30))})
    ds.save_to_disk(str(tmp_path / "saved"))
    prepare_store(tmp_path / "s", hf_path=str(tmp_path / "saved"))
    memory = ByteTextDataModule(hf_path=str(tmp_path / "saved"), block_size=8)
    disk = ByteTextDataModule(data_dir=str(tmp_path / "s"), block_size=8)
    memory.setup()
    disk.setup()
    assert list(memory.val_docs) == list(disk.val_docs) and memory.corpus.sha256 == disk.corpus.sha256

    src = files(tmp_path / "src", n=3)
    prepare_store(tmp_path / "h", hf_data_files=[str(src / "*.txt")])
    assert [d.name for d in ByteStore(tmp_path / "h")] == [f"hf_data_files={src / '*.txt'}[{i}]" for i in range(3)]
    with pytest.raises(ValueError, match=r"text_column='body' is not a column; columns are \['text', 'id'\]"):
        prepare_store(tmp_path / "c", hf_path=str(tmp_path / "saved"), text_column="body")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, match", [
    (["--input", "{tmp}/none.txt", "--out", "{tmp}/s"], r"^neat prepare: --input: no such file: '.*none.txt'$"),
    (["--input", "{tmp}/empty.txt", "--out", "{tmp}/s"],
     r"^neat prepare: --input: the input is empty \(0 bytes in 1 documents\)$"),
    (["--input", "{tmp}/empty.txt", "--out", "{tmp}"], r"^neat prepare: --out: '.*' already exists; pass --overwrite"),
    (["--hf-path", "{tmp}/nods", "--out", "{tmp}/s"], r"^neat prepare: --hf-path: no such dataset directory"),
    (["--verify", "{tmp}"], r"^neat prepare: --verify: '.*' is not a byte store \(no manifest.json\)"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, match):
    import re

    (tmp_path / "empty.txt").write_bytes(b"")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(match, err), err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_neat_prepare_subprocess_then_train_on_the_store(tmp_path):
    """The real command in a fresh interpreter, then `--data.data_dir` in a fit: the store is a training source."""
    src = files(tmp_path / "src", n=8)
    out = neat("prepare", "--input", str(src / "*.txt"), "--out", "store", "--json", cwd=tmp_path).stdout
    result = json.loads(out)
    assert result["documents"] == 8 and result["bytes"] == sum(p.stat().st_size for p in src.glob("*.txt"))
    assert "all 4 files match their sha256" in neat("prepare", "--verify", "store", cwd=tmp_path).stdout
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "trainer: {max_steps: 2, limit_val_batches: 1, enable_progress_bar: false, accelerator: cpu}\n"
        "model: {class_path: neat_lightning.modules.ByteLM, init_args: {dim: 16, n_layers: 1, heads: 2, "
        "block_size: 16}}\n"
        "data: {class_path: neat_lightning.data.ByteTextDataModule, init_args: {data_dir: store, block_size: 16, "
        "batch_size: 2}}\n"
    )
    neat("fit", "--config", str(config), "--run_name", "store_run", cwd=tmp_path)
    hparams = next((tmp_path / "runs" / "store_run").rglob("hparams.yaml")).read_text()
    assert f"corpus_sha256: {result['content_sha256']}" in hparams
