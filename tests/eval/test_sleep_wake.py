"""Fact-table protocols: tables, rows, the recall measure, the arms' schedules and budgets, one tiny run per arm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from neat_lightning.codec import decode
from neat_lightning.eval.sleep_wake import (
    FactRows,
    RetentionConfig,
    ScheduledBatches,
    SleepSettings,
    config_with,
    fact_tables,
    phase_ends,
    probe_rows,
    recall,
    run_arm,
    schedule,
)

TINY_SLEEP = SleepSettings(wake_steps=2, sleep_steps=1, replay_size=3, capacity=8)
TINY = RetentionConfig(n_facts=3, table_steps=4, eval_every=2, batch_size=2, block_size=32, dim=16, heads=2,
                       window=8, dim_memory=8, memory_size=16, sleep=TINY_SLEEP)


def test_tables_are_disjoint_seeded_and_rows_ask_only_their_table():
    tables = fact_tables(0, 5, tables=4)
    assert len(tables) == 4 and all(len(t) == 5 for t in tables)
    keys = [k for t in tables for k in t]
    assert len(set(keys)) == 20
    assert fact_tables(0, 5, 4) == tables and fact_tables(1, 5, 4) != tables
    a = tables[0]
    rows = FactRows(a, 33, 0, 0, 4).batch(7)
    assert rows["ids"].shape == rows["answer_ids"].shape == (4, 33) and rows["task"].shape == (4,)
    assert torch.equal(rows["ids"], FactRows(a, 33, 0, 0, 4).batch(7)["ids"])  # batch k is a pure function
    assert not torch.equal(rows["ids"], FactRows(a, 33, 0, 0, 4).batch(8)["ids"])
    asked = [line[3:-1] for line in decode(rows["ids"][0]).split("\n") if line.startswith("Q: ")]
    assert len(asked) == 33 // 17 and all(key in a for key in asked)
    assert rows["answer_ids"][0].max() == len(asked)  # one completion index per question


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


def test_schedules_give_every_arm_the_same_wake_updates():
    s = SleepSettings(wake_steps=3, sleep_steps=2)
    assert schedule(6, s, "no_sleep") == schedule(6, s, "replay") == [0, 1, 2, 3, 4, 5]
    sleep = schedule(6, s, "sleep")
    assert sleep == [0, 1, 2, None, None, 3, 4, 5, None, None]
    assert phase_ends(sleep, 3) == [5, 10] and phase_ends(schedule(6, s, "replay"), 3) == [3, 6]

    class Phase:
        def __init__(self, tag):
            self.tag = tag

        def batch(self, k):
            return (self.tag, k)

    data = list(ScheduledBatches([Phase("a"), Phase("b")], 3, sleep))
    assert data == [("a", 0), ("a", 1), ("a", 2), ("a", 2), ("a", 2), ("b", 0), ("b", 1), ("b", 2), ("b", 2),
                    ("b", 2)]  # a sleep step gets the last batch again, never a new one


@pytest.mark.parametrize("arm", ["no_sleep", "replay", "sleep"])
def test_each_arm_makes_the_same_wake_updates_and_the_replay_arms_the_same_replays(arm):
    run = run_arm(TINY, 0, arm)
    assert run["wake_updates"] == 8 and run["arm"] == arm
    assert run["steps"] == (12 if arm == "sleep" else 8)  # a sleep step after every 2 wake updates
    assert run["items_replayed"] == (0 if arm == "no_sleep" else 4 * 3)  # 4 sleeps of 3 windows, or as many mixed in
    assert run["phase_ends"] == ([6, 12] if arm == "sleep" else [4, 8])
    assert {p["step"] for p in run["curve"]} >= {0, *run["phase_ends"]}
    assert [p["wake"] for p in run["curve"]][-1] == 8
    assert all(0.0 <= run[k] <= 1.0 for k in ("final_recall_a", "final_recall_b", "recall_a_after_learning"))
    assert (0 < run["time_fraction"] < 1) if arm == "sleep" else run["time_fraction"] == 0.0
    if arm == "sleep":
        assert run["sleeps"] == 4 and run["sleep_phases"][0] == [2, 3]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"RetentionConfig.n_facts=11 must be in \[1, 10\] with tables=2"):
        RetentionConfig(n_facts=11)
    with pytest.raises(ValueError, match=r"RetentionConfig.n_facts=6 must be in \[1, 5\] with tables=4"):
        RetentionConfig(tables=4, n_facts=6)
    with pytest.raises(ValueError, match=r"RetentionConfig.tables=1 must be >= 2"):
        RetentionConfig(tables=1)
    with pytest.raises(ValueError, match=r"SleepSettings.wake_steps=0 must be >= 1"):
        SleepSettings(wake_steps=0)
    with pytest.raises(ValueError, match=r"RetentionConfig has no field 'steps'"):
        config_with(RetentionConfig(), steps=3)
    with pytest.raises(ValueError, match=r"arm='dream' must be one of"):
        run_arm(TINY, 0, "dream")
