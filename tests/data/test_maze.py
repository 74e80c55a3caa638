"""MazeDataModule: batches are pure functions of the step (exact mid-epoch resume), evaluation mazes are held out."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.data.generators.maze import WALL, embed_maze, make_maze, maze_split_unit, shortest_path_mask
from neat_lightning.data.maze import MazeDataModule


def test_batches_are_pure_functions_of_the_step_and_resume_mid_epoch():
    dm = MazeDataModule(size=9, batch_size=4, batches_per_epoch=5, val_mazes=8)
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    first = list(ds)
    assert len(first) == 5 and first[0]["maze"].shape == (4, 9, 9) and first[0]["target"].shape == (4, 9, 9)
    ds.start_batch = 3  # a run resumed at global step 3 continues mid-epoch with the same batches
    resumed = list(ds)
    assert len(resumed) == 2
    for a, b in zip(first[3:], resumed):
        assert torch.equal(a["maze"], b["maze"]) and torch.equal(a["target"], b["target"])
    ds.start_batch = 5  # the next epoch: new mazes
    assert not torch.equal(next(iter(ds))["maze"], first[0]["maze"])
    other = MazeDataModule(size=9, batch_size=4, batches_per_epoch=5, seed=99).train_dataloader().dataset
    assert not torch.equal(next(iter(other))["maze"], first[0]["maze"])


def test_ranks_get_different_batches():
    ds = MazeDataModule(batch_size=2, batches_per_epoch=2).train_dataloader().dataset
    a = next(iter(ds))["maze"]
    ds.rank = 1
    assert not torch.equal(next(iter(ds))["maze"], a)


def test_validation_and_test_sets_are_held_out_fixed_and_checked():
    dm = MazeDataModule(size=9, batch_size=8, batches_per_epoch=20, val_mazes=24, val_batch_size=10, test_size=17,
                        test_mazes=6, val_fraction=0.3)
    dm.setup()
    val = list(dm.val_dataloader())
    assert [len(b["maze"]) for b in val] == [10, 10, 4]
    test = list(dm.test_dataloader())
    assert test[0]["maze"].shape == (6, 17, 17)
    mazes = torch.cat([b["maze"] for b in val])
    assert all(maze_split_unit(m) < 0.3 for m in mazes)
    for b in val + test:
        for m, t in zip(b["maze"], b["target"]):
            mask, n = shortest_path_mask(m)
            assert n == 1 and torch.equal(mask, t)
    train = {m.numpy().tobytes() for b in dm.train_dataloader().dataset for m in b["maze"]}
    assert not train & {m.numpy().tobytes() for m in mazes}
    again = MazeDataModule(size=9, val_mazes=24, val_batch_size=10, val_fraction=0.3)
    assert torch.equal(torch.cat([b["maze"] for b in again.val_dataloader()]), mazes)


def test_smaller_training_mazes_sit_in_walls_with_their_own_path():
    """``min_size``: training mazes of several odd sides, each walled into the training grid at an even offset, with
    the BFS-checked path of the maze it holds; still a pure function of the step."""
    dm = MazeDataModule(size=9, min_size=5, batch_size=16, batches_per_epoch=3)
    ds = dm.train_dataloader().dataset
    batches = list(ds)
    extents = set()
    for b in batches:
        for m, t in zip(b["maze"], b["target"]):
            mask, n = shortest_path_mask(m)
            assert n == 1 and torch.equal(mask, t)
            rows = (m != WALL).any(1).nonzero()
            extents.add(int(rows.max() - rows.min()) + 3)  # rooms fill rows 1 .. side - 2 of the maze
            assert int(rows.min()) % 2 == 1  # rooms at odd coordinates
    assert {5, 7, 9} <= extents
    ds.start_batch = 2
    assert torch.equal(next(iter(ds))["maze"], batches[2]["maze"])
    with pytest.raises(ValueError, match=r"offset=\(1, 0\) must be even"):
        embed_maze(make_maze(5, 0), 9, (1, 0))


@pytest.mark.parametrize("kw, match", [
    (dict(min_size=11), r"min_size=11 must be <= size=9"),
    (dict(min_size=4), r"min_size=4 must be an odd number of cells >= 5"),
    (dict(size=8), r"size=8 must be an odd number of cells >= 5"),
    (dict(test_size=3), r"test_size=3 must be an odd number of cells >= 5"),
    (dict(batch_size=0), r"batch_size=0 must be >= 1"),
    (dict(val_fraction=1.0), r"val_fraction=1.0 must be in \(0, 1\)"),
    (dict(algorithm="prim"), r"algorithm='prim' must be 'dfs' or 'kruskal'"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MazeDataModule(**kw)
