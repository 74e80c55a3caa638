"""The `neat` CLI (`neat_lightning/cli.py`): fit, validate, resume, help, repeated runs and DDP end to end in
subprocesses; one-line error reports in process."""

import csv
import re
import sys

import pytest
import torch

from neat_lightning.modules.byte_lm import ByteLM
from tests.commands.test_convert_ckpt import RenamedLM
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

    # validate on any text file a user gives; it names the checkpoint it evaluates
    text = tmp_path / "some.txt"
    text.write_text("Any text a user has lying around, validated byte by byte. " * 20)
    proc = neat("validate", "--config", str(cfg), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                "--data.val_files", f"[{text}]", cwd=tmp_path)
    assert re.search(r"evaluating checkpoint .*last.ckpt \(ByteLM, global step 2, written \d{4}-\d\d-\d\d ",
                     proc.stdout + proc.stderr)
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


def test_progress_bar_counts_steps(tmp_path, tiny_config, capsys, monkeypatch):
    """Sampled windows have no epoch length: a step-bounded run shows one bar of steps, not "Epoch 0/-2"."""
    from neat_lightning.cli import NeatCLI, StepProgressBar

    monkeypatch.chdir(tmp_path)
    cli = NeatCLI(args=["fit", "--config", str(tiny_config(max_steps=9)), "--runs_dir", str(tmp_path / "runs"),
                        "--trainer.enable_progress_bar", "true", "--trainer.limit_val_batches", "0"])
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)
    printed = capsys.readouterr().out
    assert re.search(r"Step\s.*9/9", printed) and "Epoch" not in printed and "/-" not in printed
    assert cli.trainer.global_step == 9  # 9 steps over two epochs of 6 batches: still one bar


def checkpoint_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_fast_dev_run_then_a_real_fit_leaves_the_real_last_ckpt(tmp_path, tiny_config):
    """fast_dev_run writes no checkpoint, so `last.ckpt` after the real fit is the real fit's final step (Lightning
    alone would have written it at step 1 and the real run's as last-v1.ckpt)."""
    cfg = tiny_config(max_steps=8, ckpt_every=4)
    neat("fit", "--config", str(cfg), "--trainer.fast_dev_run", "true", cwd=tmp_path)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert not list(checkpoints.glob("*.ckpt"))
    neat("fit", "--config", str(cfg), cwd=tmp_path)
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 8


