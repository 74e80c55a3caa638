"""The shared loading pieces: seeded generators, step-aligned and sharded streams, the placed loader, the switch
between two loaders, and file patterns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neat_lightning.data.loading import (
    PlacedLoader,
    ShardedSequentialBatches,
    StepAlignedBatches,
    SwitchLoader,
    batch_generator,
    check_positive,
    resolve_paths,
)


class Indexed(StepAlignedBatches):
    """Batch ``k`` is ``[[offset + k, rank]] * rows``: what was served is readable from the batch itself."""

    def __init__(self, batches_per_epoch: int, rows: int = 2, offset: int = 0) -> None:
        super().__init__(batches_per_epoch)
        self.batch_size, self.offset = rows, offset

    def batch(self, k: int) -> torch.Tensor:
        return torch.tensor([[self.offset + k, self.rank]] * self.batch_size)


def served(batches) -> list[int]:
    return [int(b[0, 0]) for b in batches]


# -- batch_generator ---------------------------------------------------------------------------------------------------


def test_batch_generator_is_a_pure_function_of_its_keys():
    draw = lambda *keys: torch.randint(1 << 30, (4,), generator=batch_generator(*keys))  # noqa: E731
    assert torch.equal(draw(7, 3, 0), draw(7, 3, 0))
    assert len({tuple(draw(*keys).tolist()) for keys in [(7, 3, 0), (7, 3, 1), (7, 4, 0), (8, 3, 0), (3, 7, 0)]}) == 5


@pytest.mark.slow  # two fresh interpreters (~9 s on 2 cores)
def test_batch_generator_does_not_depend_on_the_hash_seed():
    code = ("import torch; from neat_lightning.data.loading import batch_generator; "
            "print(torch.randint(1 << 30, (3,), generator=batch_generator(5, 2, 1)).tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1


# -- StepAlignedBatches ------------------------------------------------------------------------------------------------


def test_step_aligned_batches_run_from_the_start_batch_to_the_end_of_its_epoch():
    ds = Indexed(batches_per_epoch=4)
    assert len(ds) == 4 and served(ds) == [0, 1, 2, 3]
    ds.start_batch = 2  # a run resumed after two batches
    assert served(ds) == [2, 3]
    ds.start_batch = 6  # mid second epoch
    assert served(ds) == [6, 7]
    ds.rank = 1
    assert all(int(b[0, 1]) == 1 for b in ds)


def test_step_aligned_order_is_the_same_for_any_number_of_workers():
    ds = Indexed(batches_per_epoch=7)
    ds.start_batch = 1
    one = served(PlacedLoader(ds, lambda d: None, num_workers=0))
    two = served(PlacedLoader(ds, lambda d: None, num_workers=2))
    assert one == two == [1, 2, 3, 4, 5, 6]


# -- ShardedSequentialBatches ------------------------------------------------------------------------------------------


class Doubled(ShardedSequentialBatches):
    def convert(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_batches_deal_every_item_to_exactly_one_rank(world_size: int):
    items = torch.arange(10)
    seen = []
    for rank in range(world_size):
        ds = Doubled(items, batch_size=3)
        ds.rank, ds.world_size = rank, world_size
        batches = list(ds)
        assert len(batches) == len(ds) == -(-len(items[rank::world_size]) // 3)
        assert torch.equal(torch.cat(batches), items[rank::world_size] * 2)  # in order, converted
        seen += torch.cat(batches).tolist()
    assert sorted(seen) == (items * 2).tolist()  # no item twice (no padding duplicates), none missing


# -- PlacedLoader ------------------------------------------------------------------------------------------------------


def test_placed_loader_places_the_dataset_each_time_an_iterator_is_made():
    ds = Indexed(batches_per_epoch=5)
    calls = []

    def place(d: Indexed) -> None:  # what a DataModule does: start at the trainer's global step
        calls.append(d)
        d.start_batch = 3 * (len(calls) - 1)

    loader = PlacedLoader(ds, place)
    assert served(loader) == [0, 1, 2, 3, 4]
    assert served(loader) == [3, 4]
    assert len(calls) == 2 and calls[0] is ds
    assert loader.batch_size is None  # the dataset yields whole batches


# -- SwitchLoader ------------------------------------------------------------------------------------------------------


def switch(second: Indexed, first: Indexed | None, at: int | None, replay: float = 0.0, start: int = 0):
    def place(d: StepAlignedBatches) -> None:
        d.start_batch = start

    first_loader = PlacedLoader(first, place) if first is not None else None
    return SwitchLoader(second, first_loader, place, lambda n: at, replay)


def test_switch_loader_serves_the_first_loader_until_the_switch_batch():
    first, second = Indexed(6, offset=100), Indexed(6, offset=200)
    assert served(switch(second, first, at=2)) == [100, 101, 202, 203, 204, 205]
    assert served(switch(second, first, at=None)) == [100, 101, 102, 103, 104, 105]  # no switch scheduled
    assert served(switch(second, first, at=0)) == [200, 201, 202, 203, 204, 205]
    assert served(switch(second, None, at=0)) == [200, 201, 202, 203, 204, 205]  # no first loader


def test_switch_loader_resumes_mid_epoch_on_the_same_batches():
    first, second = Indexed(6, offset=100), Indexed(6, offset=200)
    full = served(switch(second, first, at=3))
    assert served(switch(second, first, at=3, start=2)) == full[2:]
    assert served(switch(second, first, at=3, start=4)) == full[4:]


def test_switch_loader_length_is_the_first_loaders():
    assert len(switch(Indexed(6), Indexed(4), at=1)) == 4
    assert served(switch(Indexed(6, offset=200), Indexed(4, offset=100), at=1)) == [100, 201, 202, 203]
    assert len(switch(Indexed(6), None, at=0)) == 6


def test_switch_loader_replays_rows_of_the_first_loader():
    first, second = Indexed(4, rows=4, offset=100), Indexed(4, rows=4, offset=200)
    got = list(switch(second, first, at=1, replay=0.5))
    assert got[0][:, 0].tolist() == [100] * 4
    for k in range(1, 4):
        assert got[k][:, 0].tolist() == [100 + k] * 2 + [200 + k] * 2  # batch k of both loaders, 2 rows each


def test_switch_loader_refuses_mismatched_rows_and_bad_replay():
    class Wide(Indexed):
        def batch(self, k: int) -> torch.Tensor:
            return torch.zeros(self.batch_size, 5, dtype=torch.long)

    with pytest.raises(ValueError, match=r"pretraining windows have shape \(2,\) and scene windows \(5,\)"):
        list(switch(Wide(4), Indexed(4), at=0, replay=0.5))
    with pytest.raises(ValueError, match=r"replay=1.0 must be in \[0, 1\)"):
        SwitchLoader(Indexed(4), None, lambda d: None, lambda n: 0, replay=1.0)


# -- resolve_paths -----------------------------------------------------------------------------------------------------


def test_resolve_paths_expands_files_and_globs_and_names_the_field(tmp_path: Path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name)
    assert resolve_paths(str(tmp_path / "*.txt"), "files") == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_paths([str(tmp_path / "c.md"), str(tmp_path / "a*")], "files") == [tmp_path / "c.md",
                                                                                       tmp_path / "a.txt"]
    with pytest.raises(FileNotFoundError, match=r"train_files: no such file: '.*missing.txt'"):
        resolve_paths([str(tmp_path / "missing.txt")], "train_files")
    with pytest.raises(FileNotFoundError, match=r"val_files: the glob '.*\*.csv' matches no file"):
        resolve_paths([str(tmp_path / "*.csv")], "val_files")
    with pytest.raises(IsADirectoryError, match=r"scene_files: '.*' is a directory; give files or a glob"):
        resolve_paths([str(tmp_path)], "scene_files")


# -- check_positive ----------------------------------------------------------------------------------------------------


def test_check_positive_refuses_the_first_value_below_one_by_name():
    check_positive()
    check_positive(batch_size=1, block_size=256)
    with pytest.raises(ValueError, match=r"^batch_size=0 must be >= 1$"):
        check_positive(block_size=8, batch_size=0, batches_per_epoch=-3)
    with pytest.raises(ValueError, match=r"^val_rows=-2 must be >= 1$"):
        check_positive(val_rows=-2, block_size=0)
