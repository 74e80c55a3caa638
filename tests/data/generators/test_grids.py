"""Grid-world generators: episodes, rendering and read-back of cell classes."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.data.generators.grids import (
    ACTIONS,
    CELL,
    FAMILIES,
    NUM_CELL_CLASSES,
    cell_templates,
    cells_from_images,
    generate_episode,
    render,
    sample_images,
)

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grid_size", [6, 8, 11])
def test_episode_is_deterministic_and_consistent(family: str, grid_size: int) -> None:
    for seed in range(12):
        a, b = generate_episode(family, seed, grid_size), generate_episode(family, seed, grid_size)
        assert torch.equal(a.states, b.states) and a.actions == b.actions
        S = len(a.states)
        assert a.states.shape == (S, grid_size, grid_size)
        assert len(a.actions) == S - 1 and set(a.actions) <= set(ACTIONS)
        assert a.agent.shape == (S, 2)
        assert int(a.states.min()) >= 0 and int(a.states.max()) < NUM_CELL_CLASSES
        # the agent is drawn exactly where the symbolic position says, once per frame
        agent_cells = (a.states == CELL["agent"]) | (a.states == CELL["agent_carrying"])
        assert torch.equal(agent_cells.flatten(1).sum(1), torch.ones(S, dtype=torch.long))
        rows, cols = a.agent[:, 0], a.agent[:, 1]
        assert agent_cells[torch.arange(S), rows, cols].all()
        # moves move the agent by one cell; pickup/drop leave it in place
        for t, act in enumerate(a.actions):
            dr, dc = MOVES.get(act, (0, 0))
            assert (a.agent[t + 1] - a.agent[t]).tolist() == [dr, dc]


def test_seeds_give_different_episodes() -> None:
    for family in FAMILIES:
        states = {tuple(generate_episode(family, s, 8).states[0].flatten().tolist()) for s in range(20)}
        assert len(states) > 10, family


def test_maze_reaches_goal_and_leaves_a_trail() -> None:
    for seed in range(10):
        ep = generate_episode("maze", seed, 9)
        goal = (ep.states[0] == CELL["goal"]).nonzero()[0]
        assert ep.agent[-1].tolist() == goal.tolist()
        assert (ep.states[-1] == CELL["goal"]).sum() == 0  # the agent stands on it
        assert int((ep.states[-1] == CELL["path"]).sum()) == max(0, len(ep.actions) - 1)
        # the agent never walks through a wall
        walls = ep.states[0] == CELL["wall"]
        assert not walls[ep.agent[:, 0], ep.agent[:, 1]].any()


def test_frozenlake_path_avoids_holes() -> None:
    for seed in range(20):
        ep = generate_episode("frozenlake", seed, 8)
        holes = ep.states[0] == CELL["hole"]
        assert not holes[ep.agent[:, 0], ep.agent[:, 1]].any()
        assert (ep.states[-1] == CELL["goal"]).sum() == 0


def test_minibehavior_puts_the_object_on_the_table() -> None:
    placed = 0
    for seed in range(20):
        ep = generate_episode("minibehavior", seed, 8)
        assert "pickup" in ep.actions
        if ep.actions[-1] == "drop":
            placed += 1
            last = ep.states[-1]
            assert int(((last == CELL["key_on_table"]) | (last == CELL["ball_on_table"])).sum()) == 1
            assert int(((last == CELL["key"]) | (last == CELL["ball"])).sum()) == 0
    assert placed >= 18


@pytest.mark.parametrize("image_size,grid_size", [(32, 8), (64, 8), (64, 16)])
def test_render_and_read_back_round_trip(image_size: int, grid_size: int) -> None:
    images, states = sample_images(24, seed=3, image_size=image_size, grid_size=grid_size)
    assert images.shape == (24, 3, image_size, image_size) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(cells_from_images(images, grid_size), states)
    # uint8 storage is exact (colours are on the 8-bit grid)
    assert torch.equal((images * 255).round() / 255, images)


def test_read_back_tolerates_noise() -> None:
    images, states = sample_images(16, seed=4)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.equal(cells_from_images(noisy, 8), states)


def test_every_class_has_a_distinct_glyph() -> None:
    for px in (4, 8):
        t = cell_templates(px).flatten(1)
        d = torch.cdist(t, t) + torch.eye(len(t)) * 1e9
        assert float(d.min()) > 0.1


def test_episode_images_are_the_rendered_states() -> None:
    ep = generate_episode("maze", 5, 8)
    assert torch.equal(ep.images(32), render(ep.states, 32))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="family='sokoban'"):
        generate_episode("sokoban", 0)
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of grid_size=8"):
        render(torch.zeros(8, 8, dtype=torch.long), 30)