@pytest.mark.slow
def test_a_run_stopped_between_saves_leaves_its_final_step_in_last_ckpt(tmp_path, tiny_config):
    """max_steps off the save period (as when max_time stops a run): Lightning alone keeps the step-4 save in
    last.ckpt, since its train-end save is skipped once any periodic save wrote last.ckpt."""
    cfg = tiny_config(max_steps=6, ckpt_every=4)
    neat("fit", "--config", str(cfg), cwd=tmp_path)
    assert checkpoint_step(tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_the_same_config_fitted_twice_leaves_the_second_runs_last_ckpt(tmp_path, tiny_config):
    """The second fit into a run directory replaces `last.ckpt` (and says so); `--ckpt_path last` then resumes it."""
    cfg = tiny_config(max_steps=8, ckpt_every=4)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    neat("fit", "--config", str(cfg), cwd=tmp_path)
    first = (checkpoints / "last.ckpt").stat().st_mtime_ns
    proc = neat("fit", "--config", str(cfg), cwd=tmp_path)
    assert (checkpoints / "last.ckpt").stat().st_mtime_ns > first
    assert re.search(r"this run replaces .*last.ckpt \(ByteLM, global step 8, ", proc.stdout + proc.stderr)
    neat("fit", "--config", str(cfg), "--trainer.max_steps", "4", cwd=tmp_path)  # the same config, a shorter run
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 4
    proc = neat("fit", "--config", str(cfg), "--ckpt_path", "last", cwd=tmp_path)  # resumes the newest: 4 -> 8
    assert re.search(r"resumed from checkpoint .*last.ckpt \(ByteLM, global step 4, ", proc.stdout + proc.stderr)
    assert checkpoint_step(checkpoints / "last.ckpt") == 8


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


@pytest.mark.slow  # two fresh interpreters importing lightning
def test_help_and_print_config(tmp_path, tiny_config):
    out = neat("fit", "--help", cwd=tmp_path).stdout
    assert "--run_name" in out and "--checkpoint" in out
    printed = neat("fit", "--config", str(tiny_config()), "--print_config", cwd=tmp_path).stdout
    assert "neat_lightning.modules.ByteLM" in printed and "run_name: tiny" in printed


@pytest.mark.slow  # two fresh interpreters importing lightning
def test_unknown_command_and_bad_config_key(tmp_path, tiny_config):
    proc = neat("nonsense", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'nonsense'" in proc.stderr
    proc = neat("fit", "--config", str(tiny_config()), "--model.init_args.dimm", "3", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "dimm" in proc.stderr


def test_help_print_config_and_unknown_command_in_process(tmp_path, tiny_config, capsys, monkeypatch):
    from neat_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["neat"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "--run_name" in (out := capsys.readouterr().out) and "--checkpoint" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny_config()), "--print_config"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "neat_lightning.modules.ByteLM" in printed and "run_name: tiny" in printed
    assert main(["nonsense"]) == 2
    assert "neat: unknown command 'nonsense'; commands: fit, validate, test, predict, convert-ckpt" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_config):
    cfg = tiny_config(max_steps=4, ckpt_every=2)
    neat("fit", "--config", str(cfg), "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", cwd=tmp_path, timeout=600)
    ckpt = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert last(metrics(tmp_path / "runs" / "tiny"), "val/bpb") > 0


# -- one-line errors (neat_lightning.cli.main) -----------------------------------------------------------------------


@pytest.mark.parametrize("message, line", [
    ('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc',
     "--trainer.max_steps: Expected int. Got value: abc"),
    ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class \'x\'>]\n'
     '  Errors:\n    - Problem with given class_path \'neat_lightning.modules.ByteLM\':\n        Parser key "dim":\n'
     "          Expected a <class 'int'>. Got value: wide\n    - Expected a <class 'NoneType'>\n"
     "  Given value type: <class 'str'>\n  Given value: wide",
     "--model.init_args.dim (neat_lightning.modules.ByteLM): Expected int. Got value: wide"),
    ('Parser key "model":\n\n  - Expected a path but a.B either not accessible or invalid\n  - Does not validate '
     "against any of the Union subtypes\n  Errors:\n    - Problem with given class_path 'a.B':\n"
     "        module 'a' has no attribute 'B'",
     "--model (a.B): module 'a' has no attribute 'B'"),
    ("unrecognized arguments: --trainer.max_stepz 3", "unrecognized arguments: --trainer.max_stepz 3"),
    ('Parser key "model":\n  Errors:\n    - Problem with given class_path \'a.B\':\n        Option \'dimm\' is not '
     "accepted\n    - Expected a <class 'NoneType'>\n  Given value type: <class 'x'>\n  Given value: "
     "NestedArg(key='dimm', val='3')",
     "--model.init_args.dimm=3 (a.B): Option 'dimm' is not accepted"),
    ('Parser key "trainer.precision":\n  Expected a typing.Literal[16, 32]\n  Given value: 99',
     "--trainer.precision=99: Expected a typing.Literal[16, 32]"),
])
def test_parser_messages_condense_to_the_option_and_the_rule(message, line):
    from neat_lightning.cli import condense_parser_message

    assert condense_parser_message(message) == line


class FailsInTrainingStep(ByteLM):
    def training_step(self, batch, batch_idx):
        raise ValueError("raised by training_step")


def test_an_error_once_the_loop_runs_keeps_its_traceback(tmp_path, tiny_config, monkeypatch):
    """Only errors raised while parsing, building and setting up are the user's input; later ones propagate."""
    from neat_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEAT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["neat"])
    config = tiny_config()
    config.write_text(config.read_text().replace("neat_lightning.modules.ByteLM", f"{__name__}.FailsInTrainingStep"))
    with pytest.raises(ValueError, match="raised by training_step"):
        main(["fit", "--config", str(config)])


def test_an_older_checkpoint_whose_arguments_changed_names_the_conversion(tmp_path, tiny_config, capsys, monkeypatch):
    """LightningCLI reads --ckpt_path's hyperparameters into the config: old names are caught first."""
    from neat_lightning.cli import main
    from tests.commands.test_convert_ckpt import save_format_1

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEAT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["neat"])
    old = save_format_1(RenamedLM, tmp_path / "old.ckpt", rename=True)
    checkpoint = torch.load(old, weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = f"{RenamedLM.__module__}.RenamedLM"
    torch.save(checkpoint, old)
    config = tiny_config()
    config.write_text(config.read_text().replace("neat_lightning.modules.ByteLM", f"{RenamedLM.__module__}.RenamedLM"))
    assert main(["validate", "--config", str(config), "--ckpt_path", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"--ckpt_path: checkpoint '.*old.ckpt' is format 1; RenamedLM's arguments changed since "
                     r"\(hyperparameter width -> dim\). Convert it once: neat convert-ckpt .*old.ckpt NEW.ckpt --model "
                     r"tests.commands.test_convert_ckpt.RenamedLM", err), err
