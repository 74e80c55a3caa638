"""Retention evaluation: fact tables, the recall measure, both arms end to end, JSON + PNG, `neat eval-sleep`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from neat_lightning.codec import decode
from neat_lightning.commands.eval_sleep import main
from neat_lightning.eval.sleep_wake import (
    RetentionConfig,
    config_with,
    evaluate_retention,
    fact_rows,
    fact_tables,
    optimizer_steps,
    probe_rows,
    recall,
)

TINY = dict(n_facts=3, learn_steps=4, interfere_steps=4, eval_every=2, batch_size=2, block_size=32, dim=16,
            heads=2, window=8, dim_memory=8, memory_size=16, wake_steps=2, sleep_steps=1, replay_count=8)


def test_tables_are_disjoint_seeded_and_rows_ask_only_their_table():
    a, b = fact_tables(0, 5)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert fact_tables(0, 5) == (a, b) and fact_tables(1, 5) != (a, b)
    rows = fact_rows(a, 33, 0, "learn", 7, 4)
    assert rows["ids"].shape == rows["answer_ids"].shape == (4, 33)
    assert torch.equal(rows["ids"], fact_rows(a, 33, 0, "learn", 7, 4)["ids"])  # batch k is a pure function
    text = decode(rows["ids"][0])
    asked = [line[3:-1] for line in text.split("\n") if line.startswith("Q: ")]
    assert asked and all(key in a for key in asked)


class Oracle(torch.nn.Module):
    """Predicts every target byte, except on the rows listed in ``wrong`` (first completion byte)."""

    def __init__(self, wrong: list[int]) -> None:
        super().__init__()
        self.wrong = wrong

    @property
    def device(self):
        return torch.device("cpu")

    def loss_terms(self, batch):
        targets = batch["ids"][:, 1:]
        logits = torch.nn.functional.one_hot(targets, 260).float()
        seg = batch["answer_ids"][:, 1:]
        for r in self.wrong:
            first = int((seg[r] > 0).nonzero()[0])
            logits[r, first] = logits[r, first].roll(1)
        return SimpleNamespace(logits=logits, seg=seg)  # the fields of NeatOutput that recall reads


def test_recall_counts_whole_completions():
    rows = probe_rows(fact_tables(0, 4)[0], 33)
    assert recall(Oracle([]), rows) == 1.0
    assert recall(Oracle([1, 3]), rows) == 0.5


def test_both_arms_run_with_equal_wake_updates_and_write_json_and_png(tmp_path):
    cfg = RetentionConfig(**TINY)
    result = evaluate_retention(cfg, [0], log=lambda _: None)
    no_sleep, sleep = result["runs"]
    assert (no_sleep["arm"], sleep["arm"]) == ("no_sleep", "sleep")
    assert [p["wake_updates"] for p in sleep["phases"]] == [p["wake_updates"] for p in no_sleep["phases"]] == [4, 4]
    assert sleep["phases"][-1]["end"] == 2 * optimizer_steps(4, cfg, True) == 12
    assert sleep["sleep_phases"] == [[2, 3], [5, 6], [8, 9], [11, 12]]  # each phase ends with a sleep
    assert [p["step"] for p in no_sleep["curve"]] == [0, 2, 4, 6, 8]
    assert all(0.0 <= p["recall_a"] <= 1.0 for r in result["runs"] for p in r["curve"])
    s = result["summary"]
    assert s["gap_final_recall_a"]["per_seed"] == [sleep["final_recall_a"] - no_sleep["final_recall_a"]]
    assert 0 < s["sleep/consolidation_time_fraction"]["mean"] < s["sleep/time_fraction"]["mean"] < 1


def test_command_writes_results(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    small = {**TINY, "learn_steps": 2, "interfere_steps": 2}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in small.items()]
    assert main(["--seeds", "3", *args, "--reset-short-term", "false", "--out-json", str(out_json),
                 "--out-png", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["seeds"] == [3] and data["config"]["reset_short_term"] is False
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gap (sleep - no_sleep)" in capsys.readouterr().out


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"RetentionConfig.n_facts=11 must be in \[1, 10\]"):
        RetentionConfig(n_facts=11)
    with pytest.raises(ValueError, match=r"RetentionConfig.wake_steps=0 must be >= 1"):
        RetentionConfig(wake_steps=0)
    with pytest.raises(ValueError, match=r"RetentionConfig has no field 'steps'"):
        config_with(RetentionConfig(), steps=3)
    with pytest.raises(ValueError, match=r"seeds=\[\] must name at least one seed"):
        evaluate_retention(RetentionConfig(**TINY), [])
