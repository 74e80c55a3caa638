"""``neat patch``: a real checkpoint from a real Trainer, the command end to end, and clear errors for bad paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from neat_lightning.commands.patch import main
from neat_lightning.data import ByteTextDataModule
from neat_lightning.modules import ByteLM

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs. ünïcødé |pipe|\n" * 3


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny ByteLM trained for three steps with a real Trainer and saved with ``trainer.save_checkpoint``."""
    root = tmp_path_factory.mktemp("patch_cli")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 4)
    L.seed_everything(0)
    model = ByteLM(dim=16, n_layers=1, heads=2, block_size=32, warmup_steps=1)
    data = ByteTextDataModule(train_files=[str(corpus)], block_size=32, batch_size=4, batches_per_epoch=3)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_steps=3, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(model, data)
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


def unmark(marked: str) -> str:
    return marked.replace("|", "")


@pytest.mark.slow  # a fresh interpreter importing lightning: ~10-30 s on a loaded 2-core machine
def test_neat_patch_subprocess_end_to_end(tiny_ckpt, text_file, tmp_path):
    stats_path = tmp_path / "stats.json"
    cmd = [
        sys.executable, "-m", "neat_lightning.cli", "patch", "--ckpt", str(tiny_ckpt), "--input", str(text_file),
        "--target-patch-size", "3", "--show-bytes", "-1", "--json", str(stats_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("mean patch size", "p50 patch size", "p90 patch size", "p99 patch size", "max patch size",
                  "boundary ratio", "bytes", "threshold (nats)"):
        assert label in out
    assert "\x1b[" not in out  # not a terminal: plain '|' markers, no colour codes
    marked = out.split("patches ('|' marks each patch start):\n", 1)[1]
    marked = marked[: marked.rindex("\n")]
    n_bytes = len(TEXT.encode())
    stats = json.loads(stats_path.read_text())
    assert stats["n_bytes"] == n_bytes
    assert stats["mean_size"] == pytest.approx(3.0, rel=0.02)  # calibrated on this very input
    # every patch start is marked; removing the markers (and the text's own two '|' per copy) restores the text
    assert unmark(marked) == unmark(TEXT)
    assert marked.count("|") - TEXT.count("|") == stats["n_patches"]


def test_threshold_and_modes_in_process(tiny_ckpt, text_file, capsys):
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(text_file), "--threshold", "100", "--max-patch-length",
                 "7", "--show-bytes", "0", "--max-bytes", "70", "--rule", "both", "--monotonic-threshold", "100"]) == 0
    out = capsys.readouterr().out
    assert "100.0000" in out and "max patch size" in out
    assert " 7 " in out and " 70 " in out  # all patches split to 7 bytes; 70 bytes read
    assert main(["--input", str(text_file), "--mode", "static", "--patch-size", "5", "--max-bytes", "12"]) == 0
    out = capsys.readouterr().out
    assert "|The q|uick |br\n" in out
    assert main(["--input", str(text_file), "--mode", "space", "--max-bytes", "15"]) == 0
    assert "|The |quick |brown\n" in capsys.readouterr().out


def test_colour_output_marks_patches_with_alternating_styles(text_file, capsys):
    assert main(["--input", str(text_file), "--mode", "static", "--patch-size", "4", "--max-bytes", "8",
                 "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and "The quic" not in out.replace("\x1b[0m", "")  # two differently styled patches


@pytest.mark.parametrize(
    "args, message",
    [
        ("--ckpt {d}/missing.ckpt --input {txt}", "checkpoint not found: '{d}/missing.ckpt'"),
        ("--ckpt {d}/corrupt.ckpt --input {txt}", "could not load a ByteLM from checkpoint '{d}/corrupt.ckpt'"),
        ("--ckpt {d} --input {txt}", "checkpoint '{d}' is a directory"),
        ("--ckpt {ck} --input {d}/nope.txt", "input file not found: '{d}/nope.txt'"),
        ("--ckpt {ck} --input {d}/empty.txt", "input file '{d}/empty.txt' is empty"),
        ("--input {txt}", "--ckpt is required in entropy mode"),
        ("--ckpt {ck} --input {txt} --target-patch-size 9 --max-patch-length 4",
         "--target-patch-size: target_mean_patch_size=9.0 is unreachable"),
        ("--input {txt} --mode static --patch-size 0",
         "invalid patching option: PatcherConfig.patch_size=0 must be >= 1"),
    ],
    ids=["missing-ckpt", "corrupt-ckpt", "ckpt-is-dir", "missing-input", "empty-input", "no-ckpt", "unreachable",
         "bad-patch-size"],
)
def test_bad_paths_and_values_give_clear_errors(tiny_ckpt, text_file, tmp_path, capsys, args, message):
    (tmp_path / "corrupt.ckpt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "empty.txt").write_bytes(b"")
    names = dict(d=tmp_path, ck=tiny_ckpt, txt=text_file)
    assert main(args.format(**names).split()) == 1
    err = capsys.readouterr().err
    assert err.startswith("neat patch: error: ")
    assert message.format(**names) in err


def test_threshold_and_target_are_exclusive(text_file, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(text_file), "--threshold", "1", "--target-patch-size", "4"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
