"""The error catalogue: every user-facing bad input gives a clear message naming the file, field or value.

Each entry is one bad input and the message it must produce (pinned with a regex). ``CATALOGUE`` calls the library;
``CLI_CATALOGUE`` runs the ``neat`` command, which reports a configuration or input error in one line on stderr with
exit code 2 (in process for speed; the same cases run as real subprocesses in the slow tier). Module-specific cases
(VQVAE shapes, scene files, lattice configs...) live in the modules' own test files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from neat_lightning.cli import NeatCLI, configure_process
from tests.conftest import neat


def _tiny_lm(**kw):
    from neat_lightning.modules import ByteLM

    return ByteLM(**{"dim": 32, "n_layers": 1, "heads": 2, "block_size": 16, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A real, complete ByteLM checkpoint."""
    from neat_lightning.data import ByteTextDataModule

    root = tmp_path_factory.mktemp("ckpt")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(_tiny_lm(), ByteTextDataModule(block_size=16, batch_size=2))
    trainer.save_checkpoint(root / "good.ckpt")
    return root / "good.ckpt"


def cli(tmp_path, *args):
    configure_process()
    return NeatCLI(args=[*args, "--runs_dir", str(tmp_path / "runs")])  # raises before anything runs


# -- the catalogue -----------------------------------------------------------------------------------------------
# (id, callable(tmp_path, ckpt) that must raise, exception type, message regex)


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def _data(**kw):
    from neat_lightning.data import ByteTextDataModule

    dm = ByteTextDataModule(**kw)
    dm.setup()


