"""Synthetic grid-world episodes (the MVoT task families), their images, and reading cell classes back.

Three families, after MVoT (Li et al. 2025, "Imagine while Reasoning in Space: Multimodal Visualization-of-Thought"):

* ``maze``: a perfect maze (walls, floor, start, goal); the agent walks the shortest path from start to goal and
  leaves a trail, drawn step by step.
* ``frozenlake``: a square of ice with holes, a start in one corner and a goal in the other; the agent walks a
  shortest hole-free path (one is guaranteed to exist).
* ``minibehavior``: a walled room with a table and one object (a key or a ball); the agent walks to the object,
  picks it up, walks to the table and puts it down on it.

Every episode is a pure function of ``(family, seed, grid_size)``. Its symbolic state is a ``(S, n, n)`` int64 tensor
of cell classes (:data:`CELL_CLASSES`), one ``n x n`` grid per step (the state after each action); images are drawn
from the states by one vectorised lookup of a per-class cell glyph (:func:`render`), and
:func:`cells_from_images` reads the classes back from (possibly reconstructed) images by nearest glyph, which is how
the VQ-VAE round trip is checked against the generator's own state.

Symbolic generation (maze carving, breadth-first paths) is plain Python over at most ``n * n`` cells of one small
episode; rendering and reading back are tensor operations over whole batches, with no loop over cells. Plain Python
and torch only: :class:`neat_lightning.data.grids.ImageDataModule` serves these images to a Trainer.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange

Family = Literal["maze", "frozenlake", "minibehavior"]
FAMILIES: tuple[str, ...] = ("maze", "frozenlake", "minibehavior")

# ----------------------------------------------------------------------------------------------------------------------
# cell classes and their glyphs

# name -> (RGB colour of the glyph, glyph shape, RGB background). "full" fills the cell with the colour.
_CELLS: dict[str, tuple[tuple[float, float, float], str, tuple[float, float, float]]] = {
    "void": ((0.0, 0.0, 0.0), "full", (0.0, 0.0, 0.0)),  # outside the world (smaller mazes/lakes)
    "floor": ((0.92, 0.92, 0.88), "full", (0.92, 0.92, 0.88)),
    "wall": ((0.30, 0.30, 0.34), "full", (0.30, 0.30, 0.34)),
    "start": ((0.20, 0.40, 0.95), "full", (0.20, 0.40, 0.95)),
    "goal": ((0.15, 0.75, 0.25), "full", (0.15, 0.75, 0.25)),
    "path": ((0.98, 0.80, 0.45), "full", (0.98, 0.80, 0.45)),  # the maze agent's trail
    "agent": ((0.90, 0.10, 0.10), "disk", (0.92, 0.92, 0.88)),
    "ice": ((0.70, 0.90, 1.00), "full", (0.70, 0.90, 1.00)),
    "hole": ((0.05, 0.10, 0.35), "full", (0.05, 0.10, 0.35)),
    "table": ((0.55, 0.35, 0.15), "full", (0.55, 0.35, 0.15)),
    "key": ((1.00, 0.85, 0.00), "diamond", (0.92, 0.92, 0.88)),
    "ball": ((0.65, 0.20, 0.80), "disk", (0.92, 0.92, 0.88)),
    "agent_carrying": ((0.90, 0.10, 0.10), "ring", (1.00, 0.85, 0.00)),  # red ring around a gold centre
    "key_on_table": ((1.00, 0.85, 0.00), "diamond", (0.55, 0.35, 0.15)),
    "ball_on_table": ((0.65, 0.20, 0.80), "disk", (0.55, 0.35, 0.15)),
}
CELL_CLASSES: tuple[str, ...] = tuple(_CELLS)
CELL = {name: i for i, name in enumerate(CELL_CLASSES)}
NUM_CELL_CLASSES = len(CELL_CLASSES)

ACTIONS: tuple[str, ...] = ("up", "down", "left", "right", "pickup", "drop")
_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _glyph_mask(shape: str, cell_px: int) -> torch.Tensor:
    """(p, p) bool mask of the glyph inside one cell of ``cell_px`` pixels."""
    c = (cell_px - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(cell_px) - c, torch.arange(cell_px) - c, indexing="ij")
    r = cell_px / 2
    if shape == "full":
        return torch.ones(cell_px, cell_px, dtype=torch.bool)
    if shape == "disk":
        return yy**2 + xx**2 <= (0.8 * r) ** 2
    if shape == "diamond":
        return yy.abs() + xx.abs() <= 0.9 * r
    if shape == "ring":  # outer disk minus the centre: the centre keeps the background (the carried key)
        d2 = yy**2 + xx**2
        return (d2 <= (0.8 * r) ** 2) & ~((yy.abs() < 0.3 * r) & (xx.abs() < 0.3 * r))
    raise ValueError(f"unknown glyph shape {shape!r}")


def cell_templates(cell_px: int) -> torch.Tensor:
    """The image of one cell of every class: (C, 3, p, p) float in [0, 1], C = ``NUM_CELL_CLASSES``."""
    if cell_px < 1:
        raise ValueError(f"cell_px={cell_px} must be >= 1")
    out = []
    for color, shape, background in _CELLS.values():  # loop over the 15 classes, not over cells
        mask = _glyph_mask(shape, cell_px)
        fg = torch.tensor(color)[:, None, None]
        bg = torch.tensor(background)[:, None, None]
        out.append(torch.where(mask, fg, bg))
    return (torch.stack(out) * 255).round() / 255  # colours on the 8-bit grid: uint8 storage is exact


def cell_px(image_size: int, grid_size: int) -> int:
    if grid_size < 4:
        raise ValueError(f"grid_size={grid_size} must be >= 4")
    if image_size % grid_size:
        raise ValueError(f"image_size={image_size} must be a multiple of grid_size={grid_size}")
    return image_size // grid_size


def render(states: torch.Tensor, image_size: int) -> torch.Tensor:
    """Draw cell-class grids as RGB images.

    Args:
        states: (..., n, n) int64 cell classes.
        image_size: output side in pixels, a multiple of ``n``.

    Returns:
        (..., 3, image_size, image_size) float32 in [0, 1].
    """
    n = states.shape[-1]
    if states.shape[-2] != n:
        raise ValueError(f"states must be square grids (..., n, n); got shape {tuple(states.shape)}")
    templates = cell_templates(cell_px(image_size, n)).to(states.device)  # (C, 3, p, p)
    cells = templates[states]  # (..., n, n, 3, p, p)
    return rearrange(cells, "... h w c p q -> ... c (h p) (w q)")


def cells_from_images(images: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Read cell classes back from images: each cell is given the class whose glyph is nearest (squared error).

    Args:
        images: (..., 3, H, W) float in [0, 1], H = W a multiple of ``grid_size``.
        grid_size: cells per side, n.

    Returns:
        (..., n, n) int64 cell classes.
    """
    size = images.shape[-1]
    if images.shape[-3] != 3 or images.shape[-2] != size:
        raise ValueError(f"images must be (..., 3, H, H); got shape {tuple(images.shape)}")
    p = cell_px(size, grid_size)
    templates = rearrange(cell_templates(p).to(images), "k c p q -> k (c p q)")  # (C, 3 p p)
    patches = rearrange(images.float(), "... c (h p) (w q) -> ... h w (c p q)", p=p, q=p)
    dist = (patches**2).sum(-1, keepdim=True) - 2 * patches @ templates.T + (templates**2).sum(-1)  # (..., n, n, C)
    return dist.argmin(-1)


