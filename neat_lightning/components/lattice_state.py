"""The per-cell state of a plastic lattice and everything that changes it between optimiser steps.

:class:`LatticeState` holds, for a ``D × H × W`` lattice, the buffers a checkpoint must carry:

- ``connections`` (D, H, W, 26) float: plastic weight ``w[x, k]`` of the message cell ``x`` receives from ``x + o_k``;
- ``connection_mask`` (D, H, W, 26) bool: False for pruned connections (kept at zero);
- ``trace`` (D, H, W) float: STDP trace; ``theta`` (D, H, W) float: BCM sliding threshold;
- ``cluster_ids`` (D, H, W) int64 and the cosine k-means (``kmeans.centroids`` (K, C), ``counts``, ``initted``);

plus two switches set by stages (plain attributes, recorded by the module as structural state): the active
:class:`~neat_lightning.protocols.PlasticityProfile` and whether clustering runs.

It changes that state, always vectorised over cells: :meth:`LatticeState.plasticity_step` (the combined STDP/BCM/
competitive rule of :mod:`neat_lightning.components.plasticity`, then a k-means step), :meth:`LatticeState.prune`
(global magnitude pruning) and :meth:`LatticeState.resize` (new size, zeroed or resampled from the old one with
:func:`resample_cells`: trilinear for weights, traces and thresholds, nearest for the mask and cluster ids).

Axis legend: ``d h w`` lattice depth/height/width, ``k`` a per-cell feature (the 26 neighbour directions, or 1),
``n`` cells, ``b`` batch, ``c`` cell channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.components.clustering import ClusteringConfig, CosineKMeans, cluster_count, coordination_loss
from neat_lightning.components.lattice import spectral_emergence
from neat_lightning.components.plasticity import (
    N_NEIGHBOURS,
    PlasticityConfig,
    PlasticityProfile,
    PlasticityState,
    magnitude_prune_mask,
    plasticity_update,
    profile_by_name,
)


def resample_cells(field: torch.Tensor, size: tuple[int, int, int], mode: str) -> torch.Tensor:
    """A per-cell field (D, H, W, K) resampled to ``size`` -> (D', H', W', K) (``"trilinear"``, corners aligned,
    or ``"nearest"``)."""
    x = rearrange(field.float(), "d h w k -> 1 k d h w")
    kw = {"align_corners": True} if mode == "trilinear" else {}
    out = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return rearrange(out, "1 k d h w -> d h w k").to(field.dtype)


class LatticeState(nn.Module):
    """Plastic connections, traces, thresholds and functional clusters of every cell (buffers, no parameters).

    Args:
        size: (D, H, W).
        channels: C, the cell-state width the clustering sees.
        plasticity: the rules' rates and bounds, whether they run, and the initial profile.
        clustering: K, the k-means sample, and whether clustering starts on.

    Attributes:
        profile: the profile in force (learning-rate multipliers and spike threshold).
        clustering_enabled: whether :meth:`plasticity_step` updates the clusters.
    """

    def __init__(
        self, size: tuple[int, int, int], channels: int, plasticity: PlasticityConfig, clustering: ClusteringConfig
    ) -> None:
        super().__init__()
        self.plasticity, self.clustering = plasticity, clustering
        self.profile: PlasticityProfile = profile_by_name(plasticity.profile)
        self.clustering_enabled = bool(clustering.enabled)
        self.kmeans = CosineKMeans(clustering.n_clusters, channels, clustering.sample_size)
        self._allocate(size, torch.device("cpu"))
        with torch.no_grad():
            self.connections.uniform_(0.5, 1.5)

    def _allocate(self, size: tuple[int, int, int], device: torch.device) -> None:
        """(Re)create every per-cell buffer at ``size``: zero weights, traces and ids, an all-alive mask."""
        D, H, W = size
        self.register_buffer("connections", torch.zeros(D, H, W, N_NEIGHBOURS, device=device))
        self.register_buffer("connection_mask", torch.ones(D, H, W, N_NEIGHBOURS, dtype=torch.bool, device=device))
        self.register_buffer("cluster_ids", torch.zeros(D, H, W, dtype=torch.long, device=device))
        self.register_buffer("trace", torch.zeros(D, H, W, device=device))
        self.register_buffer("theta", torch.zeros(D, H, W, device=device))

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.connections.shape[:3])

    @property
    def sparsity(self) -> float:
        """Fraction of connections pruned."""
        return float((~self.connection_mask).float().mean())

    def effective_connections(self) -> torch.Tensor:
        """(D, H, W, 26) the weights the lattice step uses: pruned connections are zero."""
        return self.connections * self.connection_mask

    # -- changes between optimiser steps ---------------------------------------------------------------------------

    @torch.no_grad()
    def plasticity_step(
        self, activity: torch.Tensor, cells: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Apply the combined plasticity rule under :attr:`profile` (when enabled and the profile is not frozen),
        then one k-means step on the cells (when clustering is on).

        Args:
            activity: (T, D, H, W) batch-mean activity of every lattice step of the last forward.
            cells: (D·H·W, C) batch-mean final cell states, or None (no clustering update).
            generator: draws the k-means sample.
        """
        p = self.profile
        if self.plasticity.enabled and (p.stdp or p.bcm or p.competitive):
            weights, state = plasticity_update(
                self.connections, activity, PlasticityState(self.trace, self.theta), p, self.plasticity,
                self.connection_mask,
            )
            self.connections.copy_(weights)
            self.trace.copy_(state.trace)
            self.theta.copy_(state.theta)
        if self.clustering_enabled and cells is not None:
            ids = self.kmeans.update(cells, generator=generator)
            self.cluster_ids.copy_(ids.reshape(self.cluster_ids.shape))

    @torch.no_grad()
    def prune(self, sparsity: float) -> float:
        """Global magnitude pruning of the connections to ``sparsity`` (never regrowing); returns the sparsity
        reached."""
        self.connection_mask.copy_(magnitude_prune_mask(self.connections, self.connection_mask, sparsity))
        self.connections.mul_(self.connection_mask)
        return self.sparsity

    @torch.no_grad()
    def resize(self, size: tuple[int, int, int], resample: bool = False) -> None:
        """Give every per-cell buffer the size ``size`` (D, H, W).

        With ``resample`` the learnt values carry over: connections, traces and BCM thresholds trilinearly (corners
        aligned), the pruning mask and cluster ids by nearest neighbour, and pruned connections stay zero. Without,
        the buffers are reset (zero weights; a checkpoint's values load afterwards). The k-means centroids do not
        depend on the size and are kept.
        """
        size = tuple(int(s) for s in size)
        old = {name: getattr(self, name).clone() for name in ("connections", "connection_mask", "cluster_ids",
                                                               "trace", "theta")} if resample else None
        self._allocate(size, self.connections.device)
        if old is None:
            return
        self.connections.copy_(resample_cells(old["connections"], size, "trilinear"))
        self.connection_mask.copy_(resample_cells(old["connection_mask"].float(), size, "nearest") > 0.5)
        self.connections.mul_(self.connection_mask)
        self.cluster_ids.copy_(resample_cells(old["cluster_ids"][..., None].float(), size, "nearest")[..., 0].long())
        self.trace.copy_(resample_cells(old["trace"][..., None], size, "trilinear")[..., 0])
        self.theta.copy_(resample_cells(old["theta"][..., None], size, "trilinear")[..., 0])

    # -- what the clusters and the activity say ---------------------------------------------------------------------

    def coordination_loss(self, state: torch.Tensor) -> torch.Tensor:
        """Cluster coordination term of a lattice state (N, B, C): every cell of every sample pulled towards its
        cluster's centroid (:func:`~neat_lightning.components.clustering.coordination_loss`). Returns () float."""
        ids = self.cluster_ids.reshape(-1).repeat_interleave(state.shape[1])  # (N·B,) matching (n b) rows
        return coordination_loss(rearrange(state, "n b c -> (n b) c"), ids, self.kmeans.centroids)

    def metrics(self, activity: torch.Tensor) -> dict[str, float]:
        """Metrics of a (D, H, W) activity field under the current profile and structure: ``activity`` (fraction
        of cells above the profile's threshold), ``emergence`` and ``wavelength``
        (:func:`~neat_lightning.components.lattice.spectral_emergence`), ``clusters`` in use (0 while clustering is
        off) and ``sparsity``."""
        entropy, wavelength = spectral_emergence(activity)
        return {
            "activity": float((activity > self.profile.activity_threshold).float().mean()),
            "emergence": entropy,
            "wavelength": wavelength,
            "clusters": float(cluster_count(self.cluster_ids, self.clustering.n_clusters))
            if self.clustering_enabled else 0.0,
            "sparsity": self.sparsity,
        }

