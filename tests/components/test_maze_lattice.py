"""The maze lattice: axial, isotropic and D4-averaged taps, recall, a hand-set rule that solves mazes of any size, the
fixed-depth baseline."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from neat_lightning.components.lattice import LatticeConfig, LatticeRule
from neat_lightning.components.maze_lattice import (
    AxialLatticeRule,
    D4LatticeRule,
    FixedDepthConvNet,
    IsotropicLatticeRule,
    MazeConfig,
    build_rule,
    d4_permutations,
    initial_state,
    is_simple_path,
    maze_channels,
    run_recall,
    select_path,
    square_views,
    tile_cells,
    tile_index,
    unview,
)
from neat_lightning.data.generators.maze import FREE, GOAL, START, WALL, make_maze, maze_batch


def test_axial_taps_are_the_four_unblurred_neighbours():
    rule = AxialLatticeRule(LatticeConfig(depth=1, height=3, width=4, channels=2, hidden=4, steps=1))
    x = torch.arange(24.0).reshape(12, 1, 2)  # (N, B, C), cell n = h*4 + w
    taps = rearrange(rule.kernels(x), "(h w) b (j c) -> j h w b c", h=3, w=4, c=2)
    grid = rearrange(x, "(h w) b c -> h w b c", h=3)
    assert torch.equal(taps[0, 1:], grid[:-1]) and bool((taps[0, 0] == 0).all())  # up
    assert torch.equal(taps[1, :-1], grid[1:]) and bool((taps[1, -1] == 0).all())  # down
    assert torch.equal(taps[2, :, 1:], grid[:, :-1]) and bool((taps[2, :, 0] == 0).all())  # left
    assert torch.equal(taps[3, :, :-1], grid[:, 1:]) and bool((taps[3, :, -1] == 0).all())  # right
    plain = LatticeRule(LatticeConfig(depth=1, height=3, width=4, channels=2, hidden=4, steps=1))
    assert sum(p.numel() for p in rule.parameters()) == sum(p.numel() for p in plain.parameters())


def test_isotropic_taps_are_symmetric_functions_of_the_neighbours_and_commute_with_rotations():
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=3, hidden=8, steps=1)
    rule = IsotropicLatticeRule(cfg)
    torch.manual_seed(0)
    x = torch.randn(25, 2, 3)
    taps = rearrange(rule.kernels(x), "(h w) b (j c) -> j h w b c", h=5, c=3)
    grid = rearrange(x, "(h w) b c -> h w b c", h=5)
    nb = torch.stack([grid[1, 2], grid[3, 2], grid[2, 1], grid[2, 3]])  # the 4 neighbours of the centre cell
    assert torch.allclose(taps[:, 2, 2], torch.stack([nb.mean(0), nb.amax(0), nb.amin(0), nb.abs().mean(0)]))
    assert torch.allclose(taps[0, 0, 0], (grid[1, 0] + grid[0, 1]) / 4)  # outside the lattice counts as zero
    op = rule.connection_operator(torch.ones(1, 5, 5, 26))
    out = rearrange(rule(x, op), "(h w) b c -> h w b c", h=5)
    for turn in (lambda g: torch.rot90(g, 1, (0, 1)), lambda g: g.flip(0), lambda g: g.transpose(0, 1)):
        moved = rearrange(turn(grid), "h w b c -> (h w) b c")
        assert torch.allclose(rearrange(rule(moved, op), "(h w) b c -> h w b c", h=5), turn(out), atol=1e-6)
    axial = AxialLatticeRule(cfg)
    moved = rearrange(torch.rot90(grid, 1, (0, 1)), "h w b c -> (h w) b c")  # the check can fail: axial taps
    assert not torch.allclose(rearrange(axial(moved, op), "(h w) b c -> h w b c", h=5),
                              torch.rot90(rearrange(axial(x, op), "(h w) b c -> h w b c", h=5), 1, (0, 1)))
    assert sum(p.numel() for p in rule.parameters()) == sum(p.numel() for p in axial.parameters())


def test_d4_rule_averages_the_axial_rule_over_the_eight_symmetries_and_commutes_with_them():
    perms = d4_permutations()
    assert perms.shape == (8, 4) and len({tuple(p) for p in perms.tolist()}) == 8
    for p in perms.tolist():  # opposite neighbours stay opposite: {up, down} and {left, right} map to a pair
        assert {frozenset(p[:2]), frozenset(p[2:])} == {frozenset((0, 1)), frozenset((2, 3))}
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=3, hidden=8, steps=1)
    torch.manual_seed(0)
    rule = D4LatticeRule(cfg)
    x = torch.randn(25, 2, 3)
    op = rule.connection_operator(torch.ones(1, 5, 5, 26))
    grid = rearrange(x, "(h w) b c -> h w b c", h=5)
    out = rearrange(rule(x, op), "(h w) b c -> h w b c", h=5)
    for turn in (lambda g: torch.rot90(g, 1, (0, 1)), lambda g: g.flip(0), lambda g: g.flip(1),
                 lambda g: g.transpose(0, 1)):
        moved = rearrange(turn(grid), "h w b c -> (h w) b c")
        assert torch.allclose(rearrange(rule(moved, op), "(h w) b c -> h w b c", h=5), turn(out), atol=1e-6)
    axial = AxialLatticeRule(cfg)  # the same weights in the axial rule: the D4 update is the mean of its 8 views
    axial.load_state_dict(rule.state_dict())
    C = 3
    p = axial.perceive(x, op)
    taps = rearrange(p[..., 2 * C :], "n b (j c) -> j n b c", j=4)
    views = [torch.cat([p[..., : 2 * C], rearrange(taps[q], "j n b c -> n b (j c)")], -1) for q in perms]
    first, act, last = axial.update
    assert torch.allclose(rule(x, op), last(torch.stack([act(first(v)) for v in views]).mean(0)), atol=1e-6)
    assert not torch.allclose(axial(x, op), rule(x, op))  # the check can fail: the axial rule is not averaged
    assert sum(p.numel() for p in rule.parameters()) == sum(p.numel() for p in axial.parameters())


def test_build_rule_and_config_checks():
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=6, hidden=8, steps=4)
    assert isinstance(build_rule(cfg, "axial"), AxialLatticeRule)
    assert type(build_rule(cfg, "lattice")) is LatticeRule
    assert isinstance(build_rule(cfg, "isotropic"), IsotropicLatticeRule)
    assert isinstance(build_rule(cfg, "d4"), D4LatticeRule)
    with pytest.raises(ValueError, match=r"lattice.channels=4 must be > 4"):
        build_rule(LatticeConfig(depth=1, height=5, width=5, channels=4, hidden=8, steps=4), "axial")
    for kw, match in ((dict(taps="sobel"), r"taps='sobel' must be 'axial', 'isotropic', 'd4' or 'lattice'"),
                      (dict(max_steps=0), r"max_steps=0 must be >= 1 or None"),
                      (dict(progressive=1.5), r"progressive=1.5 must be in \[0, 1\]"),
                      (dict(pos_weight=0.0), r"pos_weight=0.0 must be > 0"),
                      (dict(noise=-0.1), r"noise=-0.1 must be >= 0"),
                      (dict(resize="nearest"), r"resize='nearest' must be 'tile' or 'trilinear'"),
                      (dict(bound=0.0), r"bound=0.0 must be > 0 or None"),
                      (dict(fixed_point=-1.0), r"fixed_point=-1.0 must be >= 0")):
        with pytest.raises(ValueError, match=match):
            MazeConfig(**kw)


def dead_end_filling_rule(size: int, taps: str = "axial") -> tuple[AxialLatticeRule, torch.nn.Linear]:
    """Hand-set weights: channel 4 marks dead cells; a cell dies when it is a wall, already dead, or (not start or
    goal) has >= 3 dead neighbours: ``d' = step(10·(wall + d) + Σ d_nb − 2.5 − 10·(start + goal))``, written with
    GELU units as a clipped ramp (``GELU(m·x)/m ≈ relu(x)`` for m = 20), and ``Δd = d' − d``. With axial taps
    ``Σ d_nb`` adds the four neighbour taps (the D4 rule averages it over orders that give the same sum); with
    isotropic taps it is 4 × the first (the mean)."""
    C, m = 5, 20.0
    rule = build_rule(LatticeConfig(depth=1, height=size, width=size, channels=C, hidden=4, steps=1,
                                    fire_rate=1.0), taps)
    lin1, lin2 = rule.update[0], rule.update[2]
    with torch.no_grad():
        for p in rule.parameters():
            p.zero_()
        z = torch.zeros(6 * C)  # perception: state, message, up, down, left, right (C each)
        z[1], z[4], z[2], z[3] = 10.0, 10.0, -10.0, -10.0  # wall, dead, start, goal
        if taps == "isotropic":
            z[2 * C + 4] = 4.0  # the mean of the neighbours' dead channels
        else:
            for j in range(4):  # the dead channel of each neighbour
                z[(2 + j) * C + 4] = 1.0
        lin1.weight[0], lin1.bias[0] = m * 2 * z, m * (2 * -2.5 + 0.5)
        lin1.weight[1], lin1.bias[1] = m * 2 * z, m * (2 * -2.5 - 0.5)
        lin1.weight[2, 4], lin1.weight[3, 4] = m, -m
        lin2.weight[4] = torch.tensor([1.0, -1.0, -1.0, 1.0]) / m
    readout = torch.nn.Linear(C, 1)
    with torch.no_grad():
        readout.weight.zero_()
        readout.weight[0, 4], readout.bias[0] = -10.0, 5.0
    return rule, readout


@pytest.mark.parametrize("taps", ["axial", "isotropic", "d4"])
@pytest.mark.parametrize("size", [9, 17, 33])
def test_a_hand_set_rule_solves_mazes_of_any_size_and_stays_solved(size, taps):
    """The lattice step with axial, isotropic or D4 taps and recall can express dead-end filling exactly: the same
    weights solve 9x9, 17x17 and 33x33 mazes, and extra steps change nothing (a fixed point)."""
    mazes = [make_maze(size, s) for s in range(6)]
    batch = maze_batch(mazes)
    rule, readout = dead_end_filling_rule(size, taps)
    conn = torch.ones(1, size, size, 26)
    inputs = maze_channels(batch["maze"])
    state, _ = run_recall(rule, inputs, rule.connection_operator(conn), 2 * size * size // 4)
    pred = rearrange(readout(state)[..., 0] > 0, "(h w) b -> b h w", h=size).long()
    assert torch.equal(pred, batch["target"])
    more, _ = run_recall(rule, inputs, rule.connection_operator(conn), 50, state=state)
    assert torch.allclose(more, state)
    few, _ = run_recall(rule, inputs, rule.connection_operator(conn), 2)  # the check can fail: too few steps
    assert not torch.equal(rearrange(readout(few)[..., 0] > 0, "(h w) b -> b h w", h=size).long(), batch["target"])


def test_recall_reimposes_the_maze_and_activity_is_recorded():
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=6, hidden=8, steps=3)
    torch.manual_seed(0)
    rule = AxialLatticeRule(cfg)
    inputs = maze_channels(maze_batch([make_maze(5, 0), make_maze(5, 1)])["maze"])
    op = rule.connection_operator(torch.ones(1, 5, 5, 26))
    state, act = run_recall(rule, inputs, op, 3, record_activity=True)
    assert state.shape == (25, 2, 6) and torch.equal(state[..., :4], inputs) and len(act) == 3
    assert act[0].shape == (1, 5, 5)
    free, _ = run_recall(rule, inputs, op, 3, recall=False)
    assert not torch.equal(free[..., :4], inputs)
    assert torch.equal(initial_state(inputs, 6)[..., 4:], torch.zeros(25, 2, 2))
    g = torch.Generator().manual_seed(0)
    stochastic, _ = run_recall(rule, inputs, op, 3, fire_generator=g)  # fire_rate 0.5: sampled masks
    assert not torch.allclose(stochastic, state)


def test_fixed_depth_net_matches_a_parameter_count_and_has_its_depth_as_receptive_field():
    net = FixedDepthConvNet.matched(1382, depth=30)
    n = sum(p.numel() for p in net.parameters())
    assert n == FixedDepthConvNet.n_params(net.width, 30) and abs(n - 1382) / 1382 < 0.35
    wide = FixedDepthConvNet.matched(5000, 30)
    assert abs(wide.n_params(wide.width, 30) - 5000) < 1300
    torch.manual_seed(0)
    net = FixedDepthConvNet(width=3, depth=4)
    maze = torch.full((1, 21, 21), WALL)
    out = net(maze)
    maze2 = maze.clone()
    maze2[0, 10, 10 + 5] = 0  # 5 cells away: beyond 4 layers (+ the readout) of 3x3 convolutions
    assert out.shape == (1, 21, 21) and net(maze2)[0, 10, 10] == out[0, 10, 10]
    maze2[0, 10, 10 + 4] = 0
    assert net(maze2)[0, 10, 10] != out[0, 10, 10]
    with pytest.raises(ValueError, match=r"width=0 and depth=3 must be >= 1"):
        FixedDepthConvNet(0, 3)


def test_tiling_keeps_edges_and_the_parity_of_every_cell():
    idx = tile_index(9, 17)
    assert idx.tolist() == [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 5, 6, 7, 8]
    assert bool(((torch.arange(17) - idx) % 2 == 0).all())  # rooms map to rooms, walls to walls
    assert tile_index(9, 9).tolist() == list(range(9))
    field = torch.arange(81.0).reshape(1, 9, 9, 1).expand(1, 9, 9, 26)
    big = tile_cells(field, (1, 33, 33))
    assert big.shape == (1, 33, 33, 26)
    assert torch.equal(big[0, :4, :4], field[0, :4, :4]) and torch.equal(big[0, -4:, -4:], field[0, -4:, -4:])
    assert torch.equal(big[0, 10, 10], field[0, 4, 4]) and torch.equal(big[0, 11, 12], field[0, 3, 4])


def test_noise_needs_a_generator_and_changes_only_the_working_channels():
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=6, hidden=8, steps=3, fire_rate=1.0)
    torch.manual_seed(0)
    rule = AxialLatticeRule(cfg)
    inputs = maze_channels(maze_batch([make_maze(5, 0)])["maze"])
    op = rule.connection_operator(torch.ones(1, 5, 5, 26))
    clean, _ = run_recall(rule, inputs, op, 3)
    assert torch.equal(run_recall(rule, inputs, op, 3, noise=0.5)[0], clean)  # no generator: no noise
    noisy, _ = run_recall(rule, inputs, op, 3, noise=0.5, fire_generator=torch.Generator().manual_seed(1))
    again, _ = run_recall(rule, inputs, op, 3, noise=0.5, fire_generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.allclose(noisy, clean)
    assert torch.equal(noisy[..., :4], inputs)


def test_bound_clamps_only_the_working_channels():
    cfg = LatticeConfig(depth=1, height=5, width=5, channels=6, hidden=8, steps=3, fire_rate=1.0)
    torch.manual_seed(0)
    rule = AxialLatticeRule(cfg)
    with torch.no_grad():
        rule.update[2].bias.fill_(5.0)  # every step pushes the working channels up by 5
    inputs = maze_channels(maze_batch([make_maze(5, 0)])["maze"])
    op = rule.connection_operator(torch.ones(1, 5, 5, 26))
    free, _ = run_recall(rule, inputs, op, 3)
    bounded, _ = run_recall(rule, inputs, op, 3, bound=1.0)
    assert free[..., 4:].max() > 10 and bounded[..., 4:].abs().max() <= 1.0
    assert torch.equal(bounded[..., :4], inputs)


def test_masked_walls_carry_no_working_state():
    """``mask_walls``: after every step the working channels of wall cells are zero, so state moves only through
    free cells; the maze channels are untouched and without the mask walls do carry state."""
    cfg = LatticeConfig(depth=1, height=9, width=9, channels=6, hidden=8, steps=4, fire_rate=1.0)
    torch.manual_seed(0)
    rule = AxialLatticeRule(cfg)
    maze = maze_batch([make_maze(9, 0), make_maze(9, 1)])["maze"]
    inputs = maze_channels(maze)
    op = rule.connection_operator(torch.ones(1, 9, 9, 26))
    wall = rearrange(maze == WALL, "b h w -> (h w) b")
    free, _ = run_recall(rule, inputs, op, 4)
    masked, _ = run_recall(rule, inputs, op, 4, mask_walls=True)
    assert free[wall][:, 4:].abs().sum() > 0
    assert torch.equal(masked[wall][:, 4:], torch.zeros_like(masked[wall][:, 4:]))
    assert masked[~wall][:, 4:].abs().sum() > 0 and not torch.allclose(masked[~wall], free[~wall])
    assert torch.equal(masked[..., :4], inputs)


def test_square_views_are_the_eight_symmetries_and_unview_maps_them_back():
    grid = torch.arange(2 * 5 * 5).reshape(2, 5, 5)
    views = square_views(grid)
    assert views.shape == (8, 2, 5, 5) and torch.equal(views[0], grid)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for moved in (torch.rot90(grid, 1, (1, 2)), grid.flip(1), grid.flip(2), grid.transpose(1, 2)):
        assert any(torch.equal(moved, v) for v in views)
    assert torch.equal(unview(views), grid.expand(8, -1, -1, -1))


def _off_path_neighbour(maze: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """A free cell off the path next to a path cell (the mouth of a dead end)."""
    size = maze.shape[-1]
    for i in range(size):
        for j in range(size):
            if maze[i, j] == FREE and target[i, j] == 0 and any(
                    0 <= i + di < size and 0 <= j + dj < size and target[i + di, j + dj] == 1
                    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))):
                return i, j
    raise AssertionError("no dead end next to the path")


@pytest.mark.parametrize("size", [9, 17])
def test_the_path_check_accepts_the_shortest_path_and_nothing_else(size):
    """On perfect mazes the label-free check passes the target and fails a path with a cell missing, with a dead-end
    cell added, with a wall marked, without its start, and the empty and the all-free masks."""
    batch = maze_batch([make_maze(size, seed) for seed in range(6)])
    maze, target = batch["maze"], batch["target"]
    assert is_simple_path(maze, target).all()
    for b in range(len(maze)):
        path = target[b].nonzero().tolist()
        middle = next(c for c in path if maze[b, c[0], c[1]] == FREE)
        wall = next(c for c in (maze[b] == WALL).nonzero().tolist())
        spoiled = []
        for cell, value in ((middle, 0), (_off_path_neighbour(maze[b], target[b]), 1), (wall, 1),
                            ((maze[b] == START).nonzero()[0].tolist(), 0)):
            mask = target[b].clone()
            mask[cell[0], cell[1]] = value
            spoiled.append(mask)
        spoiled += [torch.zeros_like(target[b]), (maze[b] != WALL).long()]
        assert not is_simple_path(maze[b].expand(len(spoiled), -1, -1), torch.stack(spoiled)).any()


def drawn_maze(rows: list[str]) -> torch.Tensor:
    """Rows of ``#`` wall, ``.`` free, ``S`` start, ``G`` goal -> (1, H, W) int64 cell classes."""
    code = {"#": WALL, ".": FREE, "S": START, "G": GOAL}
    return torch.tensor([[code[c] for c in row] for row in rows])[None]


