"""Perfect mazes of any size as cell grids, with their shortest start-goal path as a per-cell mask.

A maze of ``r × r`` rooms is a ``(2r + 1) × (2r + 1)`` grid of cells (:data:`MAZE_CLASSES`): rooms sit at odd
coordinates, the cell between two adjacent rooms is a passage or a wall, every even-even cell is a wall. Carving is a
randomised depth-first search (long corridors) or randomised Kruskal (many short dead ends) over the rooms; both
give a *perfect* maze, a spanning tree of the rooms, so there is exactly one simple path between any two rooms and
the shortest start-goal path is unique. Start and goal are two distinct rooms drawn uniformly.

Every maze's target — the cells of the shortest path, start and goal included — is checked with breadth-first search
from both ends: a cell is on a shortest path iff ``d_start + d_goal == d_start(goal)``, and the number of shortest
paths (counted by dynamic programming over BFS layers) must be one. A maze that fails raises.

Held-out split: :func:`maze_split_unit` hashes a maze's content (walls, start, goal) to ``[0, 1)``; a DataModule serves
training only mazes with ``unit >= val_fraction`` and evaluates only on the others, so no evaluation maze is ever a
training maze, at any size.

Every maze is a pure function of its seed (``random.Random``); plain Python over at most ``(2r + 1)²`` cells of one
maze, torch only to stack batches. No Lightning.

Axis legend: ``b`` mazes in a batch, ``h w`` cell rows and columns.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from neat_lightning.choices import check_choice

MAZE_CLASSES: tuple[str, ...] = ("free", "wall", "start", "goal")
FREE, WALL, START, GOAL = range(4)
Algorithm = Literal["dfs", "kruskal"]
_STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))


@dataclass(frozen=True)
class Maze:
    """One maze and its unique shortest path.

    Attributes:
        grid: (S, S) int64 cell classes (:data:`MAZE_CLASSES`), ``S = 2·rooms + 1``.
        path: (S, S) int64, 1 on the cells of the shortest start-goal path (both ends included), 0 elsewhere.
        start, goal: (row, column) of the two ends.
    """

    grid: torch.Tensor
    path: torch.Tensor
    start: tuple[int, int]
    goal: tuple[int, int]

    @property
    def size(self) -> int:
        return int(self.grid.shape[0])


def check_size(size: int, field: str = "size") -> int:
    """A maze side in cells: odd and >= 5 (two rooms a side), else a ValueError naming ``field``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 5 or size % 2 == 0:
        raise ValueError(f"{field}={size!r} must be an odd number of cells >= 5 (2 * rooms + 1, at least 2 rooms)")
    return size


