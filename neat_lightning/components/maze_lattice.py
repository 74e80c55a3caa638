"""The lattice as a maze solver, and the fixed-depth convolutional network it is compared with.

A maze (``S × S`` cells of class free / wall / start / goal) is the initial state of a thin lattice of ``1 × S × S``
cells: the first four channels of every cell hold the one-hot cell class, the other ``C − 4`` start at zero. The
shared local rule (:class:`~neat_lightning.components.lattice.LatticeRule`, one :func:`lattice_step` per step, the
plastic connection message of :class:`~neat_lightning.components.lattice_state.LatticeState`) runs for as many steps
as asked, and a per-cell linear readout turns the final state into path logits. Because the rule is local and
weight-tied over steps, the same parameters run on any maze size for any number of steps.

The recipe that makes this extrapolate is that of the recurrent "deep thinking" networks (Schwarzschild et al. 2021,
"Can you learn an algorithm? Generalizing from easy to hard problems with recurrent networks"; Bansal et al. 2022,
"End-to-end algorithm synthesis with recurrent networks: logical extrapolation without overthinking",
arXiv 2202.05826):

- **recall**: the maze channels are re-imposed after every step, so the input never fades (:func:`run_recall`);
- **progressive loss**: besides the loss after a full run, a run of ``n`` steps without gradient is continued for
  ``k`` steps with gradient (``n + k <= steps``) and scored; the rule learns to improve any intermediate state
  instead of a trajectory tied to the step count;
- **random step counts**: the full run's length is drawn from ``[steps, max_steps]``, past the point where a training
  maze is solved, so the solution is trained to be a fixed point that more steps do not destroy;
- **noise** (``MazeConfig.noise``, not from those papers): Gaussian noise on the working channels after every
  training step. Measured on 9x9-trained rules: without it they solve 9x9 mazes but fade on larger ones (a signal
  that decays with distance suffices on small mazes); with it they keep stable states further
  (docs/lattice_maze.md).

``taps="axial"`` (:class:`AxialLatticeRule`) replaces the four fixed per-channel stencils (3D Sobel ∂d/∂h/∂w and the
Laplacian) by the four in-plane neighbours taken unblurred (up, down, left, right), as ``depth_taps`` does for the
depth neighbours: the Sobel and Laplacian stencils mix diagonal cells, which in a maze lie across walls. The MLP's
input width and the parameter count are the same either way. ``taps="isotropic"`` (:class:`IsotropicLatticeRule`)
perceives symmetric functions of those four neighbours instead, so the rule does not depend on their order;
``taps="d4"`` (:class:`D4LatticeRule`) averages the axial rule over the 8 orders that the square's rotations and
reflections give them.

An answer can be checked without its label: :func:`is_simple_path` says whether a predicted mask is one simple path
of free cells from start to goal, which in a perfect maze only the shortest path is. :func:`select_path` picks the
shortest accepted prediction among several of the same maze, e.g. those of its 8 rotations and reflections
(:func:`square_views`, :func:`unview`).

Axis legend: ``b`` batch, ``c`` cell channels, ``k`` maze classes (4), ``n`` cells (``d·h·w``), ``d h w`` lattice
depth/height/width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from neat_lightning.choices import check_choice
from neat_lightning.components.lattice import (
    LatticeConfig,
    LatticeRule,
    activity_from_state,
    lattice_step,
)
from neat_lightning.components.lattice_stencils import ShiftOperator, SparseOperator

N_CLASSES = 4  # free, wall, start, goal (neat_lightning.data.generators.maze.MAZE_CLASSES)
WALL, START, GOAL = 1, 2, 3  # class channels (neat_lightning.data.generators.maze; data sits above components)
Taps = Literal["axial", "isotropic", "d4", "lattice"]
Resize = Literal["tile", "trilinear"]


@dataclass(frozen=True)
class MazeConfig:
    """How the lattice is trained and run on mazes (the deep-thinking recipe; see the module docstring)."""

    # "axial": the rule perceives its 4 in-plane neighbours unblurred; "isotropic": their mean, max, min and mean
    # magnitude (the same in any order, so the rule is the same under the maze's rotations and reflections);
    # "d4": the axial rule averaged over the 8 rotations and reflections of its neighbours (equivariant, and each
    # neighbour's channels still seen together); "lattice": LatticeConfig.perception's stencils
    taps: Taps = "axial"
    recall: bool = True  # re-impose the maze channels after every step
    # training runs draw their length from [lattice.steps, max_steps] (None: always lattice.steps)
    max_steps: int | None = 60
    progressive: float = 0.5  # weight α of the progressive loss: (1 - α)·full + α·progressive
    pos_weight: float = 1.0  # weight of path cells in the per-cell binary cross-entropy
    # std of Gaussian noise added to the working channels after every training step (0: none): a signal that fades
    # with distance drowns in it, a rule with two stable states does not
    noise: float = 0.2
    # initial value of every plastic connection (None: LatticeState's random uniform(0.5, 1.5)); a uniform field
    # looks the same at every maze size
    connection_init: float | None = 1.0
    # how the connections (kept at the training size) reach another maze size: "tile" (edges anchored, the interior
    # repeated with period 2, the period of rooms and walls) or "trilinear" resampling
    resize: Resize = "tile"
    # clamp the working channels to [-bound, bound] after every step (None: unbounded residual state); a bounded
    # state can saturate into stable states instead of drifting over long runs
    bound: float | None = None
    # weight of a fixed-point loss: the mean squared change of the working channels over one more step after the
    # full run (0: none); a solution the rule keeps unchanged is one more steps cannot destroy
    fixed_point: float = 0.0
    # zero the working channels of wall cells after every step: walls are dead cells of the medium (as the alive mask
    # of a growing NCA), so state travels only through free cells and never across a wall
    mask_walls: bool = False
    # share of each training batch that is trained on: the mazes the current rule scores worst after a noise-free
    # run of max_steps (1.0: every maze); the batch the data module yields is the pool they are picked from
    hard_fraction: float = 1.0

    def __post_init__(self) -> None:
        check_choice("taps", self.taps, Taps)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 or None")
        if not 0.0 <= self.progressive <= 1.0:
            raise ValueError(f"progressive={self.progressive} must be in [0, 1]")
        if self.pos_weight <= 0:
            raise ValueError(f"pos_weight={self.pos_weight} must be > 0")
        if self.noise < 0:
            raise ValueError(f"noise={self.noise} must be >= 0")
        check_choice("resize", self.resize, Resize)
        if self.bound is not None and self.bound <= 0:
            raise ValueError(f"bound={self.bound} must be > 0 or None")
        if self.fixed_point < 0:
            raise ValueError(f"fixed_point={self.fixed_point} must be >= 0")
        if not 0.0 < self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction={self.hard_fraction} must be in (0, 1]")


class AxialLatticeRule(LatticeRule):
    """A :class:`LatticeRule` whose four per-channel perception kernels are the in-plane neighbours of each cell,
    unblurred: ``s[h − 1, w]``, ``s[h + 1, w]``, ``s[h, w − 1]``, ``s[h, w + 1]`` (zero outside the lattice). Same
    MLP, same connection message, same parameter count as the Sobel rule; no stencil buffers for the kernels."""

    def kernels(self, state: torch.Tensor) -> torch.Tensor:
        """state (N, B, C) -> (N, B, 4·C): up, down, left, right neighbours of every cell."""
        D, H, W = self.config.size
        x = rearrange(state, "(d h w) b c -> d h w b c", d=D, h=H, w=W)
        p = F.pad(x, (0, 0, 0, 0, 1, 1, 1, 1))  # zero row/column around every plane
        taps = torch.cat([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]], dim=-1)
        return rearrange(taps, "d h w b jc -> (d h w) b jc")


class IsotropicLatticeRule(AxialLatticeRule):
    """An :class:`AxialLatticeRule` that perceives symmetric functions of its four in-plane neighbours, per channel:
    their mean, max, min and mean magnitude. Any order of the neighbours gives the same perception, so with a
    uniform connection field the rule commutes with the maze's rotations and reflections, as the task does
    (dead-end filling counts live neighbours; it does not ask where they are). Same MLP width and parameter count
    as the axial rule."""

    def kernels(self, state: torch.Tensor) -> torch.Tensor:
        """state (N, B, C) -> (N, B, 4·C): per channel, the mean, max, min and mean magnitude of the 4 neighbours."""
        taps = rearrange(super().kernels(state), "n b (j c) -> j n b c", j=4)
        return torch.cat([taps.mean(0), taps.amax(0), taps.amin(0), taps.abs().mean(0)], dim=-1)


def d4_permutations() -> torch.Tensor:
    """(8, 4) int64: the order of the taps (up, down, left, right) seen from each of the 8 symmetries of the square.
    Every symmetry maps opposite neighbours to opposite neighbours: a flip swaps up/down or left/right, the
    transpose swaps the two pairs."""
    perms = []
    for transpose in (False, True):
        for flip_v in (False, True):
            for flip_h in (False, True):
                vertical = [1, 0] if flip_v else [0, 1]
                horizontal = [3, 2] if flip_h else [2, 3]
                perms.append(horizontal + vertical if transpose else vertical + horizontal)
    return torch.tensor(perms)


class D4LatticeRule(AxialLatticeRule):
    """An :class:`AxialLatticeRule` averaged over the 8 rotations and reflections of its four neighbour taps:
    ``Δs = W₂ · mean_g GELU(W₁ · g(p) + b₁) + b₂`` for the perception ``p`` with its taps reordered by each symmetry
    ``g`` (:func:`d4_permutations`). With a uniform connection field the rule commutes with the maze's rotations
    and reflections, as the task does, while the MLP still sees each neighbour's channels together (the isotropic
    rule's per-channel max and min do not). Same parameters as the axial rule.

    Reordering the taps is reordering the first layer's weight blocks instead, so the 8 views run as one MLP of
    ``8·hidden`` units with tied weights: ``W₁`` with its tap blocks permuted per view, ``W₂`` repeated over the
    views and divided by 8 (no copy of the perception per view)."""

    def __init__(self, config: LatticeConfig) -> None:
        super().__init__(config)
        self.register_buffer("perms", d4_permutations(), persistent=False)
        # weight block of each perception block per view: state, message, then the tap that view puts in each slot
        fixed = torch.tensor([[0, 1]]).expand(len(self.perms), 2)
        self.register_buffer("blocks", torch.cat([fixed, 2 + self.perms.argsort(1)], dim=1), persistent=False)

    def forward(self, state: torch.Tensor, message: SparseOperator | ShiftOperator) -> torch.Tensor:
        """The update ``Δs``: (N, B, C) -> (N, B, C)."""
        C, G = state.shape[-1], len(self.perms)
        p = self.perceive(state, message)  # (N, B, 6C): state, message, up, down, left, right
        first, act, last = self.update
        w1 = rearrange(rearrange(first.weight, "h (j c) -> h j c", c=C)[:, self.blocks], "h g j c -> (g h) (j c)")
        hidden = act(F.linear(p, w1, first.bias.repeat(G)))  # (N, B, G·H)
        return F.linear(hidden, repeat(last.weight, "c h -> c (g h)", g=G) / G, last.bias)


def tile_index(n: int, target: int) -> torch.Tensor:
    """Source index along one axis for :func:`tile_cells`: (target,) int64 into ``range(n)``. The first
    ``n // 2`` and last ``n // 2`` positions map to the source's edges; the middle repeats the source's two centre
    positions, keeping each position's parity (``i`` and its source index differ by an even number)."""
    i = torch.arange(target)
    half = n // 2
    middle = half - ((i - half) % 2)  # n // 2 or the one before it, of i's parity
    return torch.where(i < half, i, torch.where(i >= target - half, i - (target - n), middle)).clamp(0, n - 1)


