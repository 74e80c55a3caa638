"""MazeDataModule: batches of perfect mazes and their shortest path, for per-cell path prediction.

Mazes come from :mod:`neat_lightning.data.generators.maze` (Lightning-free): a ``size × size`` grid of cell classes
(free, wall, start, goal) and the unique shortest start-goal path as a 0/1 mask, checked by BFS. Batches are dicts
``{"maze": (B, S, S) int64, "target": (B, S, S) int64}``.

Training mazes are drawn on the fly: row ``i`` of training batch ``k`` on ``rank`` is a pure function of
``(seed, k, rank, i)``, and each epoch's iterator starts at the trainer's global step (as in
:mod:`neat_lightning.data.qa`), so a run resumed mid-epoch sees exactly the batches of the uninterrupted run.
Validation and test mazes are fixed sets drawn once in ``setup``. A hash of each maze's cells splits maze space:
training only ever draws mazes with ``maze_split_unit >= val_fraction``, validation and test only the others, so no
evaluated maze is a training maze. Validation uses the training size; ``test_size`` sets a (larger) test size, for
which the module's ``test_steps`` gives the lattice more steps.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.choices import check_choice
from neat_lightning.data.generators.maze import (
    Algorithm,
    check_size,
    draw_maze,
    draw_small_maze,
    held_out_mazes,
    maze_batch,
)
from neat_lightning.data.loading import PlacedLoader, ShardedSequentialBatches, StepAlignedBatches, check_positive

log = logging.getLogger(__name__)


class RandomMazeBatches(StepAlignedBatches):
    """``batch_size`` training mazes per batch; batch ``k`` on ``rank`` is a pure function of ``(seed, k, rank)``."""

    def __init__(self, size: int, batch_size: int, batches_per_epoch: int, seed: int, val_fraction: float,
                 split_seed: int, algorithm: Algorithm, min_size: int | None = None) -> None:
        super().__init__(batches_per_epoch)
        self.size, self.batch_size, self.seed, self.min_size = size, batch_size, seed, min_size
        self.val_fraction, self.split_seed, self.algorithm = val_fraction, split_seed, algorithm

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        args = (self.val_fraction, self.split_seed, self.algorithm)
        return maze_batch([
            draw_maze(self.size, (self.seed, k, self.rank, i), False, *args) if self.min_size is None
            else draw_small_maze(self.size, self.min_size, (self.seed, k, self.rank, i), *args)
            for i in range(self.batch_size)  # over the rows of one batch; each maze is ~0.2 ms at 9x9
        ])


class FixedMazeBatches(ShardedSequentialBatches):
    """A fixed evaluation set of mazes, in order, dealt to ranks round-robin and cut into batches."""

    def __init__(self, mazes: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
        super().__init__(torch.stack([mazes, targets], dim=1), batch_size)  # (N, 2, S, S)

    def convert(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"maze": batch[:, 0], "target": batch[:, 1]}


class MazeDataModule(L.LightningDataModule):
    """Perfect mazes and their shortest path as a per-cell target.

    Args:
        size: training and validation maze side in cells (odd, >= 5: ``2·rooms + 1``).
        min_size: None: every training maze is ``size × size``. Else each training maze has an odd side drawn from
            ``[min_size, size]`` and sits at a random even offset in a ``size × size`` grid of walls, so the rule
            meets mazes of several extents (validation stays at ``size``).
        batch_size: mazes per training batch.
        batches_per_epoch: training batches per epoch and rank.
        val_mazes: held-out mazes at ``size`` for validation.
        val_batch_size: mazes per validation/test batch.
        test_size: maze side of the test set (None: ``size``).
        test_mazes: held-out mazes at ``test_size``.
        val_fraction: share of maze space (by content hash) reserved for evaluation, in (0, 1).
        algorithm: ``"dfs"`` (randomised depth-first carving: long corridors) or ``"kruskal"`` (short dead ends).
        seed: seed of the training stream.
        eval_seed: seed of the validation and test sets.
        split_seed: key of the content hash that splits training from evaluation mazes.
    """

    def __init__(
        self,
        size: int = 9,
        batch_size: int = 32,
        batches_per_epoch: int = 500,
        val_mazes: int = 256,
        val_batch_size: int = 64,
        test_size: int | None = None,
        test_mazes: int = 256,
        val_fraction: float = 0.1,
        algorithm: Algorithm = "dfs",
        seed: int = 1234,
        eval_seed: int = 0,
        split_seed: int = 0,
        min_size: int | None = None,
    ) -> None:
        super().__init__()
        check_size(size, "size")
        if min_size is not None and check_size(min_size, "min_size") > size:
            raise ValueError(f"min_size={min_size} must be <= size={size}")
        if test_size is not None:
            check_size(test_size, "test_size")
        check_positive(batch_size=batch_size, batches_per_epoch=batches_per_epoch, val_mazes=val_mazes,
                       val_batch_size=val_batch_size, test_mazes=test_mazes)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        check_choice("algorithm", algorithm, Algorithm)
        self.save_hyperparameters()
        self.size, self.batch_size, self.batches_per_epoch = size, batch_size, batches_per_epoch
        self.val_mazes, self.val_batch_size = val_mazes, val_batch_size
        self.test_size, self.test_mazes = test_size or size, test_mazes
        self.val_fraction, self.algorithm = val_fraction, algorithm
        self.seed, self.eval_seed, self.split_seed, self.min_size = seed, eval_seed, split_seed, min_size
        self._sets: dict[str, dict[str, torch.Tensor]] = {}

    def eval_set(self, size: int, n: int) -> dict[str, torch.Tensor]:
        """``n`` held-out mazes of side ``size`` (drawn once, then cached): ``{"maze", "target"}`` (n, S, S)."""
        key = f"{size}x{n}"
        if key not in self._sets:
            self._sets[key] = maze_batch(held_out_mazes(size, n, self.eval_seed, self.val_fraction, self.split_seed,
                                                        self.algorithm))
            log.info("maze data: %d held-out mazes of %dx%d cells", n, size, size)
        return self._sets[key]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self.eval_set(self.size, self.val_mazes)
        if stage in (None, "test"):
            self.eval_set(self.test_size, self.test_mazes)

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _place(self, ds: IterableDataset) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomMazeBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds: IterableDataset) -> DataLoader:
        self._place(ds)
        return PlacedLoader(ds, self._place, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(RandomMazeBatches(self.size, self.batch_size, self.batches_per_epoch, self.seed,
                                              self.val_fraction, self.split_seed, self.algorithm, self.min_size))

    def val_dataloader(self) -> DataLoader:
        s = self.eval_set(self.size, self.val_mazes)
        return self._loader(FixedMazeBatches(s["maze"], s["target"], self.val_batch_size))

    def test_dataloader(self) -> DataLoader:
        s = self.eval_set(self.test_size, self.test_mazes)
        return self._loader(FixedMazeBatches(s["maze"], s["target"], self.val_batch_size))
