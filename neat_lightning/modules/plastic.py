"""PlasticLattice: the plasticity, staged-lattice and cache-release methods shared by the modules that own a
:class:`~neat_lightning.components.lattice_state.LatticeState` (``LatticeNetwork``, ``LatticeMazeSolver``).

The mixin holds no state of its own: the module keeps ``self.cells`` (the state: connections, profile, clustering
switch), the caches of its last training forward (``_last_activity`` (T, D, H, W), ``_last_cells`` (N, C)) and a
``_record()`` that writes its structural entry, of which :meth:`PlasticLattice.plastic_structure` is the shared part
(and :meth:`PlasticLattice.restore_plastic` its reader). Checkpoints are unchanged by it: the entries it writes and
reads are those the modules wrote before.

It answers the ``Plastic``, ``StagedLattice`` and ``Releasable`` protocols (:mod:`neat_lightning.protocols`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from neat_lightning.components.lattice_state import LatticeState
from neat_lightning.components.plasticity import PlasticityProfile, profile_by_name


class PlasticLattice:
    """Profile and clustering switches, pruning, cache release and the structural record of a lattice's cells.

    Put before the LightningModule base (``class M(PlasticLattice, ResumableModule)``); the module sets ``cells``,
    ``_last_activity``, ``_last_cells`` in ``__init__`` and defines ``_record()``.
    """

    cells: LatticeState
    _last_activity: torch.Tensor | None
    _last_cells: torch.Tensor | None

    def _record(self) -> None:  # pragma: no cover - every module defines its own
        raise NotImplementedError

    # -- structure -------------------------------------------------------------------------------------------------

    def plastic_structure(self) -> dict[str, Any]:
        """The profile (as a dict of its fields) and the clustering switch, for the module's structural entry."""
        return {"profile": dataclasses.asdict(self.cells.profile), "clustering": bool(self.cells.clustering_enabled)}

    def restore_plastic(self, state: dict[str, Any]) -> None:
        """Set profile and clustering switch from a structural entry (a profile given as a dict of fields or by
        name; none keeps the current one)."""
        profile = state.get("profile")
        if profile is not None:
            self.cells.profile = PlasticityProfile(**profile) if isinstance(profile, dict) else profile_by_name(profile)
        self.cells.clustering_enabled = bool(state.get("clustering", False))

    # -- Plastic and StagedLattice protocols -----------------------------------------------------------------------

    def set_plasticity_profile(self, profile: PlasticityProfile) -> None:
        """Switch the rules' learning-rate multipliers and activity threshold (the ``Plastic`` protocol)."""
        if not isinstance(profile, PlasticityProfile):
            raise TypeError(f"profile must be a PlasticityProfile, got {type(profile).__name__}")
        self.cells.profile = profile
        self._record()

    def set_clustering_enabled(self, enabled: bool) -> None:
        """Turn the k-means clustering of the cells on or off."""
        self.cells.clustering_enabled = bool(enabled)
        self._record()

    def prune_connections(self, sparsity: float) -> float:
        """Global magnitude pruning of the connections to ``sparsity``; returns the sparsity reached."""
        return self.cells.prune(sparsity)

    def release_memory(self) -> int:
        """Drop the cached activity and cells of the last forward (the ``Releasable`` protocol). Returns bytes freed."""
        freed = sum(t.numel() * t.element_size() for t in (self._last_activity, self._last_cells) if t is not None)
        self._last_activity = self._last_cells = None
        return freed

    @property
    def profile(self) -> PlasticityProfile:
        return self.cells.profile

    @property
    def clustering_enabled(self) -> bool:
        return self.cells.clustering_enabled

    @property
    def sparsity(self) -> float:
        return self.cells.sparsity
