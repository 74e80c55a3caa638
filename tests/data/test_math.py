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
