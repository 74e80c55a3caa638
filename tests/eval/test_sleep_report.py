"""Summaries, paired differences with 95% t intervals, the printed table and the files of the sleep evaluation."""

from __future__ import annotations

import json
import math

import pytest

from neat_lightning.eval.sleep_report import (
    evaluate,
    format_table,
    mean_std,
    paired_difference,
    plot,
    t95,
    write_json,
)
from neat_lightning.eval.sleep_wake import RetentionConfig, SleepSettings

TINY = RetentionConfig(n_facts=2, table_steps=2, eval_every=2, batch_size=2, block_size=32, dim=16, heads=2, window=8,
                       dim_memory=8, memory_size=16,
                       sleep=SleepSettings(wake_steps=2, sleep_steps=1, replay_size=2, capacity=8))


def test_statistics():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    assert t95(1) == 12.706 and t95(4) == 2.776 and t95(100) == 1.96
    d = paired_difference([0.9, 1.0, 0.8], [0.1, 0.2, 0.0])
    assert d["per_seed"] == pytest.approx([0.8, 0.8, 0.8]) and d["std"] == pytest.approx(0.0, abs=1e-12)
    assert d["ci95"] == pytest.approx([0.8, 0.8])
    d = paired_difference([1.0, 0.0, 1.0, 0.0, 1.0], [0.0] * 5)
    half = 2.776 * math.sqrt(0.3) / math.sqrt(5)
    assert d["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert paired_difference([1.0], [0.0])["ci95"] is None


def test_evaluate_summarises_every_arm_and_writes_json_and_png(tmp_path):
    result = evaluate(["ab"], [0, 1], {"ab": TINY}, log=lambda _: None)
    s = result["summary"]
    for arm in ("no_sleep", "replay", "sleep"):
        for key in ("final_recall_a", "final_recall_b", "wall_s", "recall_a_after_learning"):
            assert set(s[f"{arm}/{key}"]) == {"mean", "std"}
    assert "sleep/time_fraction" in s and "replay/time_fraction" not in s
    assert s["replay/items_replayed"]["mean"] == s["sleep/items_replayed"]["mean"] == 4
    diff = s["diff/sleep-replay/final_recall_a"]
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert diff["per_seed"] == [runs["sleep", k]["final_recall_a"] - runs["replay", k]["final_recall_a"]
                                for k in (0, 1)]
    assert len(diff["ci95"]) == 2
    table = format_table(result)
    assert "[ab] 2 seeds" in table and "sleep - replay (95% CI)" in table and "of training-step wall time" in table
    path = write_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text())["seeds"] == [0, 1]
    assert plot(result, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match=r"seeds=\[\] must name at least one seed"):
        evaluate(["ab"], [])
    with pytest.raises(ValueError, match=r"protocol='abc' must be one of \['ab', 'tables4', 'bytes'\]"):
        evaluate(["abc"], [0])
    with pytest.raises(ValueError, match=r"workers=0 must be >= 1"):
        evaluate(["ab"], [0], workers=0)