def tile_cells(field: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """A per-cell field (D, H, W, K) extended (or cut) to ``size`` by :func:`tile_index` along each axis: the border
    cells keep their values, the interior is the source's central 2-periodic pattern. In a maze rooms sit at odd
    and pillars at even coordinates, so each cell of a larger maze takes the value of a cell of the same kind."""
    for dim, (n, target) in enumerate(zip(field.shape[:3], size)):
        field = field.index_select(dim, tile_index(n, target).to(field.device))
    return field


def build_rule(lattice: LatticeConfig, taps: Taps) -> LatticeRule:
    """The shared rule of a maze lattice for ``taps``: axial, isotropic, D4-averaged or the plain :class:`LatticeRule`."""
    if lattice.channels <= N_CLASSES:
        raise ValueError(f"lattice.channels={lattice.channels} must be > {N_CLASSES}: the first {N_CLASSES} channels "
                         "hold the maze, the others are the lattice's working state")
    rules = {"axial": AxialLatticeRule, "isotropic": IsotropicLatticeRule, "d4": D4LatticeRule, "lattice": LatticeRule}
    return rules[taps](lattice)


def maze_channels(maze: torch.Tensor) -> torch.Tensor:
    """Maze grids (B, S, S) int64 -> the recalled channels, cell-major (N, B, 4) float one-hot, ``N = S·S``."""
    return rearrange(F.one_hot(maze, N_CLASSES).float(), "b h w k -> (h w) b k")


def initial_state(inputs: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, B, 4) maze channels -> (N, B, C) lattice state: the maze, then ``C − 4`` zero channels."""
    return torch.cat([inputs, inputs.new_zeros(*inputs.shape[:2], channels - inputs.shape[-1])], dim=-1)


def run_recall(
    rule: LatticeRule,
    inputs: torch.Tensor,
    operator: SparseOperator | ShiftOperator,
    steps: int,
    state: torch.Tensor | None = None,
    recall: bool = True,
    fire_generator: torch.Generator | None = None,
    record_activity: bool = False,
    noise: float = 0.0,
    bound: float | None = None,
    mask_walls: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Iterate the shared rule ``steps`` times on a maze lattice.

    Args:
        rule: the rule, its stencils built for this lattice's size.
        inputs: (N, B, 4) maze channels (:func:`maze_channels`).
        operator: the connection message operator (:meth:`LatticeRule.connection_operator`).
        state: (N, B, C) state to continue from, or None for :func:`initial_state`.
        recall: re-impose ``inputs`` on the first 4 channels after every step.
        fire_generator: a CPU generator that draws the stochastic firing masks (training with ``fire_rate < 1``) and
            the noise; None takes the expected update without noise.
        record_activity: also return every step's batch-mean activity (no gradient), for plasticity.
        noise: std of Gaussian noise added to the working channels after every step (only with a generator).
        bound: clamp the working channels to ``[-bound, bound]`` after every step (None: no clamp).
        mask_walls: zero the working channels of wall cells after every step.

    Returns:
        ``(state, activity)``: (N, B, C) final state; a list of (D, H, W) activity fields (empty unless recorded).
    """
    cfg = rule.config
    state = initial_state(inputs, cfg.channels) if state is None else state
    k = inputs.shape[-1]
    medium = 1.0 - inputs[..., WALL : WALL + 1] if mask_walls else None  # (N, B, 1): 0 on walls
    history = []
    for _ in range(steps):  # over time steps; each is vectorised over all cells
        fire = None
        if fire_generator is not None and cfg.fire_rate < 1.0:  # drawn on the generator's device, then moved
            draw = torch.rand(state.shape[0], state.shape[1], 1, generator=fire_generator)
            fire = (draw.to(state.device) < cfg.fire_rate).to(state.dtype)
        state = lattice_step(rule, state, operator, None, fire)
        if noise > 0 and fire_generator is not None:
            shape = (*state.shape[:2], state.shape[2] - k)
            jitter = torch.randn(shape, generator=fire_generator).to(state.device) * noise
            state = torch.cat([state[..., :k], state[..., k:] + jitter], dim=-1)
        if bound is not None:
            state = torch.cat([state[..., :k], state[..., k:].clamp(-bound, bound)], dim=-1)
        if medium is not None:
            state = torch.cat([state[..., :k], state[..., k:] * medium], dim=-1)
        if recall:
            state = torch.cat([inputs, state[..., k:]], dim=-1)
        if record_activity:
            history.append(activity_from_state(state.detach()).mean(1).reshape(cfg.size))
    return state, history


class FixedDepthConvNet(nn.Module):
    """The fixed-depth baseline: ``depth`` residual 3×3 convolutions of ``width`` channels, the maze re-injected at
    every layer (the same recall the lattice gets), and a 1×1 readout to path logits.

    Each layer grows the receptive field by one cell, as one lattice step does, so ``depth`` = the lattice's
    training step count gives the same receptive field; unlike the lattice it cannot run longer on a larger maze.
    Layer ``l``: ``h ← h + conv_l(GELU([h, x]))`` (pre-activation residual; ``h`` starts at zero).
    """

    def __init__(self, width: int, depth: int, in_channels: int = N_CLASSES) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"FixedDepthConvNet width={width} and depth={depth} must be >= 1")
        self.width, self.depth = width, depth
        self.layers = nn.ModuleList(nn.Conv2d(width + in_channels, width, 3, padding=1) for _ in range(depth))
        self.readout = nn.Conv2d(width, 1, 1)

    @staticmethod
    def n_params(width: int, depth: int, in_channels: int = N_CLASSES) -> int:
        return depth * (9 * (width + in_channels) * width + width) + width + 1

    @classmethod
    def matched(cls, n_params: int, depth: int, in_channels: int = N_CLASSES) -> FixedDepthConvNet:
        """The width whose parameter count is closest to ``n_params`` at this depth (at least 1)."""
        width = min(range(1, 4 * int(math.sqrt(n_params)) + 2),
                    key=lambda w: abs(cls.n_params(w, depth, in_channels) - n_params))
        return cls(width, depth, in_channels)

    def forward(self, maze: torch.Tensor) -> torch.Tensor:
        """maze (B, S, S) int64 -> path logits (B, S, S)."""
        x = rearrange(F.one_hot(maze, N_CLASSES).float(), "b h w k -> b k h w")
        h = x.new_zeros(x.shape[0], self.width, *x.shape[2:])
        for conv in self.layers:  # over the fixed layers
            h = h + conv(F.gelu(torch.cat([h, x], dim=1)))
        return self.readout(h)[:, 0]


