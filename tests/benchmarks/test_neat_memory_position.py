"""benchmarks/neat_memory_position.py: position bins over carried-memory segments, matched parameter counts, and the
whole run (train, bin, JSON, PNG) on a tiny setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import neat_memory_position as nmp  # noqa: E402


def _args(**kw):
    return nmp.parse_args(["--dim", "16", "--layers", "1", "--block-size", "32", "--window", "8", "--dim-memory", "8",
                           "--bin", "16", "--max-doc", "64", *[str(x) for kv in kw.items() for x in kv]])


def test_matched_window_only_model_has_the_titans_parameter_count():
    args = _args()
    titans = nmp.params(nmp.build_model(args, "titans"))
    window = nmp.params(nmp.build_model(args, "window_only", nmp.matched_hidden(args)))
    assert abs(window - titans) / titans < 0.01 and window != nmp.params(nmp.build_model(args, "window_only"))


def test_position_bins_count_every_byte_and_carry_the_memory_across_segments():
    args = _args()
    torch.manual_seed(0)
    model = nmp.build_model(args, "titans").eval()
    docs = [SimpleNamespace(data=bytes(range(97, 97 + 26)) * 4), SimpleNamespace(data=b"x" * 40)]
    with torch.inference_mode():
        nats, count, n_docs = nmp.position_nats(model, docs, args)
    assert count == [32, 32, 16 + 7, 16] and n_docs == [2, 2, 2, 1]  # 64 (max_doc) and 39 predicted bytes
    # the second segment reads the memory written by the first: without carrying it the loss differs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([list(docs[0].data[:65])]) + 4
    first, out = model.run(ids[:, :32])
    carried, _ = model.run(ids[:, 32:64], states=out.states)
    fresh, _ = model.run(ids[:, 32:64])
    assert not torch.allclose(carried, fresh)


@pytest.mark.slow
def test_position_benchmark_writes_json_and_png(tmp_path):
    out = tmp_path / "pos.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "neat_memory_position.py"), "--steps", "2", "--dim", "16",
           "--layers", "1", "--block-size", "64", "--window", "16", "--dim-memory", "8", "--bin", "64",
           "--min-doc", "1024", "--max-doc", "256", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["results"]] == ["window_only", "titans"]
    for r in result["results"]:
        assert len(r["bpb"]) == 4 and all(v is not None and 0 < v < 10 for v in r["bpb"]) and r["steps"] == 2
        assert r["bytes"] == [64 * r["documents"][0]] * 4
    assert out.with_suffix(".png").stat().st_size > 1000