# ----------------------------------------------------------------------------------------------------------------------
# episodes (symbolic, plain Python per episode)


@dataclass(frozen=True)
class GridEpisode:
    """One episode of a grid world.

    Attributes:
        family: ``maze``, ``frozenlake`` or ``minibehavior``.
        seed: the seed it was generated from.
        states: (S, n, n) int64 cell classes; ``states[0]`` is the initial state, ``states[i]`` the state after
            ``actions[i - 1]``.
        actions: the S - 1 actions taken (names from :data:`ACTIONS`).
        agent: (S, 2) int64 (row, col) of the agent at every step.
    """

    family: str
    seed: int
    states: torch.Tensor
    actions: tuple[str, ...]
    agent: torch.Tensor

    def images(self, image_size: int) -> torch.Tensor:
        """The step sequence as images: (S, 3, image_size, image_size) float in [0, 1]."""
        return render(self.states, image_size)


def _neighbours(r: int, c: int) -> Iterator[tuple[str, int, int]]:
    for name, (dr, dc) in _MOVES.items():
        yield name, r + dr, c + dc


def _shortest_path(free: list[list[bool]], start: tuple[int, int], goals: set[tuple[int, int]]) -> list[str] | None:
    """Breadth-first search over ``free`` cells; the moves of a shortest path from ``start`` into ``goals``."""
    n = len(free)
    prev: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cur = queue.popleft()
        if cur in goals:
            moves: list[str] = []
            while prev[cur] is not None:
                cur, move = prev[cur][0], prev[cur][1]  # type: ignore[index]
                moves.append(move)
            return moves[::-1]
        for move, r, c in _neighbours(*cur):
            if 0 <= r < n and 0 <= c < n and free[r][c] and (r, c) not in prev:
                prev[(r, c)] = (cur, move)
                queue.append((r, c))
    return None


