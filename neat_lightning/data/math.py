"""Rows of synthetic math problems and memory tasks for a Trainer: :class:`MathDataModule`.

The problems themselves (task types, difficulties, answers, packing into rows) are plain Python/torch in
:mod:`neat_lightning.data.generators.math`.

Batches are dicts: ``ids`` (B, T + 1) int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``), ``answer_ids`` (B, T + 1)
int64 (``k >= 1`` on the bytes of the k-th problem's completion — solution + EOS — that exact match checks, else 0)
and ``task`` (B,) int64 (index into :data:`TASK_TYPES`; one task type per row).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from neat_lightning.data.generators.math import (
    DIFFICULTIES,
    MATH_MAX_IDS,
    MATH_TASKS,
    MEMORY_TASKS,
    TASK_TYPES,
    RowSpec,
    build_row,
    check_difficulty,
    check_task,
    memory_overhead,
    rng_for,
)
from neat_lightning.data.loading import PlacedLoader, StepAlignedBatches, check_positive


def check_curriculum(gap_warmup: int, facts_warmup: int, n_facts: int | None) -> None:
    """Refuse negative warm-ups and a facts warm-up without a fixed ``n_facts`` to grow to."""
    if gap_warmup < 0:
        raise ValueError(f"gap_warmup={gap_warmup} must be >= 0")
    if facts_warmup < 0:
        raise ValueError(f"facts_warmup={facts_warmup} must be >= 0")
    if facts_warmup and n_facts is None:
        raise ValueError(f"facts_warmup={facts_warmup} needs n_facts set (the number of facts it grows to), not None")


# ----------------------------------------------------------------------------------------------------------------------
# datasets


class ProblemBatches(StepAlignedBatches):
    """Batches of problem rows. Batch ``k`` on ``rank`` is a pure function of ``(seed, split, k, rank)``.

    Each row draws its task uniformly from ``tasks``, its difficulty from ``difficulties`` and, for memory tasks,
    its gap uniformly from ``gap_range``. Training iterators start at ``start_batch`` and run to the end of that
    batch's epoch (see :class:`neat_lightning.data.bytes.RandomWindowBatches`).

    Curriculum: with ``gap_warmup > 0`` the largest gap of batch ``k`` grows linearly from ``gap_range[0]`` to
    ``gap_range[1]`` over the first ``gap_warmup`` batches (short gaps — inside the attention window — first);
    with ``facts_warmup > 0`` the number of facts grows linearly from 1 to ``n_facts`` over the first
    ``facts_warmup`` batches (``mqar`` asks ``min(queries, facts)`` of them). Both are functions of ``k`` alone, so
    resumed runs see the same tasks.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        difficulties: Sequence[int],
        gap_range: tuple[int, int],
        n_facts: int | None,
        block_size: int,
        batch_size: int,
        n_batches: int,
        seed: int,
        split: str,
        gap_warmup: int = 0,
        facts_warmup: int = 0,
        queries: int = 2,
        depth_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(n_batches)
        check_curriculum(gap_warmup, facts_warmup, n_facts)
        self.gap_warmup, self.facts_warmup = gap_warmup, facts_warmup
        self.queries, self.depth_range = queries, depth_range
        self.tasks, self.difficulties, self.gap_range, self.n_facts = list(tasks), list(difficulties), gap_range, n_facts
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.split = seed, split
        self.task_index = {t: TASK_TYPES.index(t) for t in TASK_TYPES}

    @property
    def n_batches(self) -> int:
        return self.batches_per_epoch

    def max_gap(self, k: int) -> int:
        """The largest gap batch ``k`` draws (the curriculum; ``gap_range[1]`` once warm-up is over)."""
        lo, hi = self.gap_range
        if self.gap_warmup == 0:
            return hi
        return lo + round((hi - lo) * min(1.0, (k + 1) / self.gap_warmup))

    def facts(self, k: int) -> int | None:
        """The number of facts of batch ``k``'s memory problems (the curriculum; ``n_facts`` once warm-up is over)."""
        if self.facts_warmup == 0 or self.n_facts is None:
            return self.n_facts
        return 1 + round((self.n_facts - 1) * min(1.0, (k + 1) / self.facts_warmup))

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        rows_ids, rows_ans, rows_task = [], [], []
        lo, hi = self.gap_range[0], self.max_gap(k)
        n_facts = self.facts(k)
        for r in range(self.batch_size):
            rng = rng_for(self.split, self.seed, k, self.rank, r)
            spec = RowSpec(rng.choice(self.tasks), rng.choice(self.difficulties), rng.randint(lo, hi))
            if spec.task in ("mqar", "needle"):  # extra draws only for these tasks: other rows stay as they were
                depth = rng.uniform(*self.depth_range) if spec.task == "needle" else None
                spec = RowSpec(spec.task, spec.difficulty, spec.gap, self.queries, depth)
            ids, ans = build_row(spec, self.block_size + 1, rng, n_facts)
            rows_ids.append(ids)
            rows_ans.append(ans)
            rows_task.append(self.task_index[spec.task])
        return {"ids": torch.stack(rows_ids), "answer_ids": torch.stack(rows_ans), "task": torch.tensor(rows_task)}


