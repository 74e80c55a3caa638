"""benchmarks/neat_memory.py --task mqar / needle end to end on a tiny setting: the JSON's rows carry exactly the keys
the results table needs, one per variant x k x gap; ablation names are parsed and bad ones refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import neat_memory_tasks  # noqa: E402

KEYS = {"variant", "k", "queries", "gap", "window", "accuracy", "accuracy_per_seed", "chance", "steps", "cpu_s",
        "peak_rss_mb"}
TINY = ["--dim", "16", "--layers", "1", "--steps", "2", "--eval-samples", "4", "--batch-size", "2", "--window", "8"]


def test_variant_names_parse_and_bad_ones_are_refused():
    args = neat_memory_tasks.parse_args(["--task", "mqar", "--variants", "titans"])
    assert neat_memory_tasks.parse_variant("titans[memory_depth=2,lr=1e-3,readout_gate=False]", args) == (
        "titans", {"memory_depth": 2, "readout_gate": False}, {"lr": 1e-3})
    assert args.train_gaps == (0, 64) and args.out.endswith("neat_memory_mqar.json")
    # the facts curriculum is on by default: without it Titans selected among 4 facts at 0.405, with it at 0.968
    assert args.facts_warmup == 500
    with pytest.raises(SystemExit, match=r"--variants: 'lstm' is not one of"):
        neat_memory_tasks.parse_args(["--variants", "lstm"])
    with pytest.raises(SystemExit, match=r"'depth' is not a TitansConfig field"):
        neat_memory_tasks.parse_args(["--variants", "titans[depth=2]"])


def test_rows_average_over_seeds():
    args = neat_memory_tasks.parse_args(["--variants", "titans", "full_attention", "--k", "4", "--seeds", "0", "1"])
    runs = [{"variant": v, "k": 4, "seed": s, "block": 160, "steps": 10 + s, "cpu_s": 1.0 + s, "peak_rss_mb": 5.0 * s,
             "accuracy": {"64": 0.5 + 0.25 * s}} for v in ("titans", "full_attention") for s in (0, 1)]
    rows = neat_memory_tasks.collect_rows(args, runs)
    assert [(r["variant"], r["window"]) for r in rows] == [("titans", 16), ("full_attention", 160)]
    assert rows[0] == {"variant": "titans", "k": 4, "queries": 2, "gap": 64, "window": 16, "accuracy": 0.625,
                       "accuracy_per_seed": [0.5, 0.75], "chance": 0.1, "steps": 10, "cpu_s": 1.5,
                       "peak_rss_mb": 5.0}


@pytest.mark.slow
def test_mqar_benchmark_writes_one_row_per_variant_k_and_gap(tmp_path):
    out = tmp_path / "mqar.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "neat_memory.py"), "--task", "mqar", *TINY,
           "--variants", "window_only", "titans[conv_kernel=0]", "--k", "2", "3", "--gaps", "4", "20", "--seeds", "0",
           "--jobs", "1", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["k"], r["gap"]) for r in rows] == [
        (v, k, g) for v in ("window_only", "titans[conv_kernel=0]") for k in (2, 3) for g in (4, 20)]
    assert all(set(r) == KEYS for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["accuracy_per_seed"]) == 1 and r["steps"] == 2 for r in rows)
    assert "titans[conv_kernel=0]" in done.stdout and "wrote" in done.stdout
