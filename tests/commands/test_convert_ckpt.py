"""``neat convert-ckpt``: an older checkpoint rewritten in the current format, atomically, each change printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from neat_lightning.cli import main as neat_main
from neat_lightning.commands.convert_ckpt import main
from neat_lightning.data import ByteTextDataModule
from neat_lightning.modules import ByteLM
from neat_lightning.modules.base import FORMAT, FORMAT_KEY
from tests.conftest import neat


class RenamedLM(ByteLM):
    """A ByteLM whose format-1 checkpoints called ``dim`` ``width``: a stand-in for a module whose arguments were
    renamed or regrouped (NeatModel, LatticeNetwork)."""

    @classmethod
    def upgrade_format(cls, checkpoint: dict[str, Any], found: int) -> list[str]:
        changes = super().upgrade_format(checkpoint, found)
        hparams = checkpoint["hyper_parameters"]
        if "width" in hparams:
            hparams["dim"] = hparams.pop("width")
            changes.append("hyperparameter width -> dim")
        return changes


def save_format_1(cls: type[ByteLM], path: Path, rename: bool = False) -> Path:
    """A checkpoint as format 1 wrote it: saved by a real Trainer, then ``neat_format`` and the module class
    deleted (and, for ``RenamedLM``, ``dim`` renamed back to ``width``)."""
    L.seed_everything(0)
    model = cls(dim=16, n_layers=1, heads=2, block_size=16, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, ByteTextDataModule(block_size=16, batch_size=2, batches_per_epoch=1))
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[FORMAT_KEY]
    del checkpoint["hyper_parameters"]["_class_path"]
    if rename:
        checkpoint["hyper_parameters"]["width"] = checkpoint["hyper_parameters"].pop("dim")
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    return save_format_1(ByteLM, tmp_path_factory.mktemp("convert") / "old.ckpt")


def same_weights(a: L.LightningModule, b: L.LightningModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_converts_a_format_1_bytelm_checkpoint(old, tmp_path, capsys):
    out = tmp_path / "sub" / "new.ckpt"
    assert main([str(old), str(out), "--model", "ByteLM"]) == 0
    assert "format 1 -> 2" in capsys.readouterr().out
    assert torch.load(out, weights_only=False)[FORMAT_KEY] == FORMAT
    assert FORMAT_KEY not in torch.load(old, weights_only=False)  # IN untouched
    assert [p.name for p in out.parent.iterdir()] == ["new.ckpt"]  # no temporary file left
    converted = ByteLM.load_from_checkpoint(out, map_location="cpu")
    assert same_weights(converted, ByteLM.load_from_checkpoint(old, map_location="cpu"))
    ids = torch.randint(4, 260, (1, 8))
    torch.testing.assert_close(converted(ids), ByteLM.load_from_checkpoint(old, map_location="cpu")(ids))


def test_prints_each_change_and_the_renamed_checkpoint_loads(tmp_path, capsys):
    src = save_format_1(RenamedLM, tmp_path / "renamed.ckpt", rename=True)
    out = tmp_path / "renamed-v2.ckpt"
    assert neat_main(["convert-ckpt", str(src), str(out), "--model", f"{__name__}.RenamedLM"]) == 0
    printed = capsys.readouterr().out
    assert "format 1 -> 2" in printed and "hyperparameter width -> dim" in printed
    model = RenamedLM.load_from_checkpoint(out, map_location="cpu")
    assert model.config.dim == 16 and "width" not in torch.load(out, weights_only=False)["hyper_parameters"]


def test_the_class_recorded_by_the_cli_needs_no_model_option(old, tmp_path, capsys):
    checkpoint = torch.load(old, weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "neat_lightning.modules.ByteLM"  # as LightningCLI records it
    src = tmp_path / "cli.ckpt"
    torch.save(checkpoint, src)
    assert main([str(src), str(tmp_path / "out.ckpt")]) == 0
    assert "format 1 -> 2" in capsys.readouterr().out
    assert main([str(src), str(tmp_path / "x.ckpt"), "--model", "VQVAE"]) == 2
    assert "holds a ByteLM (neat_lightning.modules.ByteLM), but --model names VQVAE" in capsys.readouterr().err


def test_in_place_only_when_asked(old, tmp_path, capsys):
    src = tmp_path / "inplace.ckpt"
    src.write_bytes(old.read_bytes())
    assert main([str(src), str(src), "--model", "ByteLM"]) == 2
    assert "OUT=" in (err := capsys.readouterr().err) and "is IN: pass --in-place" in err
    assert FORMAT_KEY not in torch.load(src, weights_only=False)
    assert main([str(src), str(src), "--model", "ByteLM", "--in-place"]) == 0
    assert torch.load(src, weights_only=False)[FORMAT_KEY] == FORMAT
    assert main([str(src), str(src), "--model", "ByteLM", "--in-place"]) == 0
    assert "already in the current format" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["{old}", "{out}"], r"IN='.*old.ckpt' records no module class \(older checkpoints written outside the neat "
                         r"CLI do not\): pass --model NAME, one of ByteLM, VQVAE"),
    (["{old}", "{out}", "--model", "NoSuchModel"], r"--model='NoSuchModel' is not a module class"),
    (["{old}", "{out}", "--model", "torch.nn.Linear"], r"--model='torch.nn.Linear' is .* not a ResumableModule"),
    (["{missing}", "{out}", "--model", "ByteLM"], r"IN: no such file: '.*missing.ckpt'"),
    (["{newer}", "{out}", "--model", "ByteLM"], r"checkpoint format 3 was written by a newer neat_lightning"),
])
def test_errors_name_the_argument(args, match, old, tmp_path, capsys):
    checkpoint = torch.load(old, weights_only=False)
    checkpoint[FORMAT_KEY] = 3
    torch.save(checkpoint, tmp_path / "newer.ckpt")
    paths = {"old": old, "out": tmp_path / "out.ckpt", "missing": tmp_path / "missing.ckpt",
             "newer": tmp_path / "newer.ckpt"}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neat convert-ckpt: ") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.slow
def test_the_neat_command(old, tmp_path):
    proc = neat("convert-ckpt", str(old), str(tmp_path / "new.ckpt"), "--model", "ByteLM", cwd=tmp_path)
    assert "format 1 -> 2" in proc.stdout and f"wrote {tmp_path / 'new.ckpt'}" in proc.stdout
    assert torch.load(tmp_path / "new.ckpt", weights_only=False)[FORMAT_KEY] == FORMAT