def _truncated(tmp_path, ckpt):
    data = ckpt.read_bytes()
    return _write(tmp_path, "truncated.ckpt", data[: len(data) // 2])


def _load(path):
    from neat_lightning.modules import ByteLM

    ByteLM.load_from_checkpoint(path, map_location="cpu")


def _mismatched(tmp_path, ckpt):
    """A config with dim=64 loading a dim=32 checkpoint through the Trainer (as `neat validate` does)."""
    from neat_lightning.data import ByteTextDataModule

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1)
    trainer.validate(_tiny_lm(dim=64), ByteTextDataModule(block_size=16, batch_size=2), ckpt_path=ckpt, verbose=False)


def _nan_loss(tmp_path, ckpt):
    from neat_lightning.data import ByteTextDataModule

    model = _tiny_lm(learning_rate=1e30, warmup_steps=1)  # diverges within a few steps
    trainer = L.Trainer(accelerator="cpu", max_steps=50, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, ByteTextDataModule(block_size=16, batch_size=2))


def _protocol_mismatch(tmp_path, ckpt):
    from neat_lightning.callbacks import DecoderBLEUMonitor
    from neat_lightning.data import ByteTextDataModule

    class NotAGenerator(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[:, :1].float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        callbacks=[DecoderBLEUMonitor(prompts=["a"], references=["b"])])
    trainer.fit(NotAGenerator(), ByteTextDataModule(block_size=16, batch_size=2))


CATALOGUE = [
    ("train file missing", lambda t, c: _data(train_files=[str(t / "nope.txt")]), FileNotFoundError,
     r"train_files: no such file: '.*nope.txt'"),
    ("train glob matches nothing", lambda t, c: _data(train_files=[str(t / "*.none")]), FileNotFoundError,
     r"train_files: the glob '.*\*\.none' matches no file"),
    ("val file missing", lambda t, c: _data(val_files=[str(t / "val.txt")]), FileNotFoundError,
     r"val_files: no such file: '.*val.txt'"),
    ("directory given as a file", lambda t, c: _data(train_files=[str(t)]), IsADirectoryError, r"is a directory"),
    ("empty corpus", lambda t, c: _data(train_files=[_write(t, "e.txt", "")]), ValueError,
     r"train_files=.*e.txt.*: the corpus is empty \(0 bytes in 1 documents\)"),
    ("corpus shorter than a window", lambda t, c: _data(train_files=[_write(t, "s.txt", "abc")],
                                                          val_files=[_write(t, "v.txt", "abc")], block_size=64),
     ValueError, r"train split has 3 bytes, fewer than one window of block_size \+ 1 = 65"),
    ("empty validation file", lambda t, c: _data(val_files=[_write(t, "v0.txt", "")]), ValueError,
     r"val_files=.*v0.txt.*: the val split is empty"),
    ("missing HF dataset dir", lambda t, c: _data(hf_path=str(t / "ds")), FileNotFoundError,
     r"hf_path: no such dataset directory"),
    ("two training sources", lambda t, c: _data(train_files=["a"], hf_path="b"), ValueError,
     r"at most one training source"),
    ("block_size 0", lambda t, c: _data(block_size=0), ValueError, r"block_size=0 must be >= 1"),
    ("val_fraction out of range", lambda t, c: _data(val_fraction=0.0), ValueError, r"val_fraction=0.0 must be in"),
    ("heads do not divide dim", lambda t, c: _tiny_lm(dim=30, heads=4), ValueError,
     r"dim=30 must be divisible by heads=4"),
    ("odd head dim", lambda t, c: _tiny_lm(dim=6, heads=2), ValueError, r"dim_head=3 .* must be even"),
    ("window 0", lambda t, c: _tiny_lm(window=0), ValueError, r"window=0 must be >= 1 or None"),
    ("checkpoint missing", lambda t, c: _load(t / "none.ckpt"), FileNotFoundError,
     r"checkpoint: no such file: '.*none.ckpt'"),
    ("checkpoint truncated", lambda t, c: _load(_truncated(t, c)), ValueError,
     r"'.*truncated.ckpt' is not a complete checkpoint \(\d+ bytes; truncated"),
    ("checkpoint is not a checkpoint", lambda t, c: _load(_write(t, "text.ckpt", "hello")), ValueError,
     r"'.*text.ckpt' is not a complete checkpoint"),
    ("checkpoint does not match config", _mismatched, ValueError,
     r"does not match this ByteLM's configuration. Differing fields: .*dim: checkpoint=32, config=64.*"
     r"First mismatched tensor: model.embed.weight \(260, 32\) in checkpoint vs \(260, 64\) here"),
    ("--ckpt_path truncated", lambda t, c: cli(t, "validate", "--config", "configs/byte_lm_quickstart.yaml",
                                                "--ckpt_path", _truncated(t, c)),
     ValueError, r"--ckpt_path: '.*truncated.ckpt' is not a complete checkpoint"),
    ("--ckpt_path missing", lambda t, c: cli(t, "validate", "--config", "configs/byte_lm_quickstart.yaml",
                                              "--ckpt_path", str(t / "gone.ckpt")),
     FileNotFoundError, r"--ckpt_path: no such file: '.*gone.ckpt'"),
    ("NaN / inf loss", _nan_loss, FloatingPointError,
     r"ByteLM: the training loss is (nan|inf) at global step \d+.*last checkpoint is intact"),
    ("callback on a module lacking its protocol", _protocol_mismatch, TypeError,
     r"DecoderBLEUMonitor needs a module implementing the TextGenerator protocol, but NotAGenerator lacks "
     r"`generate_text`"),
]


# -- byte stores (`neat prepare`, ByteTextDataModule(data_dir=...)) and built-in corpora


def _store(tmp_path, damage=None):
    """A two-shard byte store, optionally damaged by ``damage(store_dir)``; returns its path."""
    import json as _json

    from neat_lightning.data.byte_store import write_store
    from neat_lightning.data.generators.corpus import Document

    out = tmp_path / "store"
    write_store(out, [Document(f"d{i}", b"some text " * 20) for i in range(4)], shard_bytes=500)
    damages = {
        "newer": lambda d: (d / "manifest.json").write_text(
            _json.dumps({**_json.loads((d / "manifest.json").read_text()), "format": 2})),
        "not json": lambda d: (d / "manifest.json").write_text("{oops"),
        "truncated": lambda d: (d / "shard-00000.bin").write_bytes((d / "shard-00000.bin").read_bytes()[:-3]),
        "missing": lambda d: (d / "shard-00001.bin").unlink(),
        "flipped": lambda d: (d / "shard-00000.bin").write_bytes(b"X" + (d / "shard-00000.bin").read_bytes()[1:]),
    }
    if damage:
        damages[damage](out)
    return str(out)


def _verify(path):
    from neat_lightning.data.byte_store import ByteStore

    ByteStore(path, "--verify").verify()


def _prepare(tmp_path, inputs, out):
    from neat_lightning.commands.prepare import prepare_store

    prepare_store(out, input=inputs)


CATALOGUE += [
    ("byte store missing", lambda t, c: _data(data_dir=str(t / "nostore")), FileNotFoundError,
     r"data_dir: no such byte store: '.*nostore'"),
    ("directory that is not a byte store", lambda t, c: _data(data_dir=str(t)), ValueError,
     r"data_dir: '.*' is not a byte store \(no manifest.json\); write one with `neat prepare --input FILES --out"),
    ("byte store of a newer format", lambda t, c: _data(data_dir=_store(t, "newer")), ValueError,
     r"data_dir: '.*store' was written by a newer neat_lightning \(store format 2\); this version reads formats "
     r"up to 1"),
    ("byte store manifest not JSON", lambda t, c: _data(data_dir=_store(t, "not json")), ValueError,
     r"data_dir: '.*store': manifest.json is not valid JSON"),
    ("byte store shard truncated", lambda t, c: _data(data_dir=_store(t, "truncated")), ValueError,
     r"data_dir: '.*store': shard 'shard-00000.bin' has 497 bytes, the manifest says 500 \(truncated or replaced\)"),
    ("byte store shard missing", lambda t, c: _data(data_dir=_store(t, "missing")), FileNotFoundError,
     r"data_dir: '.*store': shard 'shard-00001.bin' is missing"),
    ("byte store checksum mismatch", lambda t, c: _verify(_store(t, "flipped")), ValueError,
     r"--verify: '.*store': shard 'shard-00000.bin' does not match its checksum \(sha256 [0-9a-f]{16}\.\.\., the "
     r"manifest says [0-9a-f]{16}\.\.\.\)"),
    ("byte store and train files together", lambda t, c: _data(train_files=["a"], data_dir="b"), ValueError,
     r"give at most one training source: train_files, data_dir, hf_path, hf_data_files or dataset"),
    ("prepare an empty input", lambda t, c: _prepare(t, [_write(t, "e.txt", "")], t / "out"), ValueError,
     r"--input: the input is empty \(0 bytes in 1 documents\)"),
    ("prepare over an existing directory", lambda t, c: _prepare(t, [_write(t, "a.txt", "abc")], t), FileExistsError,
     r"--out: '.*' already exists; pass --overwrite to replace it"),
    ("prepare a glob that matches nothing", lambda t, c: _prepare(t, [str(t / "*.none")], t / "out"),
     FileNotFoundError, r"--input: the glob '.*\*\.none' matches no file"),
    ("unknown built-in corpus", lambda t, c: _data(builtin="wiki"), ValueError,
     r"builtin='wiki' is not a built-in corpus; choose one of \['pydoc_topics', 'stdlib_docs', 'stdlib_code'\]"),
]



# -- `neat score` / `neat report --ood`


def _score_inputs(patterns, field="--input"):
    from neat_lightning.commands.score import read_inputs

    read_inputs([str(p) for p in patterns], field)


def _score_settings(**kw):
    from neat_lightning.commands.score import ScoreSettings

    ScoreSettings(**kw)


def _score_checkpoint_of(tmp_path, class_path):
    from neat_lightning.commands.score import load_scorer

    torch.save({"hyper_parameters": {"_class_path": class_path}}, tmp_path / "other.ckpt")
    load_scorer(tmp_path / "other.ckpt")


CATALOGUE += [
    ("score an empty input", lambda t, c: _score_inputs([_write(t, "e.txt", "")]), ValueError,
     r"--input: the input is empty \(0 bytes in 1 files\)"),
    ("score a missing input", lambda t, c: _score_inputs([t / "none.txt"]), FileNotFoundError,
     r"--input: no such file: '.*none.txt'"),
    ("report an out-of-domain glob that matches nothing", lambda t, c: _score_inputs([t / "*.none"], "--ood"),
     FileNotFoundError, r"--ood: the glob '.*\*\.none' matches no file"),
    ("score with a stride longer than the context", lambda t, c: _score_settings(context=16, stride=32), ValueError,
     r"--stride=32 must be in \[1, --context=16\]"),
    ("score with no steps per window", lambda t, c: _score_settings(steps=0), ValueError, r"--steps=0 must be >= 1"),
    ("score with a learning rate <= 0", lambda t, c: _score_settings(lr=0.0), ValueError,
     r"--lr=0.0 must be a finite number > 0"),
    ("score a checkpoint that does not predict bytes",
     lambda t, c: _score_checkpoint_of(t, "neat_lightning.modules.VQVAE"), ValueError,
     r"--ckpt: checkpoint '.*other.ckpt' holds a VQVAE, which does not predict bytes; neat score takes a ByteLM or "
     r"NeatModel checkpoint"),
]

# -- mazes and the maze lattice


def _maze_data(**kw):
    from neat_lightning.data.maze import MazeDataModule

    MazeDataModule(**kw)


def _maze_solver(**kw):
    from neat_lightning.modules.lattice_maze import MAZE_LATTICE, LatticeMazeSolver

    LatticeMazeSolver(lattice={**MAZE_LATTICE.__dict__, **kw})


def _maze_training_size(tmp_path):
    from neat_lightning.data.maze import MazeDataModule
    from neat_lightning.modules.lattice_maze import LatticeMazeSolver

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(LatticeMazeSolver(), MazeDataModule(size=11, batch_size=2))


def _stage_threshold():
    from neat_lightning.callbacks.plasticity_stages import PlasticityStages, Stage

    PlasticityStages([Stage(0, "balanced", activity_threshold=0.5), Stage(5, "learning", activity_threshold=1.0)])


CATALOGUE += [
    ("maze side even", lambda t, c: _maze_data(size=10), ValueError,
     r"size=10 must be an odd number of cells >= 5 \(2 \* rooms \+ 1, at least 2 rooms\)"),
    ("maze lattice not thin", lambda t, c: _maze_solver(depth=3), ValueError,
     r"lattice.depth=3 must be 1: the maze is the one plane of a thin lattice"),
    ("maze lattice without working channels", lambda t, c: _maze_solver(channels=4), ValueError,
     r"lattice.channels=4 must be > 4: the first 4 channels hold the maze"),
    ("maze of another size than the lattice", lambda t, c: _maze_training_size(t), ValueError,
     r"training maze side 11 differs from lattice.height=9"),
    ("stage activity threshold out of range", lambda t, c: _stage_threshold(), ValueError,
     r"stages\[1\].activity_threshold=1.0 must be in \[0, 1\)"),
]


def _sleep_callback(**kw):
    from neat_lightning.callbacks import SleepWakeConsolidation

    SleepWakeConsolidation(**kw)


CATALOGUE += [
    ("episodic buffer of no windows", lambda t, c: _tiny_lm(episodic={"capacity": 0}), ValueError,
     r"EpisodicConfig.capacity=0 must be >= 1"),
    ("Titans surprise on a model without Titans", lambda t, c: _tiny_lm(episodic={"surprise": "titans"}),
     ValueError, r"episodic.surprise='titans': ByteLM has no Titans memory; use 'loss'"),
    ("sleep callback mode unknown", lambda t, c: _sleep_callback(mode="dream"), ValueError,
     r"SleepWakeConsolidation mode='dream' must be 'sleep' or 'replay'"),
    ("sleep rate backoff out of range", lambda t, c: _sleep_callback(rate_backoff=1.5), ValueError,
     r"SleepWakeConsolidation rate_backoff=1.5 must be in \(0, 1\)"),
]


# -- memory tasks

def _math_data(**kw):
    from neat_lightning.data.math import MathDataModule

    return MathDataModule(**kw)


CATALOGUE += [
    ("mqar facts warm-up without n_facts", lambda t, c: _math_data(tasks=["mqar"], facts_warmup=5), ValueError,
     r"facts_warmup=5 needs n_facts set"),
    ("mqar with no queries", lambda t, c: _math_data(tasks=["mqar"], n_facts=4, queries=0), ValueError,
     r"queries=0 must be >= 1"),
    ("needle depth out of [0, 1]", lambda t, c: _math_data(tasks=["needle"], depth_range=(0.0, 2.0)), ValueError,
     r"depth_range=\(0.0, 2.0\) must satisfy 0 <= min <= max <= 1"),
]


@pytest.mark.parametrize("name, fn, exc, match", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(name, fn, exc, match, tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(exc, match=match):
        fn(tmp_path, ckpt)


# -- the `neat` command: one line on stderr naming the field, the value and the rule; exit code 2 ------------------
# (id, arguments, regex the one error line must match). Placeholders: {quickstart} and {vqvae} (shipped configs),
# {bleu} (the BLEU monitor fragment), {ckpt} (a ByteLM checkpoint written by a plain Trainer), {classless_ckpt} (the
# same without its module class, as older checkpoints are), {cli_ckpt} (the same, with the classes LightningCLI
# records), {newer_ckpt} (a checkpoint of a future format), {truncated_ckpt} (its
# first 1000 bytes), {empty} (an empty text file), {broken} (invalid YAML).

CLI_CATALOGUE = [
    ("unknown config key", ["fit", "--config", "{quickstart}", "--model.init_args.dimm", "3", "--print_config"],
     r"--model.init_args.dimm=3 \(neat_lightning.modules.ByteLM\): Option 'dimm' is not accepted"),
    ("wrong type", ["fit", "--config", "{quickstart}", "--model.init_args.dim", "wide", "--print_config"],
     r"--model.init_args.dim \(neat_lightning.modules.ByteLM\): Expected int. Got value: wide"),
    ("missing config file", ["fit", "--config", "does/not/exist.yaml", "--print_config"],
     r"--config: no such file: 'does/not/exist.yaml'"),
    ("unknown model class", ["fit", "--config", "{quickstart}", "--model", "neat_lightning.modules.NoSuchModel",
                             "--print_config"],
     r"--model \(neat_lightning.modules.NoSuchModel\): module 'neat_lightning.modules' has no attribute 'NoSuchModel'"),
    ("bad YAML syntax", ["fit", "--config", "{broken}"], r"--config .*broken.yaml: invalid YAML at line 3, column 1"),
    ("model argument against its rule", ["fit", "--config", "{quickstart}", "--model.init_args.dim", "-3",
                                         "--trainer.fast_dev_run", "true"],
     r"^neat fit: model ByteLM: dim=-3 must be divisible by heads=4 \(--debug shows the traceback\)$"),
    ("callback argument against its rule",
     ["fit", "--config", "{quickstart}", "--config", "{bleu}", "--trainer.callbacks+.every_n_steps", "0",
      "--trainer.fast_dev_run", "true"],
     r"^neat fit: callback DecoderBLEUMonitor: every_n_steps=0 must be >= 1"),
    ("trainer argument Lightning refuses", ["fit", "--config", "{quickstart}", "--trainer.strategy", "nosuch"],
     r"^neat fit: trainer Trainer: You selected an invalid strategy name: `strategy='nosuch'`"),
    ("empty validation file", ["fit", "--config", "{quickstart}", "--data.val_files", "[{empty}]",
                               "--trainer.fast_dev_run", "true"],
     r"^neat fit: data ByteTextDataModule: val_files=\['.*empty.txt'\]: the val split is empty \(0 bytes"),
    ("checkpoint of another model (class recorded by the CLI)",
     ["validate", "--config", "{vqvae}", "--ckpt_path", "{cli_ckpt}"],
     r"^neat validate: --ckpt_path: checkpoint '.*cli.ckpt' holds a ByteLM, the config's model is VQVAE "
     r"\(neat_lightning.modules.VQVAE\); it was trained on ByteTextDataModule, the config's data is ImageDataModule"),
    ("checkpoint of another model (class from its hyperparameters)",
     ["validate", "--config", "{vqvae}", "--ckpt_path", "{classless_ckpt}"],
     r"--ckpt_path: checkpoint '.*classless.ckpt' holds a ByteLM, the config's model is VQVAE"),
    ("callback on a module lacking its protocol", ["fit", "--config", "{vqvae}", "--config", "{bleu}",
                                                   "--trainer.fast_dev_run", "true"],
     r"^neat fit: callback DecoderBLEUMonitor: DecoderBLEUMonitor needs a module implementing the TextGenerator "
     r"protocol, but VQVAE lacks `generate_text`"),
    ("checkpoint truncated", ["validate", "--config", "{quickstart}", "--ckpt_path", "{truncated_ckpt}"],
     r"^neat validate: --ckpt_path: '.*truncated.ckpt' is not a complete checkpoint \(\d+ bytes; truncated"),
    ("checkpoint of a newer format", ["validate", "--config", "{quickstart}", "--ckpt_path", "{newer_ckpt}"],
     r"--ckpt_path: checkpoint '.*newer.ckpt': checkpoint format 3 was written by a newer neat_lightning; this "
     r"version reads formats up to 2"),
]


@pytest.fixture(scope="module")
def cli_inputs(ckpt, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_inputs")
    repo = Path(__file__).resolve().parents[1]
    checkpoint = torch.load(ckpt, weights_only=False)
    torch.save({**checkpoint, "hyper_parameters": {k: v for k, v in checkpoint["hyper_parameters"].items()
                                                   if k != "_class_path"}}, root / "classless.ckpt")
    checkpoint["hyper_parameters"]["_class_path"] = "neat_lightning.modules.ByteLM"  # as LightningCLI records them
    checkpoint["datamodule_hyper_parameters"] = {"_class_path": "neat_lightning.data.ByteTextDataModule"}
    torch.save(checkpoint, root / "cli.ckpt")
    checkpoint["neat_format"] = 3
    torch.save(checkpoint, root / "newer.ckpt")
    (root / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:1000])
    (root / "empty.txt").write_text("")
    (root / "broken.yaml").write_text("model:\n  class_path: [unclosed\n")
    return {"quickstart": str(repo / "configs" / "byte_lm_quickstart.yaml"),
            "vqvae": str(repo / "configs" / "vqvae_quickstart.yaml"),
            "bleu": str(repo / "callbacks" / "bleu_monitor.yaml"), "ckpt": str(ckpt),
            **{name: str(root / name.replace("_", ".")) for name in ("cli_ckpt", "newer_ckpt", "truncated_ckpt",
                                                                    "classless_ckpt")},
            "empty": str(root / "empty.txt"), "broken": str(root / "broken.yaml")}


def cli_args(args: list[str], inputs: dict[str, str], tmp_path: Path) -> list[str]:
    return [a.format(**inputs) for a in args] + ["--runs_dir", str(tmp_path / "runs")]


def the_error_line(stderr: str) -> str:
    """The one ``neat ...:`` line of ``stderr``; fails on a traceback or on several error lines."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("neat")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("name, args, match", CLI_CATALOGUE, ids=[c[0] for c in CLI_CATALOGUE])
def test_bad_cli_input(name, args, match, tmp_path, cli_inputs, capsys, monkeypatch):
    """In process (``neat_lightning.cli.main``): exit code 2 and one line."""
    from neat_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEAT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["neat"])
    assert main(cli_args(args, cli_inputs, tmp_path)) == 2
    assert re.search(match, the_error_line(capsys.readouterr().err))


@pytest.mark.slow
@pytest.mark.parametrize("name, args, match", CLI_CATALOGUE, ids=[c[0] for c in CLI_CATALOGUE])
def test_bad_cli_input_subprocess(name, args, match, tmp_path, cli_inputs):
    """The real `neat` command in a fresh interpreter: exit code 2 and one line on stderr."""
    proc = neat(*cli_args(args, cli_inputs, tmp_path), cwd=tmp_path, check=False, timeout=180,
                env={"NEAT_DEBUG": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(match, the_error_line(proc.stderr))


def test_debug_shows_the_traceback(tmp_path, cli_inputs, capsys, monkeypatch):
    """``--debug`` (taken out before LightningCLI parses) or ``NEAT_DEBUG=1``: the original exception propagates."""
    from neat_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEAT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["neat"])
    args = cli_args(["fit", "--config", "{quickstart}", "--model.init_args.dim", "-3"], cli_inputs, tmp_path)
    with pytest.raises(ValueError, match=r"dim=-3 must be divisible by heads=4"):
        main([*args, "--debug"])
    monkeypatch.setenv("NEAT_DEBUG", "1")
    with pytest.raises(ValueError, match=r"Does not validate"):  # jsonargparse's wrapper, caused by the module's
        main(args)


@pytest.mark.slow
def test_debug_shows_the_traceback_subprocess(tmp_path, cli_inputs):
    args = cli_args(["fit", "--config", "{quickstart}", "--model.init_args.dim", "-3"], cli_inputs, tmp_path)
    proc = neat(*args, "--debug", cwd=tmp_path, check=False, timeout=180)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "ValueError: dim=-3 must be divisible by heads=4" in proc.stderr


def test_catalogue_size():
    assert len(CATALOGUE) + len(CLI_CATALOGUE) + 1 >= 25


# -- a killed run leaves its last good checkpoint loadable --------------------------------------------------------


@pytest.mark.slow
def test_killed_mid_save_leaves_a_loadable_checkpoint_and_resumes(tmp_path, tiny_config):
    """Checkpoint every step, SIGKILL the run while it saves, then load `last.ckpt` and resume to the end."""
    cfg = tiny_config(max_steps=400, ckpt_every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "neat_lightning.cli", "fit", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    time.sleep(1.5)  # several more saves are under way; one is likely mid-write when the kill lands
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    model = _load_ok(last)
    step = torch.load(last, weights_only=False)["global_step"]
    assert 0 < step < 400 and model is not None
    leftovers = [p.name for p in last.parent.iterdir() if not p.name.endswith(".ckpt")]
    assert not leftovers or all(".tmp" in n or n.startswith(".") for n in leftovers)
    neat("fit", "--config", str(tiny_config(max_steps=step + 3, ckpt_every=1)), "--ckpt_path", "last", cwd=tmp_path)
    assert torch.load(last, weights_only=False)["global_step"] == step + 3


def _load_ok(path):
    from neat_lightning.modules import ByteLM

    return ByteLM.load_from_checkpoint(path, map_location="cpu")