def _walk(start: tuple[int, int], moves: Sequence[str]) -> list[tuple[int, int]]:
    cells = [start]
    for m in moves:
        dr, dc = _MOVES[m]
        cells.append((cells[-1][0] + dr, cells[-1][1] + dc))
    return cells


def _episode(family: str, seed: int, frames: list[list[list[int]]], actions: Sequence[str],
             agent: Sequence[tuple[int, int]]) -> GridEpisode:
    return GridEpisode(
        family=family,
        seed=seed,
        states=torch.tensor(frames, dtype=torch.long),
        actions=tuple(actions),
        agent=torch.tensor(agent, dtype=torch.long),
    )


def maze_episode(seed: int, grid_size: int = 8) -> GridEpisode:
    """A perfect maze (randomised depth-first carving) of 2..(n-1)//2 rooms a side, placed in the top-left corner of
    an ``n x n`` grid (the rest is wall). The agent walks the unique path from start to goal, leaving a trail."""
    rng = random.Random(seed)
    n = grid_size
    rooms_max = (n - 1) // 2
    m = rng.randint(2, rooms_max) if rooms_max > 2 else 2
    g = [[CELL["wall"]] * n for _ in range(n)]
    # carve: rooms at (2i + 1, 2j + 1)
    visited = {(0, 0)}
    stack = [(0, 0)]
    g[1][1] = CELL["floor"]
    while stack:
        i, j = stack[-1]
        options = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
                   if 0 <= i + di < m and 0 <= j + dj < m and (i + di, j + dj) not in visited]
        if not options:
            stack.pop()
            continue
        ni, nj = rng.choice(options)
        g[i + ni + 1][j + nj + 1] = CELL["floor"]  # the wall between the two rooms
        g[2 * ni + 1][2 * nj + 1] = CELL["floor"]
        visited.add((ni, nj))
        stack.append((ni, nj))
    rooms = [(2 * i + 1, 2 * j + 1) for i in range(m) for j in range(m)]
    start, goal = rng.sample(rooms, 2)
    g[start[0]][start[1]] = CELL["start"]
    g[goal[0]][goal[1]] = CELL["goal"]
    free = [[v != CELL["wall"] for v in row] for row in g]
    moves = _shortest_path(free, start, {goal})
    assert moves is not None, "a perfect maze connects every pair of rooms"
    cells = _walk(start, moves)
    frames = []
    for t, pos in enumerate(cells):
        f = [row[:] for row in g]
        for r, c in cells[1:t]:  # the trail behind the agent (the start keeps its colour)
            f[r][c] = CELL["path"]
        f[pos[0]][pos[1]] = CELL["agent"]
        frames.append(f)
    return _episode("maze", seed, frames, moves, cells)


def frozenlake_episode(seed: int, grid_size: int = 8) -> GridEpisode:
    """A lake of 4..n cells a side (top-left; the rest is void) with holes (probability 0.1..0.3 each), start at the
    top-left and goal at the bottom-right corner; holes are redrawn until a hole-free path exists. The agent walks a
    shortest path to the goal."""
    rng = random.Random(seed)
    n = grid_size
    s = rng.randint(4, n)
    p_hole = rng.uniform(0.1, 0.3)
    start, goal = (0, 0), (s - 1, s - 1)
    while True:
        g = [[CELL["void"]] * n for _ in range(n)]
        for r in range(s):
            for c in range(s):
                g[r][c] = CELL["hole"] if rng.random() < p_hole else CELL["ice"]
        g[start[0]][start[1]] = CELL["start"]
        g[goal[0]][goal[1]] = CELL["goal"]
        free = [[v in (CELL["ice"], CELL["start"], CELL["goal"]) for v in row] for row in g]
        moves = _shortest_path(free, start, {goal})
        if moves is not None:
            break
    cells = _walk(start, moves)
    frames = []
    for pos in cells:
        f = [row[:] for row in g]
        f[pos[0]][pos[1]] = CELL["agent"]
        frames.append(f)
    return _episode("frozenlake", seed, frames, moves, cells)