class MathDataModule(L.LightningDataModule):
    """Byte sequences of synthetic math problems and memory tasks (see the module docstring for the batch dict).

    Validation is a fixed held-out set (a different seed stream from training); the NeatModel reports its exact
    match per task type on it.

    Args:
        tasks: task types to draw from (subset of ``TASK_TYPES``).
        difficulties: difficulty levels to draw from (1..3).
        gap_range: ``(min, max)`` bytes of routine text between the queried fact and the question (memory tasks).
        n_facts: facts per memory problem; ``None`` for 1 / 2 / 4 at difficulty 1 / 2 / 3.
        block_size: context length; rows are ``block_size + 1`` ids.
        batch_size: rows per batch (per device).
        batches_per_epoch: training batches per epoch and rank.
        val_batches: validation batches (per rank).
        seed: seed of the training stream.
        val_seed: seed of the held-out validation set.
        num_workers: DataLoader worker processes.
        gap_warmup: training batches over which the largest memory-task gap grows from ``gap_range[0]`` to
            ``gap_range[1]`` (a curriculum); 0 draws from the whole range from the start. Validation always does.
        facts_warmup: training batches over which the number of facts per memory problem grows from 1 to
            ``n_facts`` (a curriculum; needs ``n_facts``); 0 uses ``n_facts`` from the start. Validation always does.
        queries: scored queries per ``mqar`` problem (at most its number of facts are asked).
        depth_range: ``(min, max)`` relative depth of the fact in a ``needle`` document, drawn uniformly.
    """

    def __init__(
        self,
        tasks: list[str] = list(TASK_TYPES),
        difficulties: list[int] = list(DIFFICULTIES),
        gap_range: tuple[int, int] = (0, 128),
        n_facts: int | None = None,
        block_size: int = 256,
        batch_size: int = 32,
        batches_per_epoch: int = 1000,
        val_batches: int = 8,
        seed: int = 1234,
        val_seed: int = 99_991,
        num_workers: int = 0,
        gap_warmup: int = 0,
        facts_warmup: int = 0,
        queries: int = 2,
        depth_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        check_curriculum(gap_warmup, facts_warmup, n_facts)
        check_positive(queries=queries)
        if not 0.0 <= depth_range[0] <= depth_range[1] <= 1.0:
            raise ValueError(f"depth_range={tuple(depth_range)} must satisfy 0 <= min <= max <= 1")
        if not tasks:
            raise ValueError("tasks=[] must name at least one task type")
        for t in tasks:
            check_task(t, "tasks")
        for d in difficulties:
            check_difficulty(d, "difficulties")
        if not difficulties:
            raise ValueError("difficulties=[] must name at least one level")
        lo, hi = gap_range
        if not 0 <= lo <= hi:
            raise ValueError(f"gap_range={tuple(gap_range)} must satisfy 0 <= min <= max")
        check_positive(block_size=block_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                       val_batches=val_batches)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        math_need = max((MATH_MAX_IDS[t] for t in tasks if t in MATH_TASKS), default=0)
        if math_need > block_size + 1:
            raise ValueError(
                f"block_size={block_size} is too short for the math tasks {[t for t in tasks if t in MATH_TASKS]}: "
                f"their problems need up to {math_need} ids (block_size + 1)"
            )
        memory = [t for t in tasks if t in MEMORY_TASKS]
        if memory:
            need = hi + max(memory_overhead(t, max(difficulties), n_facts, queries) for t in memory)
            if need > block_size + 1:
                raise ValueError(
                    f"block_size={block_size} is too short for gap_range max {hi}: memory problems need up to "
                    f"{need} ids; raise block_size or lower gap_range"
                )
        self.save_hyperparameters()
        self.tasks, self.difficulties = list(tasks), list(difficulties)
        self.gap_range, self.n_facts = (int(lo), int(hi)), n_facts
        self.block_size, self.batch_size = block_size, batch_size
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.seed, self.val_seed, self.num_workers = seed, val_seed, num_workers
        self.gap_warmup, self.facts_warmup = gap_warmup, facts_warmup
        self.queries, self.depth_range = queries, (float(depth_range[0]), float(depth_range[1]))

    def dataset(self, split: str) -> ProblemBatches:
        train = split == "train"
        return ProblemBatches(
            self.tasks, self.difficulties, self.gap_range, self.n_facts, self.block_size, self.batch_size,
            self.batches_per_epoch if train else self.val_batches, self.seed if train else self.val_seed, split,
            self.gap_warmup if train else 0, self.facts_warmup if train else 0, self.queries, self.depth_range,
        )

    def _place(self, ds: ProblemBatches, train: bool) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if train:
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds: ProblemBatches, train: bool) -> DataLoader:
        self._place(ds, train)
        return PlacedLoader(
            ds, functools.partial(self._place, train=train), num_workers=self.num_workers, persistent_workers=False,
            # own generator: worker seeds must not come from (and shift) the global RNG between resumed runs
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), False)
