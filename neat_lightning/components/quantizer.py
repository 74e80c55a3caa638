"""Vector quantizer with an EMA codebook (VQ-VAE-2 / SoundStream recipe), written here rather than imported.

References:
    van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv 1711.00937): nearest-code lookup,
        straight-through gradient, commitment loss ``beta * ||z - sg(e)||^2`` with ``beta = 0.25``.
    Razavi et al. 2019 (VQ-VAE-2, arXiv 1906.00446), appendix: the codebook as an exponential moving average of
        the encodings assigned to each code (decay 0.99) with Laplace smoothing of the counts.
    Zeghidour et al. 2021 (SoundStream, arXiv 2107.03312) and Dhariwal et al. 2020 (Jukebox): k-means
        initialisation on the first batch, and restarting codes whose EMA usage falls below a threshold to encodings
        of the current batch.
    Yu et al. 2022 (ViT-VQGAN, arXiv 2110.04627): optional l2-normalised (cosine) codes, and factorised codes: the
        lookup runs in a low-dimensional projection of the encoding (``lookup_dim``), and a linear map takes the chosen
        low-dimensional code back up to the code dimension D the decoder reads (LlamaGen uses the same: 8-d lookup).

Why not ``vector-quantize-pytorch`` (docs/vqvae.md has the long form): its restarts and k-means sampling draw from
the global RNG (``torch.randperm`` without a generator), so a resumed run draws different restart vectors than the
uninterrupted one unless the process RNG state is restored too; it has no over-an-epoch usage counter; and it is a
dependency this project does not have. Everything here is ~200 lines and seeded from ``(seed, step)`` buffers that
live in the checkpoint.

Axis letters: ``N`` flattened vectors (batch x positions), ``K`` codes, ``D`` code dimension.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import pack, unpack
from torch import nn

from neat_lightning.choices import check_choice

RestartSampling = Literal["error", "uniform"]

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value ``q``, gradient of the identity into ``z`` (van den Oord et al. 2017, eq. 3)."""
    return z + (q - z).detach()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on ``(seed, step)``: restarts replay exactly after a resume."""
    key = int.from_bytes(hashlib.blake2b(repr((seed, step)).encode(), digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=device).manual_seed(key)


def squared_distances(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x: (N, D), codes: (K, D) -> (N, K) squared Euclidean distances, ``|x|^2 - 2 x.e + |e|^2`` (clamped at 0)."""
    d = torch.addmm((codes**2).sum(-1)[None], x, codes.T, alpha=-2.0)  # (N, K)
    return (d + (x**2).sum(-1, keepdim=True)).clamp_min_(0.0)