def minibehavior_episode(seed: int, grid_size: int = 8) -> GridEpisode:
    """A walled ``n x n`` room with a 1x2 / 2x1 / 2x2 table and one object (key or ball). The agent walks next to
    the object, picks it up (``pickup``), walks next to the table and puts the object on it (``drop``)."""
    rng = random.Random(seed)
    n = grid_size
    g = [[CELL["wall"] if r in (0, n - 1) or c in (0, n - 1) else CELL["floor"] for c in range(n)] for r in range(n)]
    th, tw = rng.choice([(1, 2), (2, 1), (2, 2)])
    tr, tc = rng.randint(1, n - 1 - th), rng.randint(1, n - 1 - tw)
    table = {(tr + i, tc + j) for i in range(th) for j in range(tw)}
    for r, c in table:
        g[r][c] = CELL["table"]
    kind = rng.choice(["key", "ball"])
    free_cells = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1) if (r, c) not in table]
    obj, agent0 = rng.sample(free_cells, 2)
    g[obj[0]][obj[1]] = CELL[kind]

    def adjacent(cells: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return {(r, c) for cr, cc in cells for _, r, c in _neighbours(cr, cc)
                if 0 < r < n - 1 and 0 < c < n - 1 and g[r][c] == CELL["floor"]}

    free = [[v == CELL["floor"] for v in row] for row in g]
    to_obj = _shortest_path(free, agent0, adjacent({obj}))
    if to_obj is None:  # the object is walled in by the table: pick it up where the agent stands instead
        to_obj, obj = [], agent0
        g[obj[0]][obj[1]] = CELL["floor"]
    frames, actions, agent = [], [], []
    here = agent0
    carrying = False

    def snapshot() -> None:
        f = [row[:] for row in g]
        f[here[0]][here[1]] = CELL["agent_carrying"] if carrying else CELL["agent"]
        frames.append(f)
        agent.append(here)

    snapshot()
    for move in to_obj:
        here = _walk(here, [move])[-1]
        actions.append(move)
        snapshot()
    g[obj[0]][obj[1]] = CELL["floor"]
    carrying = True
    actions.append("pickup")
    snapshot()
    free = [[v == CELL["floor"] for v in row] for row in g]
    targets = adjacent(table) | ({here} if any((r, c) in table for _, r, c in _neighbours(*here)) else set())
    to_table = _shortest_path(free, here, targets)
    for move in to_table or []:
        here = _walk(here, [move])[-1]
        actions.append(move)
        snapshot()
    if to_table is not None:
        spot = min((r, c) for _, r, c in _neighbours(*here) if (r, c) in table)
        g[spot[0]][spot[1]] = CELL[f"{kind}_on_table"]
        carrying = False
        actions.append("drop")
        snapshot()
    return _episode("minibehavior", seed, frames, actions, agent)


GENERATORS: dict[str, Callable[[int, int], GridEpisode]] = {
    "maze": maze_episode,
    "frozenlake": frozenlake_episode,
    "minibehavior": minibehavior_episode,
}


def generate_episode(family: str, seed: int, grid_size: int = 8) -> GridEpisode:
    """The episode of ``family`` for ``seed`` on an ``n x n`` grid (deterministic)."""
    if family not in GENERATORS:
        raise ValueError(f"family={family!r} is not one of {list(FAMILIES)}")
    if grid_size < 5:
        raise ValueError(f"grid_size={grid_size} must be >= 5 (a 2x2-room maze needs 5 cells a side)")
    return GENERATORS[family](seed, grid_size)


def seed_from(*keys: Any) -> int:
    """A 63-bit seed from any tuple of keys (stable across processes and platforms)."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def sample_states(
    n: int, seed: int, families: Sequence[str] = FAMILIES, grid_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` single states: image ``i`` is a uniformly chosen step of episode ``seed_from(seed, i)`` of family
    ``families[i % len(families)]``.

    Returns:
        states: (n, grid, grid) int64 cell classes.
        family_ids: (n,) int64 index into ``families``.
    """
    states, fam = [], []
    for i in range(n):
        f = i % len(families)
        s = seed_from(seed, i)
        ep = generate_episode(families[f], s, grid_size)
        states.append(ep.states[s % len(ep.states)])
        fam.append(f)
    return torch.stack(states), torch.tensor(fam, dtype=torch.long)


def sample_images(
    n: int, seed: int, families: Sequence[str] = FAMILIES, image_size: int = 32, grid_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images and the symbolic states they show: ((n, 3, S, S) float in [0, 1], (n, g, g) int64)."""
    states, _ = sample_states(n, seed, families, grid_size)
    return render(states, image_size), states