def square_views(grid: torch.Tensor) -> torch.Tensor:
    """(B, S, S) -> (8, B, S, S): the grids under the 8 rotations and reflections of the square, the identity first
    (view ``v``: rotate by ``v // 2`` quarter turns, then mirror left-right when ``v`` is odd)."""
    views = []
    for turns in range(4):
        rotated = torch.rot90(grid, turns, (-2, -1))
        views += [rotated, rotated.flip(-1)]
    return torch.stack(views)


def unview(views: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`square_views`: (8, B, S, S) fields, each in its view's frame -> (8, B, S, S), all in
    the frame of the original grids."""
    return torch.stack([torch.rot90(v.flip(-1) if i % 2 else v, -(i // 2), (-2, -1)) for i, v in enumerate(views)])


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """(B, S, S) float -> (B, S, S): the sum over each cell's 4 in-plane neighbours (zero outside the grid)."""
    p = F.pad(x, (1, 1, 1, 1))
    return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]


def is_simple_path(maze: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether each predicted mask is one simple path of free cells from the start to the goal, label-free.

    maze (B, S, S) int64 cell classes, mask (B, S, S) 0/1 -> (B,) bool. True when start and goal are marked, no
    wall is, start and goal have exactly one marked neighbour and every other marked cell two, and the marked cells
    are connected (a connected set with these degrees is a path between its two degree-1 cells). In a perfect maze
    (a spanning tree of its rooms, what :mod:`neat_lightning.data.generators.maze` makes) the only simple path from
    start to goal is the shortest one, so there this check is exact: True iff the mask is the answer. In a maze
    with loops a longer simple path would pass too.
    """
    on = mask.bool()
    ends = (maze == START) | (maze == GOAL)
    degree = _neighbour_sum(on.float())
    wanted = torch.where(ends, 1.0, 2.0)
    local = (~on | ((degree == wanted) & (maze != WALL))) & (on | ~ends)
    reach = on & (maze == START)
    for _ in range(int(on.sum(dim=(-2, -1)).max()) if len(on) else 0):  # flood fill through the marked cells
        grown = (reach | (_neighbour_sum(reach.float()) > 0)) & on
        if torch.equal(grown, reach):
            break
        reach = grown
    return local.flatten(1).all(1) & (reach == on).flatten(1).all(1)


def select_path(maze: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One answer per maze from several predictions of it: the shortest that :func:`is_simple_path` accepts (the
    first of equal length; on a perfect maze every accepted prediction is the same path), or, where none is, the
    per-cell majority (a cell is path when at least half of the predictions mark it). One prediction is its own
    answer either way.

    maze (B, S, S) int64, predictions (V, B, S, S) 0/1 in the maze's frame -> ``(answer (B, S, S) int64,
    checked (B,) bool)``: ``checked`` is True where the answer passed the check.
    """
    valid = torch.stack([is_simple_path(maze, p) for p in predictions])  # (V, B)
    length = predictions.flatten(2).sum(2).float()  # (V, B) marked cells
    best = torch.where(valid, length, torch.inf).argmin(0)  # the first shortest accepted one (0 where none is)
    chosen = predictions[best, torch.arange(maze.shape[0], device=maze.device)]
    majority = (2 * predictions.long().sum(0) >= len(predictions)).long()
    checked = valid.any(0)
    return torch.where(checked[:, None, None], chosen.long(), majority), checked
