"""examples/external_project runs from the built wheel in a fresh venv, outside the repository.

The fresh venv gets neat_lightning only from the wheel (`--no-deps`); third-party dependencies come from the test
environment through a `.pth` line, so this checks the package (its files, package data, absence of hidden
repository globals) without reinstalling torch. Missing dependencies are what `.ci/run`'s from-scratch install
catches.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(cmd, cwd, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_external_project_from_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        cwd=tmp_path)
    wheel = next(wheels.glob("neat_lightning-*.whl"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    (site / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after the venv's own
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)

    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "external_project", project)
    out = run([str(python), "train.py", "--steps", "30", "--out", str(tmp_path / "out")], cwd=project).stdout
    assert f"neat_lightning from: {site}" in out, out  # the wheel, not the checkout
    assert "BLEU history: [(15," in out and "val/loss:" in out
    assert (tmp_path / "out" / "final.ckpt").is_file()

    # package data travelled with the wheel (the scene corpus)
    scenes = run([str(python), "-c", "import importlib.resources as r; "
                  "print(len(list(r.files('neat_lightning.data').joinpath('scene_library').iterdir())))"], cwd=project)
    assert int(scenes.stdout.strip()) >= 30
