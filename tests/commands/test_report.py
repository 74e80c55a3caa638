"""``neat report``: a ByteLM's validation bpb next to gzip/bz2/xz on the same bytes, the same on an out-of-domain
text (static and adaptive), as a table and as JSON, naming the checkpoint it evaluates."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import yaml

from neat_lightning.commands.report import compression_bpb, main
from neat_lightning.data import ByteTextDataModule
from neat_lightning.modules import ByteLM
from tests.conftest import neat

TRAIN = "The quick brown fox jumps over the lazy dog; the lazy dog sleeps on under the warm afternoon sun.\n" * 30
VAL = ("Pack my box with five dozen liquor jugs, said the quiet grocer to the very late customer.\n"
       "How vexingly quick daft zebras jump over the sleeping fox and its companions in the field.\n") * 4
OOD = "Sphinx of black quartz, judge my vow; the five boxing wizards jump quickly over the fence.\n" * 6
METHODS = ["model", "gzip -9", "bz2 -9", "xz -9e"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A tiny corpus, the config that names it, and a ByteLM trained on it for three steps."""
    root = tmp_path_factory.mktemp("report")
    (root / "train.txt").write_text(TRAIN)
    (root / "val.txt").write_text(VAL)
    (root / "ood_a.md").write_text(OOD[:200])
    (root / "ood_b.md").write_text(OOD[200:])
    data = {"train_files": [str(root / "train.txt")], "val_files": [str(root / "val.txt")], "block_size": 32,
            "batch_size": 4, "batches_per_epoch": 3}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "neat_lightning.modules.ByteLM",
                  "init_args": {"dim": 16, "n_layers": 1, "heads": 2, "block_size": 32}},
        "data": {"class_path": "neat_lightning.data.ByteTextDataModule", "init_args": data},
    }))
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(ByteLM(dim=16, n_layers=1, heads=2, block_size=32, warmup_steps=1), ByteTextDataModule(**data))
    trainer.save_checkpoint(root / "lm.ckpt")
    return {"root": root, "config": config, "ckpt": root / "lm.ckpt", "data": data}


def validation_bpb(run) -> float:
    """What `neat validate` logs as val/bpb for the same checkpoint and data."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = ByteLM.load_from_checkpoint(run["ckpt"], map_location="cpu")
    return trainer.validate(model, ByteTextDataModule(**run["data"]), verbose=False)[0]["val/bpb"]


def check(result: dict, printed: str, run) -> None:
    assert result["val_bytes"] == len(VAL.encode())
    assert list(result["bpb"]) == METHODS and all(0 < v < 16 and math.isfinite(v) for v in result["bpb"].values())
    assert {k: result["bpb"][k] for k in METHODS[1:]} == pytest.approx(compression_bpb(VAL.encode()))
    assert result["bpb"]["model"] == pytest.approx(validation_bpb(run), rel=1e-5)
    assert len(result["samples"]) == 2 and all(isinstance(s, str) for s in result["samples"])
    printed = " ".join(printed.split())  # rich wraps the titles to the table's width
    assert result["checkpoint"]["path"] == str(run["ckpt"]) and result["checkpoint"]["global_step"] == 3
    assert f"checkpoint: {run['ckpt']} (ByteLM, global step 3, written " in printed
    assert f"Validation bits per byte ({len(VAL.encode()):,} bytes, 1 documents)" in printed
    for label in ("ByteLM (", "gzip -9", "bz2 -9", "xz -9e", "vs xz -9e", "Samples (temperature 0.8, top-k 40)"):
        assert label in printed, label
    beats = result["bpb"]["model"] < result["bpb"]["xz -9e"]
    assert f"ByteLM {'beats' if beats else 'does NOT beat'} xz -9e on the same validation bytes." in printed


def test_report_table_and_json(run, tmp_path, capsys):
    out = tmp_path / "deep" / "report.json"
    code = main(["--config", str(run["config"]), "--ckpt", str(run["ckpt"]), "--samples", "2", "--sample-bytes", "8",
                 "--json", str(out)])
    assert code == 0
    check(json.loads(out.read_text()), capsys.readouterr().out, run)


def test_report_out_of_domain_static_and_adaptive(run, tmp_path, capsys):
    """``--ood`` globs are concatenated in sorted order and scored as `neat score` scores them; ``--adapt`` adds the
    prequential pass. The checkpoint file is not written."""
    from neat_lightning.commands.score import ScoreSettings, load_scorer, score_bytes
    from neat_lightning.commands.score import compression_bpb as score_compression

    out = tmp_path / "report.json"
    before = run["ckpt"].read_bytes()
    code = main(["--config", str(run["config"]), "--ckpt", str(run["ckpt"]), "--samples", "1", "--sample-bytes", "4",
                 "--ood", str(run["root"] / "ood_*.md"), "--adapt", "--cache", "--context", "32", "--lr", "3e-3",
                 "--json", str(out)])
    assert code == 0 and run["ckpt"].read_bytes() == before
    ood = json.loads(out.read_text())["ood"]
    data = OOD.encode()
    assert ood["bytes"] == len(data) and ood["files"] == [str(run["root"] / f"ood_{x}.md") for x in "ab"]
    assert (ood["gzip9"], ood["bz2_9"], ood["xz9e"]) == tuple(score_compression(data).values())
    static, adaptive, _, adaptive_c = score_bytes(load_scorer(run["ckpt"]), data, ScoreSettings(context=32, lr=3e-3),
                                                  adapt=True, cache=True)
    assert ood["bpb"] == pytest.approx(static.bpb) and ood["bpb_adaptive"] == pytest.approx(adaptive.bpb)
    assert ood["bpb_adaptive_cache"] == pytest.approx(adaptive_c.bpb)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Out-of-domain bits per byte ({len(data):,} bytes, 2 files:" in printed
    assert f"Out of domain, static: {static.bpb:.3f} bpb" in printed
    assert f"Out of domain, adaptive: {adaptive.bpb:.3f} bpb" in printed
    assert f"Out of domain, adaptive + cache: {adaptive_c.bpb:.3f} bpb" in printed


def test_report_errors_name_the_option(run, tmp_path, capsys):
    assert main(["--config", str(run["config"]), "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "neat report: --ckpt: no such file:" in capsys.readouterr().err
    assert main(["--config", str(run["config"]), "--ckpt", str(run["ckpt"]), "--ood", str(tmp_path / "*.none")]) == 2
    assert re.search(r"^neat report: --ood: the glob '.*\*\.none' matches no file$", capsys.readouterr().err.strip())


@pytest.mark.slow
def test_the_neat_command(run, tmp_path):
    out = tmp_path / "report.json"
    proc = neat("report", "--config", str(run["config"]), "--ckpt", str(run["ckpt"]), "--samples", "2",
                "--sample-bytes", "8", "--json", str(out), cwd=tmp_path, env={"COLUMNS": "120"})
    check(json.loads(out.read_text()), proc.stdout, run)
