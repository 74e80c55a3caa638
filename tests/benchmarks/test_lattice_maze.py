"""benchmarks/lattice_maze.py end to end on a tiny config: the JSON's rows carry every key the results table needs,
a second call resumes from the JSON, a third tests the saved checkpoints at a new size, and the PNG of solved mazes is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KEYS = {"model", "size_factor", "maze_cells", "test_steps", "exact_path_accuracy", "per_seed", "cell_f1", "params",
        "cpu_s"}


@pytest.mark.slow
def test_benchmark_writes_rows_resumes_and_plots(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "lattice_maze.yaml").read_text())
    config["model"]["init_args"]["lattice"].update(height=7, width=7, steps=3, hidden=8)
    config["model"]["init_args"]["maze"]["max_steps"] = 4
    config["model"]["init_args"]["val_steps"] = 4
    config["data"]["init_args"].update(size=7, batch_size=4)
    stages = config["trainer"]["callbacks"][0]["init_args"]["stages"]
    for i, stage in enumerate(stages):
        stage["start"] = i  # every stage within the 3 training steps
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "maze.json"
    args = [sys.executable, str(REPO / "benchmarks" / "lattice_maze.py"), "--config", str(tmp_path / "tiny.yaml"),
            "--steps", "3", "--seeds", "0", "1", "--models", "lattice", "fixed_depth", "lattice_no_plasticity",
            "--sizes", "1", "2", "--mazes", "4", "2", "--out", str(out), "--run-dir", str(tmp_path / "runs")]
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 3 * 2 and all(KEYS <= set(r) for r in rows)
    lattice_2x = next(r for r in rows if r["model"] == "lattice" and r["size_factor"] == 2)
    assert lattice_2x["maze_cells"] == 13 and lattice_2x["test_steps"] == 16
    assert set(lattice_2x["per_seed"]) == {"0", "1"}
    fixed = next(r for r in rows if r["model"] == "fixed_depth" and r["size_factor"] == 2)
    assert fixed["test_steps"] == 3 and abs(fixed["params"] - lattice_2x["params"]) / lattice_2x["params"] < 0.35
    assert (tmp_path / "maze.png").stat().st_size > 1000
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert again.returncode == 0 and again.stdout.count("skipped") == 6
    bigger = subprocess.run([*args[:-10], "--sizes", "1", "2", "3", "--mazes", "4", "2", "2", *args[-4:]],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert bigger.returncode == 0 and bigger.stdout.count("at the missing sizes") == 6, bigger.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 3 and {r["maze_cells"] for r in rows} == {7, 13, 19}
    views = subprocess.run([*args[:-10], "--sizes", "2", "--mazes", "2", *args[-4:], "--views", "8"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert views.returncode == 0 and views.stdout.count("at the missing sizes") == 6, views.stderr[-3000:]
    viewed = json.loads(out.read_text())["rows"]
    for before, after in zip(rows, viewed):  # the maze as given scores as before; 8 views only where tested
        assert after["exact_path_accuracy"] == before["exact_path_accuracy"]
        assert ("views8_exact_path_accuracy" in after) == (after["size_factor"] == 2)
    assert all(0.0 <= r["views8_path_checked"] <= 1.0 for r in viewed if r["size_factor"] == 2)
    assert "8 views + path check" in views.stdout
    rows = viewed
    sweep = subprocess.run([*args[:-10], "--sizes", "2", "--mazes", "3", *args[-4:], "--sweep", "8", "2", "4"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    marks = [json.loads(line) for line in sweep.stdout.splitlines() if line.startswith("{")]
    assert [m["test_steps"] for m in marks] == [2, 4, 8] and all(m["maze_cells"] == 13 for m in marks)
    assert marks[0]["changed_since_previous"] is None and all(0 <= m["changed_since_previous"] <= 3 for m in marks[1:])
    assert json.loads(out.read_text())["rows"] == rows  # a sweep writes nothing


def test_variants_differ_from_the_config_only_where_named():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from lattice_maze import EXTRA_MODELS, MODELS, variant

    config = yaml.safe_load((REPO / "configs" / "lattice_maze.yaml").read_text())
    shipped = config["model"]["init_args"]
    for model in MODELS + EXTRA_MODELS:
        args, stages = variant(config, model)
        named = next((t for t in ("axial", "d4") if model.startswith(f"lattice_{t}")), shipped["maze"]["taps"])
        assert args["maze"]["taps"] == named
        assert args.get("use_lattice", True) == (not model.startswith("fixed_depth"))
        assert args["plasticity"].get("enabled", True) == (not model.endswith("no_plasticity"))
        assert args["plasticity"]["emergence_feedback"] == (not model.endswith("no_emergence"))
        assert stages == (model.startswith("lattice") and not model.endswith("no_plasticity"))
        assert args["lattice"] == shipped["lattice"] and args["optim"] == shipped["optim"]
