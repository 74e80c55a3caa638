"""Shared fixtures: tiny configs, a subprocess runner for the `neat` CLI, the mid-run resume check of the lattice
modules, and quiet process-wide settings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two cores: one intra-op thread per test process by default, so the suite's timings are stable. OMP_NUM_THREADS
# overrides it: training-outcome margins are measured under OMP_NUM_THREADS=1 and =2 (float reductions split
# differently across threads, as they do across AVX2 and AVX-512 kernels).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def neat(*args: str, cwd: Path | str, timeout: float = 300, check: bool = True, env: dict | None = None):
    """Run the `neat` console entry point in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "neat_lightning.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neat {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc



def assert_lattice_resume_is_exact(tmp_path: Path, run: Callable[[Path, Any, str | None], Any],
                                   at: int = 2) -> tuple[Any, Any, Path]:
    """Train a lattice module uninterrupted, then again resumed from its step-``at`` checkpoint, and assert the two
    end identical: every state-dict entry (the first differing one is named), the plasticity profile and the sparsity.

    ``run(root, checkpoint, ckpt_path)`` seeds, builds and fits a fresh module under ``root`` with ``checkpoint`` (a
    ModelCheckpoint every ``at`` steps) among its callbacks, from ``ckpt_path`` when given, and returns the module.
    Returns ``(full, resumed, path of the step-at checkpoint)`` for the caller's own checks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root: str, ckpt: str | None = None):
        every = ModelCheckpoint(dirpath=tmp_path / root, every_n_train_steps=at, save_top_k=-1)
        return run(tmp_path / root, every, ckpt)

    full = fit("full")
    mid = next(p for p in (tmp_path / "full").glob("*.ckpt") if f"step={at}" in p.name)
    resumed = fit("resumed", str(mid))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.profile == full.profile and resumed.sparsity == full.sparsity
    return full, resumed, mid

TINY_BYTE_LM = """\
run_name: tiny
seed_everything: 7
trainer:
  max_steps: {max_steps}
  val_check_interval: 4
  check_val_every_n_epoch: null
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  deterministic: true
checkpoint:
  every_n_train_steps: {ckpt_every}
model:
  class_path: neat_lightning.modules.ByteLM
  init_args: {{dim: 32, n_layers: 1, heads: 2, block_size: 32, warmup_steps: 2, learning_rate: 0.003}}
data:
  class_path: neat_lightning.data.ByteTextDataModule
  init_args: {{block_size: 32, batch_size: 4, batches_per_epoch: 6}}
"""


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write a tiny ByteLM config; returns a function (max_steps, ckpt_every) -> path."""

    def make(max_steps: int = 8, ckpt_every: int = 4, name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(TINY_BYTE_LM.format(max_steps=max_steps, ckpt_every=ckpt_every))
        return path

    return make


@pytest.fixture(autouse=True)
def seed_offset(monkeypatch):
    """``NEAT_TEST_SEED_OFFSET=k`` shifts every ``lightning.seed_everything(s)`` a test calls to ``s + k``: how the
    margins of training-outcome tests are measured across seeds (see their docstrings). Unset: seeds as written."""
    offset = int(os.environ.get("NEAT_TEST_SEED_OFFSET", "0"))
    if offset:
        import lightning

        original = lightning.seed_everything
        monkeypatch.setattr(lightning, "seed_everything", lambda seed=None, *a, **k: original(
            (seed or 0) + offset, *a, **k))
