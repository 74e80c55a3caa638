"""benchmarks/lattice_scale.py, part optstate: the AdamW state of a lattice module counted from a meta-device build
and a thin real module equals two fp32 moments per trainable parameter (plus one step counter per tensor), and its
share of a peak is that count over the peak."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lattice_scale_bench", REPO / "benchmarks" / "lattice_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimizer_state_is_two_moments_per_trainable_parameter(tmp_path, monkeypatch):
    bench = load_benchmark()
    case = {"size": [6, 8, 8], "channels": 8, "hidden": 16, "stencil": "shift"}
    counted = bench.optimizer_state(case)

    from neat_lightning.modules.lattice import LatticeNetwork

    real = LatticeNetwork(**bench.model_kwargs(case))  # the full module, built for real
    params = [p for p in real.parameters() if p.requires_grad]
    assert counted["params"] == sum(p.numel() for p in params)
    assert counted["optimizer_state_bytes"] == 2 * 4 * counted["params"] + 4 * len(params)
    assert counted["buffer_bytes"] == sum(b.numel() * b.element_size() for b in real.buffers())
    assert sum(counted["params_by_child"].values()) == counted["params"]

    results = tmp_path / "scale.json"
    results.write_text(json.dumps({"full": {"rows": [
        {"size": [6, 8, 8], "steps": 5, "stencil": "shift", "checkpoint_every": 3, "peak_rss_gib": 2.0},
        {"size": [6, 8, 8], "steps": 9, "stencil": "sparse", "estimate_only": True, "estimate_gib": 8.0},
        {"size": [6, 8, 8], "steps": 7, "error": "killed"},
    ]}}))
    monkeypatch.setattr(bench, "RESULTS", results)
    rows = bench.optstate_rows(counted)
    assert [r["peak_measured"] for r in rows] == [True, False]
    state_gib = counted["optimizer_state_bytes"] / 2**30
    assert torch.isclose(torch.tensor(rows[0]["share"]), torch.tensor(state_gib / 2.0))
    assert torch.isclose(torch.tensor(rows[1]["share"]), torch.tensor(state_gib / 8.0))
