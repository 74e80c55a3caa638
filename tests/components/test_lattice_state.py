import pytest
import torch

from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.lattice_state import LatticeState, resample_cells
from neat_lightning.components.plasticity import PROFILES, PlasticityConfig

SIZE = (3, 4, 5)


def state(**plasticity) -> LatticeState:
    torch.manual_seed(0)
    return LatticeState(SIZE, 4, PlasticityConfig(**plasticity), ClusteringConfig(n_clusters=3, sample_size=16))


def test_buffers_are_per_cell_and_the_switches_start_from_the_configs():
    s = state(profile="learning")
    shapes = {k: tuple(v.shape) for k, v in s.state_dict().items()}
    assert shapes["connections"] == shapes["connection_mask"] == (*SIZE, 26)
    assert shapes["cluster_ids"] == shapes["trace"] == shapes["theta"] == SIZE
    assert shapes["kmeans.centroids"] == (3, 4)
    assert s.size == SIZE and s.profile == PROFILES["learning"] and not s.clustering_enabled
    assert ((s.connections >= 0.5) & (s.connections <= 1.5)).all() and s.sparsity == 0.0
    assert list(s.parameters()) == []  # plasticity only, no gradients


def test_plasticity_step_follows_profile_and_switches():
    s = state()
    activity = torch.rand(6, *SIZE)
    cells = torch.randn(60, 4)
    before = s.connections.clone()
    s.plasticity_step(activity, cells)
    assert not torch.equal(s.connections, before) and (s.trace != 0).any()
    assert (s.cluster_ids == 0).all()  # clustering off
    s.clustering_enabled = True
    s.plasticity_step(activity, cells, generator=torch.Generator().manual_seed(0))
    assert s.cluster_ids.unique().numel() > 1 and s.metrics(activity[-1])["clusters"] > 1
    s.profile = PROFILES["freeze"]
    frozen = s.connections.clone()
    s.plasticity_step(activity)
    assert torch.equal(s.connections, frozen)
    off = state(enabled=False)
    kept = off.connections.clone()
    off.plasticity_step(activity)
    assert torch.equal(off.connections, kept)


def test_prune_zeroes_the_weakest_and_never_regrows():
    s = state()
    assert s.prune(0.3) == pytest.approx(0.3, abs=0.01)
    assert (s.effective_connections()[~s.connection_mask] == 0).all()
    assert s.prune(0.1) == pytest.approx(0.3, abs=0.01)


def test_resize_resamples_or_resets():
    s = state()
    s.prune(0.5)
    s.trace.uniform_()
    conn, trace, mask = s.connections.clone(), s.trace.clone(), s.connection_mask.clone()
    s.resize((5, 6, 7), resample=True)
    assert s.size == (5, 6, 7) and s.trace.shape == (5, 6, 7)
    assert torch.allclose(s.trace[0, 0, 0], trace[0, 0, 0]) and torch.allclose(s.trace[-1, -1, -1], trace[-1, -1, -1])
    assert torch.equal(s.connection_mask[0, 0, 0], mask[0, 0, 0])
    assert torch.equal(s.connections[0, 0, 0], conn[0, 0, 0])  # pruned there stays zero, kept values stay
    assert (s.connections[~s.connection_mask] == 0).all()
    s.resize((2, 2, 2))
    assert s.size == (2, 2, 2) and (s.connections == 0).all() and s.connection_mask.all()


def test_resample_cells_nearest_keeps_values_and_dtype():
    ids = torch.randint(0, 5, (2, 3, 4, 1))
    out = resample_cells(ids, (4, 6, 8), "nearest")
    assert out.dtype == ids.dtype and set(out.unique().tolist()) <= set(ids.unique().tolist())


def test_metrics_and_coordination_loss():
    s = state()
    m = s.metrics(torch.rand(*SIZE))
    assert set(m) == {"activity", "emergence", "wavelength", "clusters", "sparsity"} and m["clusters"] == 0.0
    lattice_state = torch.randn(60, 2, 4, requires_grad=True)
    loss = s.coordination_loss(lattice_state)
    assert loss.shape == () and loss.requires_grad
