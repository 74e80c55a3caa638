from dataclasses import replace

import pytest

from neat_lightning.components.memory_budget import (
    GIB,
    SIZE_SCHEDULE,
    MemoryConfig,
    estimate_memory,
    largest_lattice_within,
)

BASE = MemoryConfig(size=(24, 32, 32), channels=16, hidden=64, steps=23, batch=2)


@pytest.mark.parametrize(
    "field, values",
    [("size", [(8, 8, 8), (16, 16, 16), (16, 32, 32), (96, 128, 128)]), ("channels", [4, 8, 16, 32]),
     ("hidden", [16, 64, 256]), ("steps", [1, 10, 23, 100]), ("batch", [1, 2, 8])],
)
def test_estimate_grows_with_each_argument(field, values):
    for ckpt in (0, 3):
        est = [estimate_memory(replace(BASE, **{field: v}, checkpoint_every=ckpt)) for v in values]
        assert est == sorted(est) and est[0] < est[-1], (field, ckpt, est)


def test_savers_reduce_the_estimate():
    full = MemoryConfig(size=(96, 128, 128), channels=16)
    plain = estimate_memory(full)
    assert estimate_memory(replace(full, checkpoint_every=3)) < plain / 2
    assert estimate_memory(replace(full, precision="bf16-mixed")) < plain
    assert estimate_memory(replace(full, stencil="shift")) < plain
    saved = estimate_memory(replace(full, checkpoint_every=3, stencil="shift"))
    assert saved < 16 * GIB < plain  # the full size fits 16 GiB only with the savers
    assert estimate_memory(replace(full, sparsity=0.7)) == plain  # dense connection storage


def test_largest_lattice_within_is_monotone_in_the_budget():
    sizes = [largest_lattice_within(int(b * GIB), MemoryConfig(checkpoint_every=3, stencil="shift"))
             for b in (0.1, 1, 2, 4, 8, 16, 64)]
    assert sizes[0] is None and sizes[-1] == SIZE_SCHEDULE[-1]
    ranks = [-1 if s is None else SIZE_SCHEDULE.index(s) for s in sizes]
    assert ranks == sorted(ranks)


def test_bad_config():
    with pytest.raises(ValueError, match=r"size=\(0, 4, 4\) must be three positive ints"):
        MemoryConfig(size=(0, 4, 4))
    with pytest.raises(ValueError, match="precision='fp8' must be"):
        MemoryConfig(precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_every=-2 must be >= 0"):
        MemoryConfig(checkpoint_every=-2)
    with pytest.raises(ValueError, match="budget_bytes=0 must be > 0"):
        largest_lattice_within(0)