def carve(rooms: int, rng: random.Random, algorithm: Algorithm = "dfs") -> list[list[int]]:
    """A perfect maze of ``rooms × rooms`` rooms -> ``(2·rooms + 1)²`` grid of FREE/WALL (a list of rows)."""
    check_choice("algorithm", algorithm, Algorithm)
    n = 2 * rooms + 1
    g = [[WALL] * n for _ in range(n)]
    for i in range(rooms):
        for j in range(rooms):
            g[2 * i + 1][2 * j + 1] = FREE
    if algorithm == "dfs":
        visited = {(0, 0)}
        stack = [(0, 0)]
        while stack:  # iterative randomised depth-first search over rooms
            i, j = stack[-1]
            options = [(i + di, j + dj) for di, dj in _STEPS
                       if 0 <= i + di < rooms and 0 <= j + dj < rooms and (i + di, j + dj) not in visited]
            if not options:
                stack.pop()
                continue
            ni, nj = rng.choice(options)
            g[i + ni + 1][j + nj + 1] = FREE  # the passage between the two rooms
            visited.add((ni, nj))
            stack.append((ni, nj))
    else:  # kruskal
        parent = list(range(rooms * rooms))

        def root(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        edges = [((i, j), (i + di, j + dj)) for i in range(rooms) for j in range(rooms) for di, dj in ((1, 0), (0, 1))
                 if i + di < rooms and j + dj < rooms]
        rng.shuffle(edges)
        for (i, j), (k, m) in edges:  # join two trees when the edge links different ones
            a, b = root(i * rooms + j), root(k * rooms + m)
            if a != b:
                parent[a] = b
                g[i + k + 1][j + m + 1] = FREE
    return g


def bfs_distances(free: Sequence[Sequence[bool]], source: tuple[int, int]) -> tuple[list[list[int]], list[list[int]]]:
    """Breadth-first search over free cells (4-neighbourhood) from ``source`` -> ``(distance, count)`` grids:
    steps to each cell (-1 when unreachable) and the number of distinct shortest paths reaching it."""
    n_rows, n_cols = len(free), len(free[0])
    dist = [[-1] * n_cols for _ in range(n_rows)]
    count = [[0] * n_cols for _ in range(n_rows)]
    dist[source[0]][source[1]], count[source[0]][source[1]] = 0, 1
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for dr, dc in _STEPS:
            rr, cc = r + dr, c + dc
            if 0 <= rr < n_rows and 0 <= cc < n_cols and free[rr][cc]:
                if dist[rr][cc] < 0:
                    dist[rr][cc] = dist[r][c] + 1
                    queue.append((rr, cc))
                if dist[rr][cc] == dist[r][c] + 1:
                    count[rr][cc] += count[r][c]
    return dist, count


def shortest_path_mask(grid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The cells on any shortest start-goal path of a maze grid (S, S) and the number of shortest paths.

    Returns:
        ``(mask, n_paths)``: (S, S) int64 1 on every cell of some shortest path (the union; one path when
        ``n_paths == 1``), and the count; ``(zeros, 0)`` when the goal is unreachable.
    """
    rows = grid.tolist()
    free = [[v != WALL for v in row] for row in rows]
    start = _find(rows, START, "start")
    goal = _find(rows, GOAL, "goal")
    d_start, n_start = bfs_distances(free, start)
    d_goal, _ = bfs_distances(free, goal)
    total = d_start[goal[0]][goal[1]]
    if total < 0:
        return torch.zeros_like(grid), 0
    mask = [[int(a >= 0 and b >= 0 and a + b == total) for a, b in zip(ra, rb)] for ra, rb in zip(d_start, d_goal)]
    return torch.tensor(mask, dtype=torch.long), n_start[goal[0]][goal[1]]


def _find(rows: list[list[int]], cls: int, name: str) -> tuple[int, int]:
    hits = [(r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v == cls]
    if len(hits) != 1:
        raise ValueError(f"a maze grid needs exactly one {name} cell (class {cls}), found {len(hits)}")
    return hits[0]


def make_maze(size: int, seed: int, algorithm: Algorithm = "dfs") -> Maze:
    """The maze of side ``size`` cells (odd, >= 5) drawn from ``seed``: a perfect maze, two distinct rooms as start
    and goal, and the BFS-checked unique shortest path as the target."""
    rooms = (check_size(size) - 1) // 2
    rng = random.Random(seed)
    g = carve(rooms, rng, algorithm)
    start, goal = rng.sample([(2 * i + 1, 2 * j + 1) for i in range(rooms) for j in range(rooms)], 2)
    g[start[0]][start[1]], g[goal[0]][goal[1]] = START, GOAL
    grid = torch.tensor(g, dtype=torch.long)
    path, n_paths = shortest_path_mask(grid)
    if n_paths != 1:  # a perfect maze is a tree: this would be a carving bug
        raise RuntimeError(f"maze seed={seed} size={size}: {n_paths} shortest paths, expected exactly 1")
    return Maze(grid, path, start, goal)


def maze_split_unit(grid: torch.Tensor, split_seed: int = 0) -> float:
    """A maze's place in ``[0, 1)`` by a hash of its cells (walls, start, goal): the held-out split key."""
    digest = hashlib.blake2b(grid.to(torch.uint8).numpy().tobytes(), digest_size=8,
                             key=str(split_seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def draw_maze(size: int, key: Sequence[int], held_out: bool, val_fraction: float, split_seed: int = 0,
              algorithm: Algorithm = "dfs") -> Maze:
    """The first maze of the stream seeded by ``key`` (e.g. ``(seed, batch, row)``) that falls on the asked side of
    the split: ``held_out`` mazes have ``maze_split_unit < val_fraction``, training mazes the rest."""
    base = int.from_bytes(hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest(), "little")
    for attempt in range(100_000):  # rejection sampling; expected 1 / val_fraction draws for held-out mazes
        maze = make_maze(size, (base + attempt) & (2**63 - 1), algorithm)
        if (maze_split_unit(maze.grid, split_seed) < val_fraction) == held_out:
            return maze
    raise RuntimeError(f"no {'held-out' if held_out else 'training'} maze of size {size} in 100000 draws "
                       f"(val_fraction={val_fraction})")


def embed_maze(maze: Maze, size: int, offset: tuple[int, int]) -> Maze:
    """``maze`` placed in a ``size × size`` grid of walls with its top-left cell at ``offset`` (both even, so rooms
    stay at odd coordinates); the path mask is zero outside it. The walls around a maze are its border's walls
    extended: the shortest path is unchanged."""
    n = maze.size
    (r, c) = offset
    if r % 2 or c % 2 or not (0 <= r <= size - n and 0 <= c <= size - n):
        raise ValueError(f"offset={offset} must be even and place the {n}x{n} maze inside {size}x{size}")
    grid = torch.full((size, size), WALL, dtype=torch.long)
    path = torch.zeros(size, size, dtype=torch.long)
    grid[r : r + n, c : c + n], path[r : r + n, c : c + n] = maze.grid, maze.path
    return Maze(grid, path, (maze.start[0] + r, maze.start[1] + c), (maze.goal[0] + r, maze.goal[1] + c))


def draw_small_maze(size: int, min_size: int, key: Sequence[int], val_fraction: float, split_seed: int = 0,
                    algorithm: Algorithm = "dfs") -> Maze:
    """A training maze of an odd side drawn uniformly from ``[min_size, size]``, embedded at a random even offset in
    a ``size × size`` grid of walls (:func:`embed_maze`); a pure function of ``key``. Its own content hash is on the
    training side of the split (:func:`draw_maze`); as it leaves rooms of the grid walled off it is never one of
    the perfect ``size × size`` mazes the evaluation sets hold."""
    rng = random.Random(repr(("small", *key)))
    n = rng.randrange(min_size, size + 1, 2)
    maze = draw_maze(n, key, False, val_fraction, split_seed, algorithm)
    return embed_maze(maze, size, (2 * rng.randrange((size - n) // 2 + 1), 2 * rng.randrange((size - n) // 2 + 1)))


def maze_batch(mazes: Sequence[Maze]) -> dict[str, torch.Tensor]:
    """Mazes of one size -> ``{"maze": (B, S, S) int64, "target": (B, S, S) int64}``."""
    return {"maze": torch.stack([m.grid for m in mazes]), "target": torch.stack([m.path for m in mazes])}


def held_out_mazes(size: int, n: int, seed: int, val_fraction: float, split_seed: int = 0,
                   algorithm: Algorithm = "dfs") -> list[Maze]:
    """``n`` held-out mazes of side ``size``: maze ``i`` is the first held-out draw of the stream
    ``(seed, size, i)``."""
    return [draw_maze(size, (seed, size, i), True, val_fraction, split_seed, algorithm) for i in range(n)]
