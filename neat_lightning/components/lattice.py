"""A 3D lattice of cells updated by one shared local rule (a 3D neural cellular automaton).

Text enters the *input face* (depth 0) of a ``D × H × W`` lattice of cells with ``C`` state channels, activity
propagates for ``T`` steps by a rule every cell shares, and a byte decoder cross-attends to the *output face*
(depth ``D − 1``) to write the answer (:mod:`neat_lightning.components.lattice_faces`). One step (Mordvintsev et al.
2020, "Growing Neural Cellular Automata", extended to 3D and to plastic connections):

1. perception: the state itself, fixed 3D Sobel (∂/∂d, ∂/∂h, ∂/∂w) and Laplacian kernels applied per channel
   (``perception="sobel"``) or a learned depthwise 3×3×3 convolution (``perception="depthwise"``), and the
   *connection message* ``m[x] = 1/26 Σ_k w[x, k]·s[x + o_k]`` gated by the plastic weights ``w`` (D, H, W, 26);
2. update: an MLP of 1×1×1 convolutions (``nn.Linear`` over channels-last cells);
3. residual update of the cells that fire this step (stochastic fire rate; in eval the expected update);
4. optional alive mask (cells with no live neighbour, by the max of channel 0, are zeroed);
5. boundary condition: the input face is re-imposed every step.

:func:`lattice_step` is a pure function of ``(state, connections)`` and the rule's parameters; no Python loop over
cells or connections runs anywhere. Every stencil — the gated connection message and the fixed Sobel/Laplacian
kernels — is one operator over all ``N = D·H·W`` cells and the whole batch
(:mod:`neat_lightning.components.lattice_stencils`); the state is kept cell-major ``(N, B, C)`` so the products and
the channels-last MLP need no transposes. The per-cell plastic state (connections, traces, clusters) lives in
:class:`~neat_lightning.components.lattice_state.LatticeState`.

Axis legend: ``b`` batch, ``c`` cell channels, ``d h w`` lattice depth/height/width, ``n`` cells (``d·h·w``),
``j`` perception kernels (``cj`` depthwise output channels), ``z`` non-zeros of a sparse pattern.
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
from torch import nn
from torch.utils.checkpoint import checkpoint

from neat_lightning.choices import check_choice
from neat_lightning.components.lattice_stencils import (
    ShiftOperator,
    SparseOperator,
    crow_from_rows,
    csr_matrix,
    separable_kernels,
    sobel_laplacian_kernels,
    stencil_indices,
    transpose_permutation,
)
from neat_lightning.components.memory_budget import Stencil
from neat_lightning.components.plasticity import N_NEIGHBOURS, neighbour_offsets

Perception = Literal["sobel", "depthwise"]
RuleInit = Literal["default", "transport"]


@dataclass(frozen=True)
class LatticeConfig:
    """Shape and dynamics of the lattice."""

    depth: int = 16  # D: number of layers between the input and output faces
    height: int = 16  # H
    width: int = 16  # W
    channels: int = 16  # C: state channels per cell
    hidden: int = 64  # width of the update MLP (1x1x1 convs)
    steps: int = 20  # T: lattice steps per forward; must be >= depth - 1 for the input to reach the output face
    fire_rate: float = 0.5  # probability a cell updates in a training step (stochastic asynchrony)
    perception: Perception = "sobel"
    alive_threshold: float | None = None  # None: every cell is alive; else the NCA alive mask on channel 0
    # "sparse": every stencil is one CSR product (fastest up to ~64^3); "shift": shifted views of the dense state,
    # no index buffers (the CSR patterns take ~5 GiB and 90 s to build at 128x128x96; see docs/lattice_scale.md)
    stencil: Stencil = "sparse"
    # also perceive the two depth neighbours (d - 1, d + 1) of each cell as separate, unblurred taps
    depth_taps: bool = False
    # "default": PyTorch's init of the update MLP; "transport": the MLP starts as the exact copy rule
    # Δs = s[d - 1] - s (needs depth_taps and hidden >= 2·channels), so the input face reaches the output face
    rule_init: RuleInit = "default"
    # activation checkpointing across lattice steps: keep the state every this many steps and recompute the rest in
    # the backward (0 = off); the result and the random stream are the same either way
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name in ("depth", "height", "width", "channels", "hidden", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.fire_rate <= 1.0:
            raise ValueError(f"fire_rate={self.fire_rate} must be in (0, 1]")
        check_choice("perception", self.perception, Perception)
        check_choice("stencil", self.stencil, Stencil)
        check_choice("rule_init", self.rule_init, RuleInit)
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = no activation checkpointing)")
        if self.rule_init == "transport" and not self.depth_taps:
            raise ValueError("rule_init='transport' needs depth_taps=True (it copies the d - 1 neighbour)")
        if self.rule_init == "transport" and self.hidden < 2 * self.channels:
            raise ValueError(f"rule_init='transport' needs hidden={self.hidden} >= 2 * channels = {2 * self.channels}")

    @property
    def size(self) -> tuple[int, int, int]:
        return (self.depth, self.height, self.width)

    @property
    def n_kernels(self) -> int:
        """Perception kernels per channel besides the identity: 3 Sobel + 1 Laplacian (or as many learned)."""
        return 4


# ----------------------------------------------------------------------------------------------------------------------
# the rule


class LatticeRule(nn.Module):
    """The shared local rule: perception (fixed Sobel/Laplacian stencils or a learned depthwise conv, plus the
    connection message) and the update MLP of 1×1×1 convolutions, written as ``nn.Linear`` over channels-last cells.

    The lattice state lives cell-major, ``(N, B, C)`` with ``N = D·H·W`` cells numbered ``(d·H + h)·W + w``: the
    input face is rows ``[0, H·W)``, the output face the last ``H·W`` rows, and every stencil is one sparse
    ``(N, N)`` product over all cells and the whole batch at once.
    """

    def __init__(self, config: LatticeConfig) -> None:
        super().__init__()
        self.config = config
        C = config.channels
        self.depthwise = (
            nn.Conv3d(C, config.n_kernels * C, 3, padding=1, groups=C, bias=False)
            if config.perception == "depthwise" else None
        )
        n_in = (2 + config.n_kernels + 2 * config.depth_taps) * C  # state, message, kernels, depth neighbours
        self.update = nn.Sequential(nn.Linear(n_in, config.hidden), nn.GELU(), nn.Linear(config.hidden, C))
        if config.rule_init == "transport":
            self.transport_init()
        self.build_stencils(config.size)

    @torch.no_grad()
    def transport_init(self) -> None:
        """Start the update MLP as the exact copy rule ``Δs = s[d − 1] − s`` per channel, so a firing cell takes its
        predecessor's state and the input face travels one plane per step, unblurred, to the output face.

        With the default init the update is dominated by the MLP's biases: every plane converges to the same state
        and the question's trace shrinks ~5× per plane (1e-8 of its size at depth 15, gradient 1e-15). Here hidden
        units ``2c`` and ``2c + 1`` see ``±x`` with ``x = s_c[d − 1] − s_c`` and the output is
        ``GELU(x) − GELU(−x) = x`` exactly; the other hidden units keep their random input weights and start with zero
        output weights (gradient still reaches them through those)."""
        C, first, last = self.config.channels, self.update[0], self.update[2]
        prev = (2 + self.config.n_kernels) * C  # offset of the s[d - 1] taps in the perception
        first.weight[: 2 * C].zero_()
        first.bias[: 2 * C].zero_()
        last.weight.zero_()
        last.bias.zero_()
        for sign, rows in ((1.0, slice(0, 2 * C, 2)), (-1.0, slice(1, 2 * C, 2))):  # over the two signs, not cells
            first.weight[rows, prev : prev + C] = sign * torch.eye(C)
            first.weight[rows, :C] = -sign * torch.eye(C)
            last.weight[:, rows] = sign * torch.eye(C)

    def build_stencils(self, size: tuple[int, int, int]) -> None:
        """(Re)build the size-dependent sparse patterns (non-persistent buffers; derived from the size alone)."""
        self.config = dataclasses.replace(self.config, depth=size[0], height=size[1], width=size[2])
        N = size[0] * size[1] * size[2]
        if self.config.stencil == "shift":
            return
        rows, cols, flat = stencil_indices(size, neighbour_offsets())
        t_crow, t_perm = transpose_permutation(rows, cols, N)
        self.register_buffer("msg_crow", crow_from_rows(rows, N), persistent=False)
        self.register_buffer("msg_cols", cols, persistent=False)
        self.register_buffer("msg_flat", flat, persistent=False)  # index into connections.reshape(-1)
        self.register_buffer("msg_t_crow", t_crow, persistent=False)
        self.register_buffer("msg_t_cols", rows[t_perm], persistent=False)
        self.register_buffer("msg_t_perm", t_perm, persistent=False)
        if self.depthwise is None and self.config.stencil == "sparse":
            cube = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)))  # 27 taps incl. the centre
            r, c, f = stencil_indices(size, cube)
            taps = rearrange(sobel_laplacian_kernels(), "j a b c -> j (a b c)")[:, f % 27]  # (4, nnz)
            J = taps.shape[0]
            rows4 = rearrange(r[None] + N * torch.arange(J)[:, None], "j z -> (j z)")  # stacked (4N, N)
            cols4 = c.repeat(J)
            vals4 = rearrange(taps, "j z -> (j z)")
            t4_crow, t4_perm = transpose_permutation(rows4, cols4, N)
            self.register_buffer("k_crow", crow_from_rows(rows4, J * N), persistent=False)
            self.register_buffer("k_cols", cols4, persistent=False)
            self.register_buffer("k_vals", vals4, persistent=False)
            self.register_buffer("k_t_crow", t4_crow, persistent=False)
            self.register_buffer("k_t_cols", rows4[t4_perm], persistent=False)
            self.register_buffer("k_t_vals", vals4[t4_perm], persistent=False)

    def connection_operator(self, connections: torch.Tensor) -> SparseOperator | ShiftOperator:
        """connections (D, H, W, 26) effective weights -> the message operator ``m = A s`` with
        ``A[x, x + o_k] = w[x, k] / 26``."""
        if tuple(connections.shape[:3]) != self.config.size:
            raise ValueError(f"connections shape {tuple(connections.shape)} does not match lattice size {self.config.size}")
        if self.config.stencil == "shift":
            return ShiftOperator(connections)
        N = self.msg_crow.numel() - 1
        values = connections.reshape(-1)[self.msg_flat].to(self.msg_crow.device) / N_NEIGHBOURS
        a = csr_matrix(self.msg_crow, self.msg_cols, values, (N, N))
        at = csr_matrix(self.msg_t_crow, self.msg_t_cols, values[self.msg_t_perm], (N, N))
        return SparseOperator(a, at)

    def kernels(self, state: torch.Tensor) -> torch.Tensor:
        """Per-channel stencils: state (N, B, C) -> (N, B, 4·C)."""
        N, B, C = state.shape
        if self.depthwise is not None:
            D, H, W = self.config.size
            x = rearrange(state, "(d h w) b c -> b c d h w", d=D, h=H, w=W)
            return rearrange(self.depthwise(x), "b cj d h w -> (d h w) b cj")
        if self.config.stencil == "shift":
            D, H, W = self.config.size
            out = separable_kernels(rearrange(state, "(d h w) b c -> d h w (b c)", d=D, h=H, w=W))
            return rearrange(out, "j d h w (b c) -> (d h w) b (j c)", b=B)
        J = self.config.n_kernels
        op = SparseOperator(
            csr_matrix(self.k_crow, self.k_cols, self.k_vals.to(state.dtype), (J * N, N)),
            csr_matrix(self.k_t_crow, self.k_t_cols, self.k_t_vals.to(state.dtype), (N, J * N)),
        )
        out = op(rearrange(state, "n b c -> n (b c)"))  # (4N, B·C)
        return rearrange(out, "(j n) (b c) -> n b (j c)", j=J, b=B)

    def perceive(self, state: torch.Tensor, message: SparseOperator | ShiftOperator) -> torch.Tensor:
        """state (N, B, C) -> perception (N, B, (2 + 4 [+ 2])·C): state, connection message, stencils [and the
        d − 1, d + 1 neighbours with ``depth_taps``]."""
        N, B, C = state.shape
        m = rearrange(message(rearrange(state, "n b c -> n (b c)")), "n (b c) -> n b c", b=B)
        if not self.config.depth_taps:
            return torch.cat([state, m, self.kernels(state)], dim=-1)
        plane = self.config.height * self.config.width  # cells n ± H·W are the depth neighbours, zero outside
        prev, nxt = F.pad(state[:-plane], (0, 0, 0, 0, plane, 0)), F.pad(state[plane:], (0, 0, 0, 0, 0, plane))
        return torch.cat([state, m, self.kernels(state), prev, nxt], dim=-1)

    def forward(self, state: torch.Tensor, message: SparseOperator | ShiftOperator) -> torch.Tensor:
        """The update ``Δs``: (N, B, C) -> (N, B, C)."""
        return self.update(self.perceive(state, message))


def activity_from_state(state: torch.Tensor) -> torch.Tensor:
    """Cell activity in [0, 1): ``tanh(mean_c |s|)``. state (..., C) -> (...)."""
    return torch.tanh(state.abs().mean(-1))


def alive_mask(state: torch.Tensor, size: tuple[int, int, int], threshold: float) -> torch.Tensor:
    """NCA alive mask: a cell lives if any cell of its 3×3×3 neighbourhood has channel 0 above ``threshold``.
    state (N, B, C) -> (N, B, 1) bool."""
    D, H, W = size
    alpha = rearrange(state[..., 0], "(d h w) b -> b 1 d h w", d=D, h=H, w=W)
    alive = F.max_pool3d(alpha, 3, stride=1, padding=1) > threshold
    return rearrange(alive, "b 1 d h w -> (d h w) b 1")


def lattice_step(
    rule: LatticeRule,
    state: torch.Tensor,
    connections: torch.Tensor | SparseOperator | ShiftOperator,
    input_face: torch.Tensor | None = None,
    fire_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One lattice step, a pure function of ``(state, connections)``.

    Args:
        rule: the shared update rule.
        state: (N, B, C) cell-major state, ``N = D·H·W``.
        connections: (D, H, W, 26) effective weights, or their prebuilt :meth:`LatticeRule.connection_operator`.
        input_face: (H·W, B, C) re-imposed on the input face after the update, or None.
        fire_mask: (N, B, 1) 0/1 cells that update this step; None updates every cell by the expected step
            ``fire_rate·Δs`` (evaluation).

    Returns:
        (N, B, C) the next state.
    """
    cfg = rule.config
    op = connections if isinstance(connections, (SparseOperator, ShiftOperator)) else rule.connection_operator(connections)
    delta = rule(state, op)
    state = state + (delta * fire_mask if fire_mask is not None else cfg.fire_rate * delta)
    if cfg.alive_threshold is not None:
        state = state * alive_mask(state, cfg.size, cfg.alive_threshold)
    if input_face is not None:
        state = torch.cat([input_face, state[input_face.shape[0] :]], dim=0)
    return state


