"""The error catalogue: every user-facing bad input gives a clear message naming the file, field or value.

Each entry is one bad input and the message it must produce (pinned with a regex). Module-specific entries (VQVAE
shapes, scene files, lattice configs...) join this list as those modules land; their own test files keep the
detailed cases.
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


@pytest.mark.parametrize("name, fn, exc, match", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(name, fn, exc, match, tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(exc, match=match):
        fn(tmp_path, ckpt)


# -- CLI-level bad inputs (subprocess: jsonargparse prints to stderr and exits) -----------------------------------

CLI_CATALOGUE = [
    ("unknown config key", ["--model.init_args.dimm", "3"], r"dimm"),
    ("wrong type", ["--model.init_args.dim", "wide"], r"dim.*wide|wide.*dim"),
    ("missing config file", ["--config", "does/not/exist.yaml"], r"does/not/exist.yaml"),
    ("unknown model class", ["--model", "neat_lightning.modules.NoSuchModel"], r"NoSuchModel"),
]


@pytest.mark.parametrize("name, args, match", CLI_CATALOGUE, ids=[c[0] for c in CLI_CATALOGUE])
def test_bad_cli_input(name, args, match, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    base = [] if "--config" in args else ["--config", str(repo / "configs" / "byte_lm_quickstart.yaml")]
    proc = neat("fit", *base, *args, "--print_config", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert re.search(match, proc.stderr), proc.stderr[-2000:]


def test_bad_yaml_syntax_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  class_path: [unclosed\n")
    proc = neat("fit", "--config", str(bad), cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert re.search(r"--config .*broken.yaml: invalid YAML at line 3, column 1", proc.stderr), proc.stderr


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