def test_the_path_check_needs_the_marked_cells_connected():
    """A start-goal path plus a separate marked loop has the right degrees everywhere but is not one path (a maze
    with loops: the check must not rely on perfect mazes for this)."""
    maze = drawn_maze(["#######", "#S...G#", "#######", "#..####", "#..####", "#######"])
    path = torch.zeros_like(maze)
    path[0, 1, 1:6] = 1
    loop = path.clone()
    loop[0, 3:5, 1:3] = 1
    assert is_simple_path(maze, path).tolist() == [True] and is_simple_path(maze, loop).tolist() == [False]


def test_select_path_prefers_the_shortest_checked_path_in_a_maze_with_loops():
    maze = drawn_maze(["#######", "#S...G#", "#.###.#", "#.....#", "#######"])
    short = torch.zeros_like(maze)
    short[0, 1, 1:6] = 1
    detour = torch.zeros_like(maze)
    detour[0, 1, 1] = detour[0, 1, 5] = detour[0, 2, 1] = detour[0, 2, 5] = 1
    detour[0, 3, 1:6] = 1
    assert is_simple_path(maze, detour).tolist() == [True]  # a longer simple path passes the check
    answer, checked = select_path(maze, torch.stack([detour, short]))
    assert checked.tolist() == [True] and torch.equal(answer, short)