def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, cosine: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means. x: (N, D) -> (centres (K, D), counts (K,)). Empty clusters keep their previous centre;
    with fewer vectors than codes the initial centres repeat vectors (dead-code restarts then spread them)."""
    n = x.shape[0]
    idx = (torch.randperm(n, generator=generator, device=x.device)[:k] if n >= k
           else torch.randint(n, (k,), generator=generator, device=x.device))
    centres = x[idx].clone()
    counts = torch.zeros(k, device=x.device, dtype=x.dtype)
    for _ in range(iters):  # loop over iterations, not over vectors
        assign = squared_distances(x, centres).argmin(-1)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1.0)[:, None]
        if cosine:
            new = l2norm(new)
        centres = torch.where(counts[:, None] > 0, new, centres)
    return centres, counts


# ----------------------------------------------------------------------------------------------------------------------
# the quantizer


@dataclass
class QuantizerOutput:
    """What one forward pass returns.

    Attributes:
        quantized: (..., D) codes with the straight-through gradient into the input.
        indices: (...) int64 code ids.
        commit_loss: () ``beta * mean ||z - sg(e)||^2``.
        perplexity: () ``exp(entropy)`` of this batch's code histogram.
        restarted: () int64, codes restarted in this step (0 outside training).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    perplexity: torch.Tensor
    restarted: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer whose codebook is an EMA of the encodings assigned to each code.

    Args:
        codebook_size: number of codes K.
        dim: code dimension D.
        decay: EMA decay of the counts and sums (VQ-VAE-2: 0.99).
        commitment: beta, weight of the commitment loss (VQ-VAE: 0.25).
        eps: Laplace smoothing of the EMA counts.
        dead_code_threshold: a code whose EMA count (assignments per step) falls below this is restarted to an
            encoding of the current batch; 0 disables restarts. Scale it with vectors-per-batch / K.
        restart_sampling: ``uniform`` draws restart vectors uniformly from the batch; ``error`` draws them with
            probability proportional to their squared distance to the nearest code (k-means++-like), so restarted
            codes go where the codebook is worst.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        cosine: l2-normalise encodings and codes; distances are then between unit vectors.
        seed: seed of initialisation and restarts (together with the step counter, so resumes replay exactly).
        lookup_dim: factorised codes (ViT-VQGAN): project encodings ``dim -> lookup_dim`` (``project_in``), find the
            nearest of K ``lookup_dim``-dimensional codes (EMA, restarts and k-means all run in that space), and
            map the chosen code back ``lookup_dim -> dim`` (``project_out``, trained through the straight-through
            estimator). ``codebook`` is then ``project_out`` of the low-dimensional codes, (K, dim). ``None``: the
            lookup runs in ``dim`` itself (no projections).
        restart_distinct: restart each dead code to a *different* batch vector (sampled without replacement; when
            more codes are dead than the batch has vectors, the rest wait for the next step). With replacement,
            several codes can land on one vector, and all but one of them are wasted.
        restart_count: the EMA count a restarted code starts at; ``None``: the threshold itself. When codes receive
            less than one encoding a step on average (K larger than the batch), a code restarted at the threshold
            dies at the first step it is not hit; starting it at the mean count (vectors per batch / K) gives it
            ``log(restart_count / threshold) / (1 - decay)`` steps to prove itself.

    Buffers (all in the state dict): ``embed`` (K, L) the lookup codes (L = ``lookup_dim or dim``), ``embed_avg``
    (K, L) EMA sums, ``cluster_size``
    (K,) EMA counts, ``usage`` (K,) int64 lifetime training assignments, ``initted`` () bool, ``step`` () int64
    training updates so far.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        commitment: float = 0.25,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart_sampling: RestartSampling = "error",
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        cosine: bool = False,
        seed: int = 0,
        lookup_dim: int | None = None,
        restart_distinct: bool = False,
        restart_count: float | None = None,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size} must be >= 2")
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        if commitment < 0:
            raise ValueError(f"commitment={commitment} must be >= 0")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={dead_code_threshold} must be >= 0")
        check_choice("restart_sampling", restart_sampling, RestartSampling)
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters={kmeans_iters} must be >= 0")
        if restart_count is not None and restart_count < dead_code_threshold:
            raise ValueError(
                f"restart_count={restart_count} must be >= dead_code_threshold={dead_code_threshold} (or None)"
            )
        if lookup_dim is not None and not 1 <= lookup_dim:
            raise ValueError(f"lookup_dim={lookup_dim} must be >= 1 (or None: look codes up in dim={dim})")
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.commitment, self.eps = decay, commitment, eps
        self.dead_code_threshold, self.restart_sampling = dead_code_threshold, restart_sampling
        self.kmeans_init, self.kmeans_iters, self.cosine, self.seed = kmeans_init, kmeans_iters, cosine, seed
        self.lookup_dim, self.restart_distinct, self.restart_count = lookup_dim, restart_distinct, restart_count
        ldim = dim if lookup_dim is None else lookup_dim
        if lookup_dim is not None:
            self.project_in = nn.Linear(dim, lookup_dim)  # (..., D) -> (..., L)
            self.project_out = nn.Linear(lookup_dim, dim)  # (..., L) -> (..., D)

        g = torch.Generator().manual_seed(seed)
        embed = torch.randn(codebook_size, ldim, generator=g) / ldim**0.5
        if cosine:
            embed = l2norm(embed)
        self.register_buffer("embed", embed)  # (K, L)
        start = max(dead_code_threshold, eps)  # every code starts at the threshold (see _init_from_kmeans)
        self.register_buffer("embed_avg", embed * start)  # (K, L)
        self.register_buffer("cluster_size", torch.full((codebook_size,), start))  # (K,)
        self.register_buffer("usage", torch.zeros(codebook_size, dtype=torch.long))  # (K,)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    # -- lookup ----------------------------------------------------------------------------------------------------

    @property
    def lookup_codebook(self) -> torch.Tensor:
        """(K, L) the codes the nearest-neighbour lookup compares against (unit vectors when ``cosine``)."""
        return l2norm(self.embed) if self.cosine else self.embed

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codes the decoder sees: the lookup codes, or ``project_out`` of them when factorised."""
        return self._up(self.lookup_codebook)

    def _up(self, q: torch.Tensor) -> torch.Tensor:
        """(..., L) lookup-space codes -> (..., D)."""
        return q if self.lookup_dim is None else self.project_out(q)

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) encodings -> (..., L) vectors in the lookup space (projected, then normalised when cosine)."""
        if self.lookup_dim is not None:
            z = self.project_in(z)
        return l2norm(z) if self.cosine else z

    def indices_from_vectors(self, z: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """z: (..., D) -> (...) int64 nearest-code ids (no state changes). Processed in chunks of vectors."""
        flat, ps = pack([self._prepare(z.float())], "* d")
        codes = self.lookup_codebook.float()
        ids = torch.cat([squared_distances(c, codes).argmin(-1) for c in flat.split(chunk)]) if len(flat) else \
            torch.empty(0, dtype=torch.long, device=z.device)
        return unpack(ids, ps, "*")[0]

    def vectors_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., D) codes."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an integer tensor; got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}); got min {int(indices.min())}, max {int(indices.max())}"
            )
        return self._up(F.embedding(indices, self.lookup_codebook))

    # -- training updates -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_from_kmeans(self, flat: torch.Tensor) -> None:
        g = step_generator(self.seed, -1, flat.device)
        centres, counts = kmeans(flat, self.codebook_size, self.kmeans_iters, g, self.cosine)
        _broadcast_(centres)
        _broadcast_(counts)
        self.embed.copy_(centres)
        # every code starts at the threshold: one that the (fast-moving) encoder stops using is restarted at once
        # rather than after the ~log(count / threshold) / (1 - decay) steps an EMA at the mean count would take
        self.cluster_size.fill_(max(self.dead_code_threshold, self.eps))
        self.embed_avg.copy_(centres * self.cluster_size[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        """EMA codebook update (VQ-VAE-2 appendix) followed by dead-code restarts; returns the restart count."""
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)  # (K,)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, flat)  # (K, D)
        self.usage += counts.long()
        _all_reduce_(counts)
        _all_reduce_(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_avg.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        embed = self.embed_avg / smoothed[:, None]
        self.embed.copy_(l2norm(embed) if self.cosine else embed)
        return self._restart_dead_codes(flat, errors)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        """Restart codes below the threshold to batch vectors; ``errors`` (N,) are the vectors' squared distances to
        their code at lookup (reused, so restarts cost no second (N, K) distance computation)."""
        dead = self.cluster_size < self.dead_code_threshold  # (K,)
        n_dead = dead.sum()
        if self.dead_code_threshold <= 0 or not bool(n_dead):
            return n_dead
        g = step_generator(self.seed, int(self.step), flat.device)
        if self.restart_sampling == "error":
            weights = errors + 1e-12  # (N,)
        else:
            weights = torch.ones(len(flat), device=flat.device)
        if self.restart_distinct:
            # distinct batch vectors, in sampled order, go to the dead codes in index order; codes beyond the
            # batch's vector count stay dead until the next step
            n = min(len(flat), self.codebook_size)
            order = torch.multinomial(weights, n, replacement=False, generator=g)  # (n,)
            rank = (torch.cumsum(dead.long(), 0) - 1).clamp_min(0)  # (K,) position of each dead code among the dead
            dead = dead & (rank < n)
            pick = order[rank.clamp_max(n - 1)]  # (K,)
            n_dead = dead.sum()
        else:
            pick = torch.multinomial(weights, self.codebook_size, replacement=True, generator=g)  # (K,) one per code
        fresh = _broadcast_(flat[pick].clone())  # rank 0's draw wins, so ranks keep one codebook
        self.embed.copy_(torch.where(dead[:, None], fresh, self.embed))
        # a restarted code starts at the threshold (or restart_count): it survives while it is used that often
        start = self.dead_code_threshold if self.restart_count is None else self.restart_count
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, start), self.cluster_size))
        self.embed_avg.copy_(torch.where(dead[:, None], self.embed * self.cluster_size[:, None], self.embed_avg))
        return n_dead

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` (..., D). In training mode (and with grad enabled) the codebook is updated in place.

        Returns:
            :class:`QuantizerOutput` with ``quantized`` (..., D) (straight-through), ``indices`` (...).
        """
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must end in dim={self.dim}; got shape {tuple(z.shape)}")
        zf = self._prepare(z.float())
        flat, ps = pack([zf], "* d")  # (N, L)
        update = self.training and torch.is_grad_enabled()
        if update and not bool(self.initted):
            self._init_from_kmeans(flat.detach())
        errors, indices = squared_distances(flat.detach(), self.lookup_codebook).min(-1)  # (N,), (N,)
        q = F.embedding(indices, self.lookup_codebook).clone()  # (N, L): the codes the lookup chose, before the update
        restarted = torch.zeros((), dtype=torch.long, device=z.device)
        if update:
            restarted = self._ema_update(flat.detach(), indices, errors)
            self.step += 1
        commit = self.commitment * F.mse_loss(flat, q.detach())
        hist = torch.bincount(indices, minlength=self.codebook_size).float()
        perplexity = perplexity_from_counts(hist)
        quantized = unpack(self._up(straight_through(flat, q)), ps, "* d")[0].to(z.dtype)
        return QuantizerOutput(quantized, unpack(indices, ps, "*")[0], commit, perplexity, restarted)


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """counts: (K,) code histogram -> () ``exp(H(p))``, p = counts / sum; 1 for one code, K for uniform use."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
