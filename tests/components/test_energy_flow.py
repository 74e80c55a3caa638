import pytest
import torch

from neat_lightning.components.energy_flow import (
    EnergyFlow,
    EnergyFlowConfig,
    drift_per_step,
    nearest_cell,
    respawn,
    spawn_carriers,
)
from neat_lightning.components.lattice import LatticeConfig


def test_100k_carriers_are_created_vectorised_on_the_input_face():
    cfg, lattice = EnergyFlowConfig(carriers=100_000), LatticeConfig(25, 50, 50, channels=4)
    c = spawn_carriers(cfg, 2, generator=torch.Generator().manual_seed(0))
    assert c.position.shape == (2, 100_000, 3) and c.memory.shape == (2, 100_000, 5, 3)
    assert (c.position[..., 0] == -1).all() and c.position.abs().max() <= 1
    assert c.alive.all() and (c.energy == 1).all()
    # uniform over the face: every one of the 50x50 face cells gets carriers
    assert nearest_cell(c.position[0], lattice.size).unique().numel() == 50 * 50


@pytest.mark.parametrize("size", [(5, 4, 7), (1, 3, 2), (10, 20, 20)])
def test_nearest_cell_by_rounding_equals_distance_search(size):
    pos = torch.rand(500, 3) * 2 - 1
    dims = torch.tensor(size)
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1) for n in size),
                                      indexing="ij"), -1).reshape(-1, 3)
    brute = torch.cdist(pos, grid).argmin(1)
    fast = nearest_cell(pos, size)
    # ties (points exactly between two cells) may go either way; none occur for random points
    assert torch.equal(fast, brute)
    assert fast.max() < dims.prod()


def test_flow_is_finite_moves_within_limits_and_terminates_at_the_output_face():
    torch.manual_seed(0)
    cfg = EnergyFlowConfig(carriers=2000, max_step=0.2, energy_decay=0.99)
    lattice = LatticeConfig(6, 5, 5, channels=4, steps=40)
    flow = EnergyFlow(cfg, lattice)
    torch.nn.init.normal_(flow.move.weight, std=3.0)  # large learned moves: the clamps must hold
    cells = torch.zeros(2, 6 * 5 * 5, 4)
    cells[:, : 25] = torch.randn(2, 25, 4)
    c = spawn_carriers(cfg, 2, generator=torch.Generator().manual_seed(1))
    limit = cfg.max_step * (1 + flow.drift)
    with torch.no_grad():
        for t in range(lattice.steps):
            prev = c
            cells, c = flow.step(cells, c)
            assert torch.isfinite(cells).all() and torch.isfinite(c.hidden).all()
            moved = (c.position - prev.position).abs()
            assert moved.max() <= limit + 1e-6 and c.position.abs().max() <= 1
            assert torch.equal(c.memory[:, :, -1], c.position) and torch.equal(c.memory[:, :, :-1], prev.memory[:, :, 1:])
            assert (moved[~prev.alive] == 0).all()  # stopped carriers stay put
            assert (c.energy <= prev.energy).all()
    # the drift carries every carrier to the output face within depth - 1 steps of net progress
    assert not c.alive.any() and (c.position[..., 0] == 1).all()


def test_long_run_with_respawn_has_no_nan():
    torch.manual_seed(0)
    cfg = EnergyFlowConfig(carriers=1000)
    flow = EnergyFlow(cfg, LatticeConfig(8, 10, 10, channels=4))
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(1, 800, 4)
    c = spawn_carriers(cfg, 1, generator=g)
    with torch.no_grad():
        for _ in range(60):
            cells, c = flow.step(cells, c)
            c = respawn(c, cfg, g)
    assert torch.isfinite(cells).all() and c.alive.all()


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    cfg = EnergyFlowConfig(carriers=4, carrier_dim=3, memory=2)
    flow = EnergyFlow(cfg, LatticeConfig(3, 2, 2, channels=2, steps=3)).double()
    torch.nn.init.normal_(flow.move.weight, std=0.1)
    face = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)

    def f(x):
        cells, _ = flow(x, generator=torch.Generator().manual_seed(0))
        return cells[:, -4:]

    assert torch.autograd.gradcheck(f, (face,), eps=1e-6, atol=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="carriers=0 must be >= 1"):
        EnergyFlowConfig(carriers=0)
    with pytest.raises(ValueError, match=r"energy_decay=1.5 must be in \(0, 1\]"):
        EnergyFlowConfig(energy_decay=1.5)
    with pytest.raises(ValueError, match="max_step=0 must be > 0"):
        EnergyFlowConfig(max_step=0)


def test_drift_crosses_the_lattice_in_depth_minus_one_steps():
    assert drift_per_step(6) == pytest.approx(0.4) and drift_per_step(1) == 2.0
    assert EnergyFlow(EnergyFlowConfig(), LatticeConfig(depth=6)).drift == drift_per_step(6)
