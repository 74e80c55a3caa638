"""Plasticity rules for the lattice's connection field: trace STDP, BCM, competitive, and their combination.

The lattice (:mod:`neat_lightning.components.lattice`) gives every cell 26 plastic weights, one per neighbour,
stored as a ``(D, H, W, 26)`` tensor: ``w[x, k]`` gates the message cell ``x`` receives from cell ``x + o_k``
(``o_k`` from :func:`neighbour_offsets`). So for connection ``(x, k)`` the *pre*-synaptic cell is ``x + o_k`` and the
*post*-synaptic cell is ``x``. Every rule is a pure tensor function of activity fields ``(D, H, W)`` gathered onto
connections with :func:`gather_neighbours`: no Python loop over cells or connections; the only loop is over the
lattice's time steps (STDP needs their order). Rules return weight changes; :func:`plasticity_update` applies them
under ``torch.no_grad`` between optimiser steps, clamps, and keeps pruned connections at zero.

Profiles (``discovery`` → ``learning`` → ``consolidation`` → ``freeze``, and ``balanced``: every rule at half rate)
scale each rule's learning rate and set the activity threshold that turns activity into spikes, from 0.01 to 0.1;
:func:`with_threshold` gives a profile any other threshold (a stage table sets one per stage).

Emergence feedback (optional, ``PlasticityConfig.emergence_feedback``): the spectral emergence measure, computed per
window of cells (:func:`local_structure`: 1 − normalised spectral entropy of the window's activity, 0 for a flat
window), scales every cell's plasticity — amplified where structure forms, damped where it does not
(:func:`emergence_gain`) — and can weight magnitude pruning (:func:`magnitude_prune_mask` with ``scale``).

References: STDP with traces — Morrison, Diesmann & Gerstner 2008, "Phenomenological models of synaptic plasticity
based on spike timing", eq. (3)-(5): ``Δw = A₊·x_pre·s_post − A₋·x_post·s_pre``. BCM — Bienenstock, Cooper & Munro
1982; sliding threshold as in Intrator & Cooper 1992: ``Δw = η·x·y·(y − θ)``, ``θ ← θ + (y² − θ)/τ_θ``.
Competitive learning — Rumelhart & Zipser 1985 (winners strengthened, losers weakened, weights renormalised).

Axis legend: ``d h w`` lattice depth/height/width, ``k`` the 26 neighbour directions, ``t`` lattice steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from neat_lightning.protocols import Plastic, PlasticityProfile  # noqa: F401  (Plastic re-exported for users)

N_NEIGHBOURS = 26
_CENTRE = 13  # index of offset (0, 0, 0) in the 27 offsets of the 3x3x3 cube


def neighbour_offsets() -> torch.Tensor:
    """The 26 neighbour offsets ``(dd, dh, dw)`` in ``itertools.product((-1, 0, 1), repeat=3)`` order without the
    centre -> (26, 3) int64. Direction ``k`` of every connection tensor refers to row ``k``."""
    cube = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)))
    return torch.cat([cube[:_CENTRE], cube[_CENTRE + 1 :]])


def gather_neighbours(field: torch.Tensor) -> torch.Tensor:
    """Value of each cell's 26 neighbours (zero outside the lattice).

    Args:
        field: (..., D, H, W) any float field (activity, traces).

    Returns:
        (..., D, H, W, 26): ``out[..., x, k] = field[..., x + o_k]``.
    """
    lead = field.shape[:-3]
    padded = F.pad(field.reshape(-1, *field.shape[-3:]), (1, 1, 1, 1, 1, 1))  # (N, D+2, H+2, W+2)
    cube = padded.unfold(1, 3, 1).unfold(2, 3, 1).unfold(3, 3, 1)  # (N, D, H, W, 3, 3, 3), a view
    cube = rearrange(cube, "n d h w i j k -> n d h w (i j k)")  # (N, D, H, W, 27)
    out = torch.cat([cube[..., :_CENTRE], cube[..., _CENTRE + 1 :]], dim=-1)  # (N, D, H, W, 26)
    return out.reshape(*lead, *out.shape[1:])


# ----------------------------------------------------------------------------------------------------------------------
# profiles

ProfileName = Literal["discovery", "learning", "consolidation", "freeze", "balanced"]

PROFILES: dict[str, PlasticityProfile] = {
    # explore: timing-driven growth dominates, low threshold so most cells can spike
    "discovery": PlasticityProfile("discovery", stdp=1.0, bcm=0.5, competitive=0.2, activity_threshold=0.01),
    # learn: BCM selectivity takes over
    "learning": PlasticityProfile("learning", stdp=0.5, bcm=1.0, competitive=0.5, activity_threshold=0.03),
    # consolidate: little new learning, competition sharpens what is there
    "consolidation": PlasticityProfile("consolidation", stdp=0.1, bcm=0.2, competitive=1.0, activity_threshold=0.06),
    # freeze: no plasticity at all
    "freeze": PlasticityProfile("freeze", stdp=0.0, bcm=0.0, competitive=0.0, activity_threshold=0.1),
    # every rule at half rate, a low threshold: a steady middle ground when no stage table drives the profile
    "balanced": PlasticityProfile("balanced", stdp=0.5, bcm=0.5, competitive=0.5, activity_threshold=0.02),
}


def profile_by_name(name: str) -> PlasticityProfile:
    """The named profile; an unknown name raises listing the known ones."""
    if name not in PROFILES:
        raise ValueError(f"plasticity profile {name!r} is unknown; known profiles: {list(PROFILES)}")
    return PROFILES[name]


def with_threshold(profile: PlasticityProfile, threshold: float | None) -> PlasticityProfile:
    """``profile`` with its spike threshold replaced by ``threshold`` (None keeps it); the threshold must be in
    [0, 1) (activity is ``tanh`` of a mean magnitude)."""
    if threshold is None:
        return profile
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"activity_threshold={threshold} must be in [0, 1)")
    return dataclasses.replace(profile, activity_threshold=float(threshold))


@dataclass(frozen=True)
class PlasticityConfig:
    """Base learning rates of the rules (each multiplied by the active profile's factor), weight bounds, and whether
    and under which profile a lattice starts applying them."""

    a_plus: float = 0.01  # STDP potentiation amplitude A₊
    a_minus: float = 0.012  # STDP depression amplitude A₋ (slightly > A₊: net depression for uncorrelated spikes)
    trace_decay: float = 0.8  # STDP trace decay per lattice step (exp(-1/τ), τ ≈ 4.5 steps)
    bcm_rate: float = 0.01  # BCM η
    bcm_tau: float = 10.0  # BCM threshold time constant τ_θ, in plasticity updates
    competitive_rate: float = 0.02  # multiplicative boost/inhibition of winners/losers
    top_k: int = 6  # winners per cell among its 26 incoming connections
    w_min: float = 0.0
    w_max: float = 2.0
    enabled: bool = True  # apply plasticity after each optimiser step
    profile: ProfileName = "discovery"  # the profile in force until a PlasticityStages table switches it
    # emergence feedback: scale each cell's plasticity by the local structure of the activity (see emergence_gain)
    emergence_feedback: bool = False
    emergence_window: int = 4  # side, in cells, of the windows whose spectral structure is measured
    emergence_strength: float = 1.0  # gain = clamp(1 + strength·(structure − mean structure), 0, 1 + strength)
    # emergence-aware pruning: the pruning score |w| is scaled by (1 − p) + p·structure of the receiving cell
    emergence_pruning: float = 0.0

    def __post_init__(self) -> None:
        profile_by_name(self.profile)  # an unknown name raises, listing the known ones
        if not 0.0 <= self.trace_decay < 1.0:
            raise ValueError(f"trace_decay={self.trace_decay} must be in [0, 1)")
        if self.bcm_tau < 1.0:
            raise ValueError(f"bcm_tau={self.bcm_tau} must be >= 1")
        if not 1 <= self.top_k <= N_NEIGHBOURS:
            raise ValueError(f"top_k={self.top_k} must be in [1, {N_NEIGHBOURS}]")
        if self.w_min >= self.w_max:
            raise ValueError(f"w_min={self.w_min} must be < w_max={self.w_max}")
        for name in ("a_plus", "a_minus", "bcm_rate", "competitive_rate", "emergence_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.emergence_window < 2:
            raise ValueError(f"emergence_window={self.emergence_window} must be >= 2 cells")
        if not 0.0 <= self.emergence_pruning <= 1.0:
            raise ValueError(f"emergence_pruning={self.emergence_pruning} must be in [0, 1]")


@dataclass
class PlasticityState:
    """Slow variables of the rules, one value per cell: the STDP trace and the BCM sliding threshold."""

    trace: torch.Tensor  # (D, H, W) presynaptic = postsynaptic trace of each cell's spikes
    theta: torch.Tensor  # (D, H, W) BCM modification threshold θ

    @classmethod
    def zeros(cls, size: tuple[int, int, int], device=None) -> "PlasticityState":
        return cls(torch.zeros(size, device=device), torch.zeros(size, device=device))


# ----------------------------------------------------------------------------------------------------------------------
# rules (pure functions returning weight changes)


def spikes_from_activity(activity: torch.Tensor, threshold: float) -> torch.Tensor:
    """activity: (..., D, H, W) in [0, 1) -> spikes, same shape, 1.0 where activity > threshold (strict)."""
    return (activity > threshold).to(activity.dtype)


def stdp_delta(
    spikes: torch.Tensor, trace: torch.Tensor, a_plus: float, a_minus: float, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace STDP over a spike history (Morrison et al. 2008, eq. 3-5).

    For each step ``t``: ``Δw[x, k] += A₊·x_tr[x + o_k]·s[x] − A₋·x_tr[x]·s[x + o_k]`` with the traces of step
    ``t − 1``, then ``x_tr ← decay·x_tr + s``. Pre-before-post potentiates, post-before-pre depresses.

    Args:
        spikes: (T, D, H, W) 0/1 spikes per lattice step.
        trace: (D, H, W) trace before the first step.

    Returns:
        ``(delta, trace)``: (D, H, W, 26) summed weight change and the (D, H, W) trace after the last step.
    """
    traces = []
    for s in spikes:  # the trace recurrence over lattice steps (their order matters), cheap (D, H, W) fields
        traces.append(trace)
        trace = decay * trace + s
    before = torch.stack(traces)  # (T, D, H, W): the trace each step's spikes meet
    delta = torch.zeros(*spikes.shape[1:], N_NEIGHBOURS, dtype=spikes.dtype, device=spikes.device)
    # gather several steps at once, in chunks of at most ~256 MB of gathered values (one step at 128x128x96)
    chunk = max(1, (1 << 26) // (spikes[0].numel() * N_NEIGHBOURS))
    for t in range(0, len(spikes), chunk):  # over chunks of lattice steps, each vectorised over all connections
        s, tr = spikes[t : t + chunk], before[t : t + chunk]
        delta += a_plus * (gather_neighbours(tr) * s[..., None]).sum(0)
        delta -= a_minus * (tr[..., None] * gather_neighbours(s)).sum(0)
    return delta, trace


def bcm_delta(
    pre: torch.Tensor, post: torch.Tensor, theta: torch.Tensor, rate: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCM with a sliding threshold: ``Δw = η·x·y·(y − θ)``, then ``θ ← θ + (y² − θ)/τ_θ``.

    The post-synaptic factor ``y·(y − θ)`` potentiates above the threshold and depresses below it; θ tracks the
    mean of ``y²``, so a cell that fires a lot raises its own bar (Bienenstock, Cooper & Munro 1982).

    Args:
        pre: (D, H, W, 26) presynaptic activity ``x`` per connection.
        post: (D, H, W) postsynaptic activity ``y`` per cell.
        theta: (D, H, W) threshold θ.

    Returns:
        ``(delta, theta)``: (D, H, W, 26) weight change, (D, H, W) updated threshold.
    """
    factor = post * (post - theta)  # (D, H, W)
    delta = rate * pre * factor[..., None]
    return delta, theta + (post.square() - theta) / tau


def competitive_update(
    weights: torch.Tensor, pre: torch.Tensor, rate: float | torch.Tensor, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Competitive learning over each cell's incoming connections (Rumelhart & Zipser 1985).

    The ``top_k`` connections with the largest drive ``w·x_pre`` are boosted by ``(1 + rate)``, the rest inhibited by
    ``(1 − rate)``, and each cell's weights are renormalised to their previous L1 norm (competition moves weight
    between connections; it never creates it).

    Args:
        weights: (D, H, W, 26) non-negative connection weights.
        pre: (D, H, W, 26) presynaptic activity.
        rate: the boost/inhibition, a float or a per-cell (D, H, W, 1) tensor.
        mask: (D, H, W, 26) bool, False for pruned connections (they can never win and stay zero).

    Returns:
        (D, H, W, 26) new weights.
    """
    drive = weights * pre
    if mask is not None:
        drive = drive.masked_fill(~mask, float("-inf"))
    winners = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, drive.topk(top_k, dim=-1).indices, True)
    new = weights * torch.where(winners, 1.0 + rate, 1.0 - rate)
    if mask is not None:
        new = new * mask
    norm_before = weights.abs().sum(-1, keepdim=True)
    norm_after = new.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    return new * (norm_before / norm_after)


@torch.no_grad()
def plasticity_update(
    weights: torch.Tensor,
    activity: torch.Tensor,
    state: PlasticityState,
    profile: PlasticityProfile,
    config: PlasticityConfig,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PlasticityState]:
    """The combined rule: ``profile.stdp``·STDP + ``profile.bcm``·BCM, then competition at ``profile.competitive``,
    then clamping to ``[w_min, w_max]`` and zeroing pruned connections. With ``config.emergence_feedback`` the
    weight change and the competition rate of every receiving cell are scaled by :func:`emergence_gain` of the local
    structure of the last step's activity.

    Args:
        weights: (D, H, W, 26) connection weights.
        activity: (T, D, H, W) cell activity in [0, 1) per lattice step (batch mean).
        state: traces and thresholds (not modified; the new state is returned).
        profile: learning-rate multipliers and the spike threshold.
        mask: (D, H, W, 26) bool alive connections, or None.

    Returns:
        ``(weights, state)`` after one update. A ``freeze`` profile returns the weights unchanged (still clamped).
    """
    if activity.dim() != 4 or activity.shape[1:] != weights.shape[:3]:
        raise ValueError(
            f"activity shape {tuple(activity.shape)} must be (T, D, H, W) with (D, H, W) = {tuple(weights.shape[:3])}"
        )
    trace, theta = state.trace, state.theta
    delta = torch.zeros_like(weights)
    gain = None  # (D, H, W, 1) emergence feedback on each receiving cell's plasticity
    if config.emergence_feedback:
        structure = local_structure(activity[-1], config.emergence_window)
        gain = emergence_gain(structure, config.emergence_strength)[..., None].to(weights.dtype)
    if profile.stdp:
        spikes = spikes_from_activity(activity, profile.activity_threshold)
        d_stdp, trace = stdp_delta(spikes, trace, config.a_plus, config.a_minus, config.trace_decay)
        delta += profile.stdp * d_stdp
    mean_activity = activity.mean(0)  # (D, H, W)
    pre = gather_neighbours(mean_activity) if (profile.bcm or profile.competitive) else None
    if profile.bcm:
        d_bcm, theta = bcm_delta(pre, mean_activity, theta, config.bcm_rate, config.bcm_tau)
        delta += profile.bcm * d_bcm
    if gain is not None:
        delta = delta * gain
    new = (weights + delta).clamp(config.w_min, config.w_max)
    if profile.competitive:
        rate = profile.competitive * config.competitive_rate
        new = competitive_update(new, pre, rate if gain is None else rate * gain, config.top_k, mask)
        new = new.clamp(config.w_min, config.w_max)
    if mask is not None:
        new = new * mask
    return new, PlasticityState(trace, theta)


def naive_plasticity_update(
    weights: torch.Tensor,
    activity: torch.Tensor,
    state: PlasticityState,
    profile: PlasticityProfile,
    config: PlasticityConfig,
) -> tuple[torch.Tensor, PlasticityState]:
    """Reference implementation with Python loops over cells and connections — for tests and the benchmark only
    (it shows what the vectorised :func:`plasticity_update` replaces). Same inputs and result, no mask."""
    D, H, W = weights.shape[:3]
    offsets = neighbour_offsets().tolist()
    w = weights.clone()
    spikes = spikes_from_activity(activity, profile.activity_threshold)
    trace, theta = state.trace.clone(), state.theta.clone()
    mean_act = activity.mean(0)

    def at(field, d, h, x):
        inside = 0 <= d < D and 0 <= h < H and 0 <= x < W
        return float(field[d, h, x]) if inside else 0.0

    delta = torch.zeros_like(w)
    if profile.stdp:
        for s in spikes:
            for d in range(D):
                for h in range(H):
                    for x in range(W):
                        for k, (od, oh, ow) in enumerate(offsets):
                            pre_tr, pre_s = at(trace, d + od, h + oh, x + ow), at(s, d + od, h + oh, x + ow)
                            delta[d, h, x, k] += profile.stdp * (
                                config.a_plus * pre_tr * float(s[d, h, x]) - config.a_minus * float(trace[d, h, x]) * pre_s
                            )
            trace = config.trace_decay * trace + s
    pre = torch.zeros_like(w)
    for d in range(D):
        for h in range(H):
            for x in range(W):
                for k, (od, oh, ow) in enumerate(offsets):
                    pre[d, h, x, k] = at(mean_act, d + od, h + oh, x + ow)
    if profile.bcm:
        for d in range(D):
            for h in range(H):
                for x in range(W):
                    y = float(mean_act[d, h, x])
                    for k in range(N_NEIGHBOURS):
                        delta[d, h, x, k] += profile.bcm * config.bcm_rate * float(pre[d, h, x, k]) * y * (y - float(theta[d, h, x]))
                    theta[d, h, x] = theta[d, h, x] + (y * y - theta[d, h, x]) / config.bcm_tau
    w = (w + delta).clamp(config.w_min, config.w_max)
    if profile.competitive:
        rate = profile.competitive * config.competitive_rate
        for d in range(D):
            for h in range(H):
                for x in range(W):
                    row = w[d, h, x].clone()
                    winners = set((row * pre[d, h, x]).topk(config.top_k).indices.tolist())
                    new = torch.tensor([v * (1 + rate if k in winners else 1 - rate) for k, v in enumerate(row.tolist())])
                    w[d, h, x] = new * (row.abs().sum() / new.abs().sum().clamp_min(1e-12))
        w = w.clamp(config.w_min, config.w_max)
    return w, PlasticityState(trace, theta)


def magnitude_prune_mask(
    weights: torch.Tensor, mask: torch.Tensor, sparsity: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Global magnitude pruning: the new mask keeps the largest ``|w|`` (times ``scale`` of the receiving cell, when
    given) so that a ``sparsity`` fraction of all connections is pruned. Already-pruned connections stay pruned (the
    mask only shrinks).

    Args:
        weights: (D, H, W, 26) connection weights.
        mask: (D, H, W, 26) bool, True for alive connections.
        sparsity: target fraction of pruned connections in [0, 1).
        scale: (D, H, W) non-negative per-cell factor of the score (emergence-aware pruning:
            :func:`emergence_prune_scale`), or None for plain magnitude pruning.

    Returns:
        (D, H, W, 26) bool mask with ``max(current, round(sparsity·n))`` pruned connections.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    n = mask.numel()
    n_prune = int(round(sparsity * n))
    if n_prune <= int((~mask).sum()):
        return mask.clone()
    score = weights.abs() if scale is None else weights.abs() * scale[..., None]
    score = score.masked_fill(~mask, -1.0).reshape(-1)  # pruned ones sort first
    # stable sort: ties broken by position, so pruning is deterministic across runs and resumes
    order = torch.sort(score, stable=True).indices
    new = torch.ones(n, dtype=torch.bool, device=mask.device)
    new[order[:n_prune]] = False
    return new.reshape(mask.shape)


# ----------------------------------------------------------------------------------------------------------------------
# emergence feedback


def local_structure(activity: torch.Tensor, window: int) -> torch.Tensor:
    """Spectral structure of an activity field per window of cells, as a per-cell field.

    The field is cut into ``window``-sided blocks (each side at most the lattice's; the last blocks are padded by
    replicating the edge); in each block the mean is removed and the normalised spectral entropy ``e`` of its FFT
    power without the DC term is computed, as :func:`~neat_lightning.components.lattice.spectral_emergence` does for
    the whole lattice. Structure is ``1 − e``: 1 for a single plane wave, ~0 for noise, and 0 for a flat block.

    Args:
        activity: (D, H, W) float.
        window: block side in cells (>= 2).

    Returns:
        (D, H, W) float in [0, 1], every cell carrying its block's structure.
    """
    D, H, W = activity.shape
    kd, kh, kw = (min(window, n) for n in (D, H, W))
    n_freq = kd * kh * kw - 1
    if n_freq < 2:
        return torch.zeros_like(activity, dtype=torch.float32)
    pad = [(-n) % k for n, k in zip((D, H, W), (kd, kh, kw))]
    x = F.pad(activity.float()[None, None], (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")[0, 0]
    blocks = rearrange(x, "(pd kd) (ph kh) (pw kw) -> pd ph pw kd kh kw", kd=kd, kh=kh, kw=kw)
    field = blocks - blocks.mean(dim=(-3, -2, -1), keepdim=True)
    power = torch.fft.fftn(field, dim=(-3, -2, -1)).abs().square()
    power = rearrange(power, "pd ph pw kd kh kw -> pd ph pw (kd kh kw)")[..., 1:]  # drop DC
    total = power.sum(-1)  # (pd, ph, pw)
    p = power / total.clamp_min(1e-30)[..., None]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(n_freq)
    flat = total <= 1e-12 * torch.clamp(field.abs().amax(dim=(-3, -2, -1)).square(), min=1.0)
    structure = torch.where(flat, torch.zeros_like(entropy), (1.0 - entropy).clamp(0.0, 1.0))
    for dim, k in enumerate((kd, kh, kw)):  # back to cells: each block's value on its cells
        structure = structure.repeat_interleave(k, dim=dim)
    return structure[:D, :H, :W]


def emergence_gain(structure: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-cell plasticity gain from local structure (D, H, W): ``1 + strength·(s − mean s)``, clamped to
    ``[0, 1 + strength]`` — above 1 where structure forms beyond the lattice's average, below 1 where it does not;
    1 everywhere for a uniform field or ``strength = 0``."""
    return (1.0 + strength * (structure - structure.mean())).clamp(0.0, 1.0 + strength)


def emergence_prune_scale(structure: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-cell factor of the pruning score, ``(1 − weight) + weight·structure``: connections into cells without
    structure are pruned first; ``weight = 0`` is plain magnitude pruning."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"emergence_pruning={weight} must be in [0, 1]")
    return (1.0 - weight) + weight * structure
