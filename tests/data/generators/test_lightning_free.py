"""The generators load without Lightning: importing one in a fresh interpreter pulls in no Lightning module."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")


@pytest.mark.slow  # a fresh interpreter per generator (~4 s each on 2 cores); test_layers.py checks imports statically
@pytest.mark.parametrize("name", ["grids", "math", "scenes", "maze"])
def test_generator_imports_without_lightning(name: str) -> None:
    code = (
        f"import sys, neat_lightning.data.generators.{name}\n"
        f"print(sorted({{m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"neat_lightning.data.generators.{name} loaded {out}"


@pytest.mark.slow  # a fresh interpreter importing Lightning (~10 s on 2 cores)
def test_a_datamodule_file_does_load_lightning() -> None:
    """The check can fail: the DataModule next to a generator imports Lightning."""
    code = "import sys, neat_lightning.data.grids; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"
