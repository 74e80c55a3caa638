"""PlasticLattice: the same profile/clustering switches, pruning, cache release and structural record serve
LatticeNetwork and LatticeMazeSolver, and a record written by one round-trips through restore_structure."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.plasticity import PROFILES
from neat_lightning.modules.lattice import LatticeNetwork
from neat_lightning.modules.lattice_maze import LatticeMazeSolver
from neat_lightning.modules.plastic import PlasticLattice
from neat_lightning.protocols import Plastic, Releasable, StagedLattice

BUILDERS = {
    "lattice": lambda: LatticeNetwork(
        lattice={"depth": 3, "height": 4, "width": 4, "channels": 4, "hidden": 8, "steps": 2},
        text={"encoder_dim": 8, "decoder_dim": 8, "heads": 1, "decoder_layers": 1, "max_question_bytes": 8,
              "max_answer_bytes": 4},
    ),
    "lattice_maze": lambda: LatticeMazeSolver(
        lattice=LatticeConfig(depth=1, height=7, width=7, channels=6, hidden=8, steps=4, fire_rate=1.0),
    ),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shared_switches_record_and_restore(name):
    torch.manual_seed(0)
    m = BUILDERS[name]()
    assert isinstance(m, PlasticLattice) and all(isinstance(m, p) for p in (Plastic, StagedLattice, Releasable))
    m.set_plasticity_profile(PROFILES["consolidation"])
    m.set_clustering_enabled(True)
    record = m.structure[name]
    assert record["profile"]["name"] == "consolidation" and record["clustering"] is True
    assert m.profile is m.cells.profile and m.clustering_enabled

    fresh = BUILDERS[name]()
    assert fresh.profile.name != "consolidation" and not fresh.clustering_enabled
    fresh.restore_structure(name, record)
    assert fresh.profile == PROFILES["consolidation"] and fresh.clustering_enabled
    assert fresh.structure[name] == record
    fresh.restore_structure(name, {**record, "profile": "freeze", "clustering": False})  # a profile by name
    assert fresh.profile == PROFILES["freeze"] and not fresh.clustering_enabled

    assert m.prune_connections(0.5) == pytest.approx(0.5, abs=0.05) and m.sparsity == m.cells.sparsity
    m._last_activity, m._last_cells = torch.zeros(2, 3, 4), torch.zeros(5, 6)
    assert m.release_memory() == (24 + 30) * 4 and m._last_activity is None and m._last_cells is None
    with pytest.raises(TypeError, match="PlasticityProfile"):
        m.set_plasticity_profile("consolidation")
