"""Functional clustering of lattice cells: cosine k-means over cell states, mini-batch, no N×N matrix.

Cells whose state vectors point the same way (cosine similarity) belong to one functional cluster. Centroids are
updated with Sculley's mini-batch k-means (2010, "Web-scale k-means clustering"): each centroid moves towards the
mean of the cells assigned to it with a per-centroid rate ``1 / (cells seen so far)``, then is renormalised to the
unit sphere (spherical k-means, Dhillon & Modha 2001). Assignment is a ``(N, C) × (C, K)`` product, so a lattice of
1.6 M cells costs ``N·K`` memory, never ``N²``.

Axis legend: ``n`` cells, ``c`` state channels, ``k`` clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClusteringConfig:
    """Functional clustering of the lattice's cells and the coordination loss built on it."""

    n_clusters: int = 8  # K
    sample_size: int = 4096  # cells sampled per k-means update
    enabled: bool = False  # cluster from the start (PlasticityStages switches it per stage)
    coordination: float = 0.0  # weight of the cluster coordination loss (0 = off)

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters={self.n_clusters} must be >= 1")
        if self.sample_size < 1:
            raise ValueError(f"sample_size={self.sample_size} must be >= 1")
        if self.coordination < 0:
            raise ValueError(f"coordination={self.coordination} must be >= 0")


class CosineKMeans(nn.Module):
    """Spherical mini-batch k-means whose centroids and counts are buffers (so checkpoints carry them).

    Args:
        n_clusters: K.
        dim: C, the feature width.
        sample_size: cells drawn per :meth:`update` (all of them when fewer).
    """

    def __init__(self, n_clusters: int, dim: int, sample_size: int = 4096) -> None:
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"n_clusters={n_clusters} must be >= 1")
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        if sample_size < 1:
            raise ValueError(f"sample_size={sample_size} must be >= 1")
        self.n_clusters, self.dim, self.sample_size = n_clusters, dim, sample_size
        self.register_buffer("centroids", torch.zeros(n_clusters, dim))  # (K, C) unit vectors once initialised
        self.register_buffer("counts", torch.zeros(n_clusters))  # (K,) cells seen per centroid
        self.register_buffer("initted", torch.tensor(False))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) -> nearest centroid by cosine similarity, (N,) int64 (all 0 before initialisation)."""
        if not bool(self.initted):
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return (F.normalize(x.float(), dim=-1) @ self.centroids.T).argmax(-1)  # (N, K) -> (N,)

    @torch.no_grad()
    def update(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mini-batch step on a sample of the rows of ``x`` (N, C); returns the assignment of all rows (N,).

        The first call initialises the centroids from ``K`` distinct sampled rows (k-means++ is not worth its cost
        here: the mini-batch updates move centroids quickly).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x shape {tuple(x.shape)} must be (N, {self.dim})")
        xn = F.normalize(x.float(), dim=-1)
        n = xn.shape[0]
        idx = torch.randperm(n, generator=generator, device="cpu")[: self.sample_size].to(x.device)
        batch = xn[idx]  # (M, C)
        if not bool(self.initted):
            k = min(self.n_clusters, batch.shape[0])
            self.centroids[:k] = batch[:k]
            if k < self.n_clusters:  # fewer cells than clusters: the extra centroids repeat cells
                self.centroids[k:] = batch[torch.arange(self.n_clusters - k, device=x.device) % k]
            self.initted.fill_(True)
        labels = (batch @ self.centroids.T).argmax(-1)  # (M,)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, batch)  # (K, C)
        hits = torch.bincount(labels, minlength=self.n_clusters).float()  # (K,)
        new_counts = self.counts + hits
        moved = (self.centroids * self.counts[:, None] + sums) / new_counts.clamp_min(1)[:, None]
        self.centroids.copy_(torch.where(hits[:, None] > 0, F.normalize(moved, dim=-1), self.centroids))
        self.counts.copy_(new_counts)
        return (xn @ self.centroids.T).argmax(-1)


def cluster_count(ids: torch.Tensor, n_clusters: int) -> int:
    """Number of distinct clusters in use among the cells' ids (any shape)."""
    return int((torch.bincount(ids.reshape(-1), minlength=n_clusters) > 0).sum())


def coordination_loss(x: torch.Tensor, ids: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster-level coordination term: mean cosine distance between each cell and its cluster's centroid.

    Args:
        x: (N, C) cell states.
        ids: (N,) cluster id per cell.
        centroids: (K, C) unit centroids (treated as constants).

    Returns:
        () float in [0, 2]; minimising it pulls cells of one cluster towards a shared direction.
    """
    return (1.0 - (F.normalize(x, dim=-1) * centroids[ids].detach()).sum(-1)).mean()