def run_lattice(
    rule: LatticeRule,
    input_face: torch.Tensor,
    connections: torch.Tensor,
    steps: int,
    stochastic: bool,
    record_activity: bool = True,
    generator: torch.Generator | None = None,
    checkpoint_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``steps`` lattice steps from a zero lattice whose input face is ``input_face``.

    Args:
        input_face: (H·W, B, C) encoded input.
        connections: (D, H, W, 26) effective weights.
        stochastic: sample each cell's firing with probability ``fire_rate`` (training) or take the expected update.
        record_activity: also return the batch-mean activity of every step (no gradient), for plasticity.
        checkpoint_every: None for ``rule.config.checkpoint_every``. 0 keeps every step's activations for the
            backward; ``k > 0`` keeps only the state every ``k`` steps and recomputes each segment in the backward
            (activation checkpointing): memory ``~ T/k`` states + ``k`` steps of activations instead of ``T``
            steps. The firing masks are drawn outside the recomputed segments, so the result and the random stream
            are identical either way.

    Returns:
        ``(state, activity)``: final (N, B, C) state and (T, D, H, W) activity (or None).
    """
    cfg = rule.config
    checkpoint_every = cfg.checkpoint_every if checkpoint_every is None else checkpoint_every
    n_face, B, C = input_face.shape
    N = cfg.depth * cfg.height * cfg.width
    op = rule.connection_operator(connections)  # built once, shared by all steps
    state = torch.cat([input_face, input_face.new_zeros(N - n_face, B, C)], dim=0)
    history = []
    segment = checkpoint_every if checkpoint_every > 0 and torch.is_grad_enabled() else 1
    for start in range(0, steps, segment):  # over time steps; each step is vectorised over all cells
        fires = []
        for _ in range(min(segment, steps - start)):
            fire = None
            if stochastic and cfg.fire_rate < 1.0:
                fire = (torch.rand(N, B, 1, device=state.device, generator=generator) < cfg.fire_rate).to(state.dtype)
            fires.append(fire)
        if segment > 1 or checkpoint_every > 0 and torch.is_grad_enabled():
            states = checkpoint(_run_segment, rule, state, op, input_face, fires, use_reentrant=False)
        else:
            states = [lattice_step(rule, state, op, input_face, fires[0])]
        state = states[-1]
        if record_activity:
            history += [activity_from_state(s.detach()).mean(1).reshape(cfg.size) for s in states]
    return state, (torch.stack(history) if record_activity else None)


def _run_segment(rule, state, op, input_face, fires) -> list[torch.Tensor]:
    """Consecutive lattice steps (one activation-checkpointed segment) -> the state after each."""
    states = []
    for fire in fires:
        state = lattice_step(rule, state, op, input_face, fire)
        states.append(state)
    return states


# ----------------------------------------------------------------------------------------------------------------------
# emergence


def spectral_emergence(activity: torch.Tensor) -> tuple[float, float]:
    """Spectral entropy and dominant wavelength of an activity field (3D FFT).

    The mean is removed, the power spectrum ``|FFT|²`` without the DC term is normalised to a distribution ``p``,
    and its entropy ``−Σ p log p`` is divided by ``log`` of the number of frequencies: 0 for a single plane wave
    (one spatial pattern dominates), 1 for white noise (no structure). The dominant wavelength is ``1/|f|`` in cells
    of the strongest frequency ``f`` (cycles per cell).

    Args:
        activity: (D, H, W) float.

    Returns:
        ``(entropy, wavelength)``; ``(0.0, 0.0)`` for a constant field.
    """
    field = activity.float() - activity.float().mean()
    power = torch.fft.fftn(field).abs().square().reshape(-1)[1:]  # drop DC
    total = power.sum()
    if power.numel() < 2 or total <= 1e-12 * max(1.0, float(field.abs().max()) ** 2):
        return 0.0, 0.0
    p = power / total
    entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum() / math.log(p.numel()))
    freqs = torch.stack(
        torch.meshgrid(*(torch.fft.fftfreq(n) for n in activity.shape), indexing="ij"), dim=-1
    ).reshape(-1, 3)[1:]  # (N - 1, 3) cycles per cell
    wavelength = float(1.0 / freqs[power.argmax()].norm())
    return entropy, wavelength
