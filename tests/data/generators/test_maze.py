"""Maze generator: perfect mazes of any size, a unique shortest path checked by BFS, a content-hash split."""

from __future__ import annotations

import random

import pytest
import torch

from neat_lightning.data.generators.maze import (
    FREE,
    GOAL,
    START,
    WALL,
    bfs_distances,
    carve,
    draw_maze,
    held_out_mazes,
    make_maze,
    maze_batch,
    maze_split_unit,
    shortest_path_mask,
)


def brute_force_paths(grid: torch.Tensor) -> list[set[tuple[int, int]]]:
    """Every simple start-goal path by exhaustive search (tiny mazes only), as sets of cells."""
    rows = grid.tolist()
    cells = {(r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v != WALL}
    start = next(p for p in cells if rows[p[0]][p[1]] == START)
    goal = next(p for p in cells if rows[p[0]][p[1]] == GOAL)
    out = []

    def walk(p, seen):
        if p == goal:
            out.append(set(seen))
            return
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            q = (p[0] + dr, p[1] + dc)
            if q in cells and q not in seen:
                walk(q, seen | {q})

    walk(start, {start})
    return out


@pytest.mark.parametrize("algorithm", ["dfs", "kruskal"])
@pytest.mark.parametrize("size", [5, 9, 17, 33, 65])
def test_maze_is_perfect_and_its_target_is_the_unique_shortest_path(size, algorithm):
    for seed in range(3 if size > 17 else 10):
        m = make_maze(size, seed, algorithm)
        g = m.grid
        assert g.shape == (size, size) and m.path.shape == (size, size)
        assert int((g == START).sum()) == 1 and int((g == GOAL).sum()) == 1
        assert bool((g[0] == WALL).all() and (g[-1] == WALL).all() and (g[:, 0] == WALL).all())
        assert bool((g[::2, ::2] == WALL).all())  # pillars
        # a spanning tree of r*r rooms has r*r - 1 passages: free cells = rooms + passages
        rooms = ((size - 1) // 2) ** 2
        assert int((g != WALL).sum()) == 2 * rooms - 1
        mask, n_paths = shortest_path_mask(g)
        assert n_paths == 1 and torch.equal(mask, m.path)
        assert m.path[m.start] == 1 and m.path[m.goal] == 1 and not bool((m.path.bool() & (g == WALL)).any())
        # the path is a connected chain: start and goal have one path neighbour, every other path cell two
        p = torch.nn.functional.pad(m.path, (1, 1, 1, 1))
        nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        ends = (nb == 1) & (m.path == 1)
        assert int(ends.sum()) == 2 and bool(ends[m.start]) and bool(ends[m.goal])
        assert bool(((nb == 2) | ends)[m.path == 1].all())


def test_target_equals_the_only_simple_path_found_by_exhaustive_search():
    for seed in range(20):
        m = make_maze(7, seed)
        paths = brute_force_paths(m.grid)
        assert len(paths) == 1  # a tree: exactly one simple path
        assert paths[0] == {tuple(x) for x in m.path.nonzero().tolist()}


def test_bfs_counts_several_shortest_paths_in_a_maze_with_a_loop():
    """The check can fail: an open 3x3 room has 6 shortest corner-to-corner paths, and the mask is their union."""
    g = torch.full((5, 5), WALL)
    g[1:4, 1:4] = FREE
    g[1, 1], g[3, 3] = START, GOAL
    mask, n = shortest_path_mask(g)
    assert n == 6 and int(mask.sum()) == 9
    dist, count = bfs_distances([[v != WALL for v in row] for row in g.tolist()], (1, 1))
    assert dist[3][3] == 4 and count[3][3] == 6 and dist[0][0] == -1


def test_unreachable_goal_and_bad_grids():
    g = torch.full((5, 5), WALL)
    g[1, 1], g[3, 3] = START, GOAL
    assert shortest_path_mask(g)[1] == 0
    g[3, 3] = FREE
    with pytest.raises(ValueError, match=r"exactly one goal cell \(class 3\), found 0"):
        shortest_path_mask(g)


@pytest.mark.parametrize("size", [4, 3, 10, -1, 9.0, True])
def test_bad_size(size):
    with pytest.raises(ValueError, match=r"size=.* must be an odd number of cells >= 5"):
        make_maze(size, 0)


def test_bad_algorithm():
    with pytest.raises(ValueError, match=r"algorithm='prim' must be 'dfs' or 'kruskal'"):
        carve(3, random.Random(0), "prim")  # type: ignore[arg-type]


def test_mazes_are_pure_functions_of_the_seed_and_differ_across_seeds():
    assert torch.equal(make_maze(17, 5).grid, make_maze(17, 5).grid)
    grids = {make_maze(9, s).grid.numpy().tobytes() for s in range(50)}
    assert len(grids) > 45


def test_split_sides_are_disjoint_and_held_out_mazes_fall_on_their_side():
    val = held_out_mazes(9, 30, seed=0, val_fraction=0.2)
    assert all(maze_split_unit(m.grid) < 0.2 for m in val)
    train = [draw_maze(9, (1, k), False, 0.2) for k in range(200)]
    assert all(maze_split_unit(m.grid) >= 0.2 for m in train)
    assert not {m.grid.numpy().tobytes() for m in val} & {m.grid.numpy().tobytes() for m in train}
    units = [maze_split_unit(make_maze(9, s).grid) for s in range(400)]
    assert 0.1 < sum(u < 0.2 for u in units) / 400 < 0.3  # the hash spreads mazes evenly
    assert maze_split_unit(val[0].grid, split_seed=1) != maze_split_unit(val[0].grid)


def test_maze_batch_stacks():
    b = maze_batch([make_maze(9, s) for s in range(3)])
    assert b["maze"].shape == b["target"].shape == (3, 9, 9) and b["maze"].dtype == torch.long
