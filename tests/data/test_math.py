"""MathDataModule: rows as pure functions of the batch index, the gap curriculum, settings checks."""

from __future__ import annotations

import random

import pytest
import torch

from neat_lightning.codec import PAD_ID, decode
from neat_lightning.data.generators.math import MATH_TASKS, TASK_TYPES, encode_problem, generate_problem
from neat_lightning.data.math import MathDataModule


def test_datamodule_batches_are_pure_functions_of_the_index():
    dm = MathDataModule(block_size=256, batch_size=6, batches_per_epoch=5, val_batches=2, gap_range=(0, 64))
    ds = dm.dataset("train")
    b = ds.batch(3)
    assert b["ids"].shape == b["answer_ids"].shape == (6, 257) and b["ids"].dtype == torch.long
    assert b["task"].shape == (6,) and int(b["task"].max()) < len(TASK_TYPES)
    again = MathDataModule(block_size=256, batch_size=6, batches_per_epoch=5, gap_range=(0, 64)).dataset("train")
    assert all(torch.equal(b[k], again.batch(3)[k]) for k in b)
    assert not torch.equal(b["ids"], ds.batch(4)["ids"])
    assert not torch.equal(dm.dataset("val").batch(0)["ids"], ds.batch(0)["ids"])
    ds.start_batch = 3  # where a resumed run starts: the same batches as an uninterrupted one
    assert [torch.equal(x["ids"], ds.batch(k)["ids"]) for k, x in zip((3, 4), ds)] == [True, True]
    assert len(list(iter(ds))) == 2
    # completions are marked on every row and only where the ids are real bytes or EOS
    assert ((b["answer_ids"] > 0).sum(dim=1) > 0).all()
    assert ((b["ids"] != PAD_ID) | (b["answer_ids"] == 0)).all()


def test_gap_curriculum_grows_the_largest_gap_with_the_batch_index():
    kwargs = dict(tasks=["temporal_gap"], difficulties=[2], n_facts=1, block_size=160, batch_size=16,
                  gap_range=(4, 100))
    plain = MathDataModule(**kwargs).dataset("train")
    ds = MathDataModule(**kwargs, gap_warmup=10).dataset("train")
    overhead = len(encode_problem(generate_problem("temporal_gap", 2, random.Random(0), gap=0, n_facts=1))[0])
    gaps = {k: (ds.batch(k)["ids"] != PAD_ID).sum(dim=1) - overhead for k in (0, 4, 9, 30)}
    assert [ds.max_gap(k) for k in (0, 4, 9, 30)] == [14, 52, 100, 100]
    assert all(4 <= int(g.min()) and int(g.max()) <= ds.max_gap(k) for k, g in gaps.items())
    assert int(gaps[0].max()) < 20 < int(gaps[30].max())
    # after the warm-up (and without one) the batches are the plain ones; validation never warms up
    assert torch.equal(ds.batch(30)["ids"], plain.batch(30)["ids"])
    assert MathDataModule(**kwargs, gap_warmup=10).dataset("val").gap_warmup == 0
    with pytest.raises(ValueError, match=r"gap_warmup=-1 must be >= 0"):
        MathDataModule(**kwargs, gap_warmup=-1)


def test_datamodule_math_rows_hold_one_task_type():
    dm = MathDataModule(tasks=list(MATH_TASKS), difficulties=[1], block_size=128, batch_size=4)
    b = dm.dataset("train").batch(0)
    for row, task in zip(b["ids"], b["task"]):
        texts = decode(row, stop_at_eos=False).split("Q: ")[1:]
        assert len(texts) >= 2 and TASK_TYPES[int(task)] in MATH_TASKS


def test_datamodule_validates_its_settings():
    with pytest.raises(ValueError, match=r"block_size=64 is too short for gap_range max 128"):
        MathDataModule(tasks=["temporal_gap"], block_size=64, gap_range=(0, 128))
    with pytest.raises(ValueError, match=r"tasks='poetry' is not a task type"):
        MathDataModule(tasks=["poetry"])
    with pytest.raises(ValueError, match=r"gap_range=\(5, 2\) must satisfy"):
        MathDataModule(gap_range=(5, 2))
    with pytest.raises(ValueError, match=r"block_size=64 is too short for the math tasks \['word_problem'\]"):
        MathDataModule(tasks=["word_problem"], block_size=64)
    with pytest.raises(ValueError, match=r"batch_size=0 must be >= 1"):
        MathDataModule(batch_size=0)


def test_facts_curriculum_grows_the_number_of_facts_monotonically():
    kwargs = dict(tasks=["mqar"], difficulties=[2], n_facts=8, queries=2, block_size=192, batch_size=8,
                  gap_range=(0, 64))
    ds = MathDataModule(**kwargs, facts_warmup=14, gap_warmup=14).dataset("train")
    plain = MathDataModule(**kwargs).dataset("train")
    facts = [ds.facts(k) for k in range(20)]
    assert facts[0] == 1 and facts[-1] == 8 and all(a <= b for a, b in zip(facts, facts[1:]))
    assert [ds.max_gap(k) for k in (0, 13, 19)] == [5, 64, 64]
    for k in (0, 6, 30):  # the rows hold exactly facts(k) facts and min(2, facts(k)) scored queries
        b = ds.batch(k)
        for row, ans in zip(b["ids"], b["answer_ids"]):
            header = decode(row, stop_at_eos=False).split("\n")[0]
            assert header.count("=") == ds.facts(k) and int(ans.max()) == min(2, ds.facts(k))
    assert torch.equal(ds.batch(30)["ids"], plain.batch(30)["ids"])  # after the warm-up: the plain batches
    ds.start_batch = 5  # a resumed run starts mid-warm-up and sees the batches of the uninterrupted one
    assert [torch.equal(x["ids"], ds.batch(k)["ids"]) for k, x in zip((5, 6), ds)] == [True, True]
    assert MathDataModule(**kwargs, facts_warmup=10).dataset("val").facts_warmup == 0


def test_mqar_and_needle_rows_fit_and_score_each_query():
    dm = MathDataModule(tasks=["mqar", "needle"], difficulties=[3], n_facts=10, queries=10, block_size=300,
                        batch_size=16, gap_range=(100, 100), depth_range=(0.5, 0.5))
    b = dm.dataset("train").batch(0)
    for row, ans, task in zip(b["ids"], b["answer_ids"], b["task"]):
        assert int(ans.max()) == (10 if TASK_TYPES[int(task)] == "mqar" else 1)
        assert ((row != PAD_ID) | (ans == 0)).all()
    assert {TASK_TYPES[int(t)] for t in b["task"]} == {"mqar", "needle"}


def test_datamodule_refuses_bad_memory_settings():
    with pytest.raises(ValueError, match=r"facts_warmup=5 needs n_facts set"):
        MathDataModule(tasks=["mqar"], facts_warmup=5)
    with pytest.raises(ValueError, match=r"facts_warmup=-1 must be >= 0"):
        MathDataModule(tasks=["mqar"], n_facts=4, facts_warmup=-1)
    with pytest.raises(ValueError, match=r"queries=0 must be >= 1"):
        MathDataModule(tasks=["mqar"], n_facts=4, queries=0)
    with pytest.raises(ValueError, match=r"depth_range=\(0.2, 1.5\) must satisfy 0 <= min <= max <= 1"):
        MathDataModule(tasks=["needle"], depth_range=(0.2, 1.5))
    with pytest.raises(ValueError, match=r"block_size=128 is too short for gap_range max 128"):
        MathDataModule(tasks=["mqar"], n_facts=8, block_size=128)
