"""The `neat` CLI end to end, in subprocesses: fit, validate, resume, help, repeated runs, DDP."""

import csv

import pytest
import torch

from neat_lightning.modules.byte_lm import ByteLM
from tests.conftest import neat

CONSTANT_LR = ["--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.003"]


def metrics(run_dir, version=0) -> list[dict]:
    with open(run_dir / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last(rows: list[dict], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


@pytest.mark.slow
def test_fit_validate_and_outputs(tmp_path, tiny_config):
    cfg = tiny_config(max_steps=8, ckpt_every=4)
    neat("fit", "--config", str(cfg), cwd=tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "version_0" / "config.yaml").is_file()
    assert list((run / "version_0").glob("events.out.tfevents.*"))
    rows = metrics(run)
    assert last(rows, "val/bpb") > 0 and last(rows, "train/loss") > 0

    # a second run with the same name never fails on existing files; it gets version_1
    neat("fit", "--config", str(cfg), "--trainer.max_steps", "2", cwd=tmp_path)
    assert (run / "version_1" / "config.yaml").is_file()

    # validate on any text file a user gives
    text = tmp_path / "some.txt"
    text.write_text("Any text a user has lying around, validated byte by byte. " * 20)
    neat("validate", "--config", str(cfg), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
         "--data.val_files", f"[{text}]", cwd=tmp_path)
    val = metrics(run, version=2)
    bpb = last(val, "val/bpb")
    assert 0 < bpb < 9

    model = ByteLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.config.dim == 32

    plots = neat("plot", str(run), cwd=tmp_path).stdout.split()
    assert any(p.endswith("bpb.png") for p in plots) and all((tmp_path / p).is_file() for p in plots)


def test_rich_progress_bar_by_default_unless_disabled(tmp_path, tiny_config, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from neat_lightning.cli import NeatCLI

    monkeypatch.chdir(tmp_path)
    base = ["--config", str(tiny_config()), "--runs_dir", str(tmp_path / "runs")]
    cli = NeatCLI(args=[*base, "--trainer.enable_progress_bar", "true"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    cli = NeatCLI(args=base, run=False)  # the tiny config disables it
    assert cli.trainer.progress_bar_callback is None


@pytest.mark.slow
def test_resume_with_ckpt_path_last_matches_uninterrupted(tmp_path, tiny_config):
    """fit 8 steps == fit 4, stop, `--ckpt_path last`, fit to 8 (constant LR so both schedules agree)."""
    cfg = tiny_config(max_steps=8, ckpt_every=4)
    neat("fit", "--config", str(cfg), "--run_name", "full", *CONSTANT_LR, cwd=tmp_path)
    neat("fit", "--config", str(cfg), "--run_name", "parts", "--trainer.max_steps", "4", *CONSTANT_LR, cwd=tmp_path)
    neat("fit", "--config", str(cfg), "--run_name", "parts", "--ckpt_path", "last", *CONSTANT_LR, cwd=tmp_path)
    full = torch.load(tmp_path / "runs/full/checkpoints/last.ckpt", weights_only=False)
    parts = torch.load(tmp_path / "runs/parts/checkpoints/last.ckpt", weights_only=False)
    assert full["global_step"] == parts["global_step"] == 8
    for key, value in full["state_dict"].items():
        assert torch.equal(value, parts["state_dict"][key]), key


def test_help_and_print_config(tmp_path, tiny_config):
    out = neat("fit", "--help", cwd=tmp_path).stdout
    assert "--run_name" in out and "--checkpoint" in out
    printed = neat("fit", "--config", str(tiny_config()), "--print_config", cwd=tmp_path).stdout
    assert "neat_lightning.modules.ByteLM" in printed and "run_name: tiny" in printed


def test_unknown_command_and_bad_config_key(tmp_path, tiny_config):
    proc = neat("nonsense", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'nonsense'" in proc.stderr
    proc = neat("fit", "--config", str(tiny_config()), "--model.init_args.dimm", "3", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "dimm" in proc.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_config):
    cfg = tiny_config(max_steps=4, ckpt_every=2)
    neat("fit", "--config", str(cfg), "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", cwd=tmp_path, timeout=600)
    ckpt = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert last(metrics(tmp_path / "runs" / "tiny"), "val/bpb") > 0