def test_select_path_takes_a_checked_prediction_or_the_majority():
    batch = maze_batch([make_maze(9, seed) for seed in range(2)])
    maze, target = batch["maze"], batch["target"]
    cells = [c for c in target[1].nonzero().tolist() if maze[1, c[0], c[1]] == FREE][:2]
    holed = [target[1].clone(), target[1].clone()]
    for mask, (i, j) in zip(holed, cells):
        mask[i, j] = 0
    extra = target[1].clone()
    extra[_off_path_neighbour(maze[1], target[1])] = 1
    wrong0 = target[0].clone()
    wrong0[cells[0][0], cells[0][1]] = 1 - wrong0[cells[0][0], cells[0][1]]
    preds = torch.stack([torch.stack([wrong0, holed[0]]), torch.stack([target[0], holed[1]]),
                         torch.stack([target[0], extra])])  # (3 predictions, 2 mazes, S, S)
    answer, checked = select_path(maze, preds)
    assert checked.tolist() == [True, False]  # maze 0: the second prediction passes; maze 1: none does
    assert torch.equal(answer, target)  # maze 1: each error is in one prediction only, so the majority is right
    for one in preds:  # one prediction is its own answer, checked or not
        answer, checked = select_path(maze, one[None])
        assert torch.equal(answer, one) and torch.equal(checked, is_simple_path(maze, one))

