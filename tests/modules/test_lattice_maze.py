"""LatticeMazeSolver with a real Trainer: training, metrics, test-time steps, the baseline, ablation switches, pruning
and an exact mid-epoch resume."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch

from neat_lightning.callbacks.plasticity_stages import PlasticityStages, Stage
from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.maze_lattice import MazeConfig
from neat_lightning.components.plasticity import PROFILES, PlasticityConfig
from neat_lightning.data.maze import MazeDataModule
from neat_lightning.modules.lattice import LatticeOptimConfig
from neat_lightning.modules.lattice_maze import LatticeMazeSolver, path_scores
from neat_lightning.protocols import Plastic, Releasable, StagedLattice
from tests.conftest import assert_lattice_resume_is_exact

TINY = dict(
    lattice=LatticeConfig(depth=1, height=7, width=7, channels=6, hidden=8, steps=4, fire_rate=1.0),
    maze=MazeConfig(max_steps=6), optim=LatticeOptimConfig(warmup_steps=1, weight_decay=0.0), metrics_every=1,
)


def tiny(**changes) -> dict:
    out = dict(TINY)
    for name, value in changes.items():
        if isinstance(value, dict):
            value = dataclasses.replace(out.get(name) or {"plasticity": PlasticityConfig()}[name], **value)
        out[name] = value
    return out


def data(**kw) -> MazeDataModule:
    return MazeDataModule(**{**dict(size=7, batch_size=4, batches_per_epoch=3, val_mazes=8, val_batch_size=8,
                                    test_size=11, test_mazes=4), **kw})


def trainer(root, max_steps, callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
                     default_root_dir=root, callbacks=list(callbacks), deterministic=True,
                     val_check_interval=max_steps, check_val_every_n_epoch=None, **kw)


def test_trains_logs_and_tests_larger_mazes_with_more_steps(tmp_path):
    L.seed_everything(0)
    m = LatticeMazeSolver(**tiny(test_steps=13))
    assert all(isinstance(m, p) for p in (Plastic, StagedLattice, Releasable))
    t = trainer(tmp_path, 3)
    dm = data()
    t.fit(m, dm)
    metrics = t.callback_metrics
    for name in ("train/loss", "train/steps", "val/loss", "val/exact_path_accuracy", "val/cell_f1",
                 "lattice/activity", "lattice/emergence", "lattice/sparsity"):
        assert name in metrics, name
    assert 4 <= float(metrics["train/steps"]) <= 6
    out = t.test(m, dm, verbose=False)[0]
    assert out["test/steps"] == 13 and 0.0 <= out["test/exact_path_accuracy"] <= 1.0
    assert m.rule.config.size == (1, 11, 11)  # stencils rebuilt for the test mazes
    logits = m(dm.eval_set(7, 8)["maze"], steps=2)  # and back
    assert logits.shape == (8, 7, 7) and m.rule.config.size == (1, 7, 7)


def test_the_fixed_point_loss_penalises_the_change_of_one_more_step(tmp_path):
    """``maze.fixed_point``: the training loss adds the weighted mean squared change of the working channels over
    one more (noise-free) step after the full run, and logs it."""
    losses = {}
    for weight in (0.0, 2.0):
        L.seed_everything(0)
        m = LatticeMazeSolver(**tiny(maze=MazeConfig(max_steps=6, fixed_point=weight, progressive=0.0)))
        batch = next(iter(data().train_dataloader()))
        m.log = lambda name, value, **kw: losses.setdefault((weight, name), float(value))
        losses[weight] = float(m.training_step(batch, 0))
    drift = losses[(2.0, "train/fixed_point_drift")]
    assert drift > 0 and (0.0, "train/fixed_point_drift") not in losses
    assert losses[2.0] == pytest.approx(losses[0.0] + 2.0 * drift, rel=1e-5)


def test_hard_fraction_trains_on_the_mazes_the_rule_scores_worst():
    """``maze.hard_fraction``: the step trains on the mazes with the highest per-maze loss after a noise-free run of
    ``max_steps``, exactly as a step on those mazes alone would."""
    L.seed_everything(0)
    hard = LatticeMazeSolver(**tiny(maze=MazeConfig(max_steps=6, hard_fraction=0.5)))
    full = LatticeMazeSolver(**tiny(maze=MazeConfig(max_steps=6)))
    full.load_state_dict(hard.state_dict())
    batch = next(iter(data().train_dataloader()))
    with torch.no_grad():
        logits = hard(batch["maze"], steps=6)
    per_maze = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, batch["target"].float(), reduction="none").mean((1, 2))
    worst = per_maze.argsort(descending=True)[:2]
    assert per_maze[worst].min() > per_maze.min()  # the pick is not the whole batch's spread
    for m in (hard, full):
        m.log = lambda *a, **kw: None
    loss_hard = hard.training_step(batch, 0)
    loss_full = full.training_step({k: v[worst] for k, v in batch.items()}, 0)
    assert float(loss_hard.detach()) == pytest.approx(float(loss_full.detach()), rel=1e-6)


def test_eight_views_run_the_maze_in_every_orientation_and_test_logs_the_checked_share(tmp_path):
    """``view_logits(views=8)`` is the maze as given first, then its 7 other rotations and reflections mapped back;
    the axial rule's views differ, the D4-averaged rule's agree (it commutes with the square's symmetries), and a
    test with ``test_views=8`` logs the share of answers that passed the path check."""
    maze = data().eval_set(7, 8)["maze"]
    L.seed_everything(0)
    axial = LatticeMazeSolver(**tiny(test_views=8, test_steps=5)).eval()
    logits = axial.view_logits(maze, 5, views=8)
    assert logits.shape == (8, 8, 7, 7) and torch.allclose(logits[0], axial(maze, 5), atol=1e-5)
    assert not torch.allclose(logits[1:], logits[:1].expand(7, -1, -1, -1), atol=1e-3)
    d4 = LatticeMazeSolver(**tiny(maze=MazeConfig(max_steps=6, taps="d4"))).eval()
    views = d4.view_logits(maze, 5, views=8)
    assert torch.allclose(views[1:], views[:1].expand(7, -1, -1, -1), atol=1e-4)
    path, checked = axial.solve(maze, 5, views=8)
    assert path.shape == (8, 7, 7) and checked.dtype == torch.bool
    t = trainer(tmp_path, 1)
    t.fit(axial, data())
    out = t.test(axial, data(), verbose=False)[0]
    assert 0.0 <= out["test/path_checked"] <= 1.0 and 0.0 <= out["test/exact_path_accuracy"] <= 1.0


def test_path_scores():
    target = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])
    logits = torch.tensor([[[-1.0, 2.0], [3.0, -4.0]], [[1.0, -1.0], [-1.0, -1.0]]])
    exact, pred = path_scores(logits, target)
    assert exact.tolist() == [1.0, 0.0] and pred[1].tolist() == [[1, 0], [0, 0]]


def test_baseline_has_the_lattice_parameter_count_and_fixed_depth():
    lattice = LatticeMazeSolver(**tiny())
    base = LatticeMazeSolver(**tiny(use_lattice=False))
    n_l = sum(p.numel() for p in lattice.parameters())
    n_b = sum(p.numel() for p in base.parameters())
    assert abs(n_b - n_l) / n_l < 0.35 and base.net.depth == 4 and not hasattr(base, "rule")
    default_l = sum(p.numel() for p in LatticeMazeSolver().parameters())
    default_b = sum(p.numel() for p in LatticeMazeSolver(use_lattice=False).parameters())
    assert abs(default_b - default_l) / default_l < 0.1
    maze = data().eval_set(7, 8)["maze"]
    assert torch.equal(base(maze, steps=3), base(maze, steps=50))  # step counts do not apply to it
    wide = LatticeMazeSolver(**tiny(use_lattice=False, baseline_width=5))
    assert wide.net.width == 5 and wide.net.depth == 4


def test_plasticity_and_emergence_switches_change_the_connections(tmp_path):
    def run(**plasticity):
        L.seed_everything(1)
        m = LatticeMazeSolver(**tiny(plasticity=plasticity))
        before = m.cells.connections.clone()
        trainer(tmp_path, 2, limit_val_batches=0).fit(m, data())
        return before, m.cells.connections

    before, off = run(enabled=False)
    assert torch.equal(before, off)
    _, on = run(enabled=True)
    _, emergent = run(enabled=True, emergence_feedback=True, emergence_strength=4.0, emergence_window=3)
    assert not torch.equal(on, before) and not torch.equal(emergent, on)


def test_emergence_aware_pruning_prunes_other_connections_than_magnitude_pruning(tmp_path):
    masks = []
    for weight in (0.0, 1.0):
        L.seed_everything(2)
        m = LatticeMazeSolver(**tiny(plasticity={"emergence_pruning": weight, "emergence_window": 3}))
        trainer(tmp_path, 1, limit_val_batches=0).fit(m, data())
        assert m.prune_connections(0.5) == pytest.approx(0.5, abs=1e-3)
        masks.append(m.cells.connection_mask.clone())
    assert not torch.equal(masks[0], masks[1])
    assert m.release_memory() > 0 and m.prune_connections(0.6) == pytest.approx(0.6, abs=1e-3)  # no activity: plain


def test_resume_mid_epoch_is_exact(tmp_path):
    """4 steps uninterrupted vs stopped at step 2 (mid-epoch: 3 batches an epoch) and resumed: identical weights and
    buffers, with stochastic firing, random run lengths, progressive loss, plasticity with emergence feedback and a
    stage table that switches profile, threshold and (emergence-aware) pruning on both sides of the checkpoint."""

    def run(root, checkpoint, ckpt):
        L.seed_everything(3)
        m = LatticeMazeSolver(**tiny(lattice=dataclasses.replace(TINY["lattice"], fire_rate=0.5),
                                     plasticity={"emergence_feedback": True, "emergence_pruning": 0.5,
                                                 "emergence_window": 3}))
        stages = [Stage(0, "discovery"), Stage(1, "balanced", activity_threshold=0.05),
                  Stage(3, "learning", False, 0.3)]
        trainer(root, 4, callbacks=[PlasticityStages(stages), checkpoint]).fit(m, data(), ckpt_path=ckpt)
        return m

    full, _, mid = assert_lattice_resume_is_exact(tmp_path, run)
    assert full.sparsity > 0
    restored = LatticeMazeSolver.load_from_checkpoint(mid)
    assert restored.profile.name == "balanced" and restored.profile.activity_threshold == 0.05
    maze = data().eval_set(7, 8)["maze"]
    assert restored(maze).shape == (8, 7, 7)


def test_profile_type_error_and_bad_arguments():
    m = LatticeMazeSolver(**tiny())
    with pytest.raises(TypeError, match="profile must be a PlasticityProfile, got str"):
        m.set_plasticity_profile("learning")
    m.set_plasticity_profile(PROFILES["balanced"])
    assert m.structure["lattice_maze"]["profile"]["name"] == "balanced"
    bad = [
        (dict(lattice={"depth": 2}), r"lattice.depth=2 must be 1"),
        (dict(lattice={"height": 8, "width": 8}), r"lattice.height=8, lattice.width=8 must be equal, odd and >= 5"),
        (dict(maze={"max_steps": 3}), r"maze.max_steps=3 must be >= lattice.steps=4"),
        (dict(test_steps=0), r"test_steps=0 must be >= 1 or None"),
        (dict(test_views=4), r"test_views=4 must be 1 or 8"),
        (dict(maze={"hard_fraction": 0.0}), r"hard_fraction=0.0 must be in \(0, 1\]"),
        (dict(baseline_width=0), r"baseline_width=0 must be >= 1 or None"),
        (dict(optim={"rule_lr_scale": 0.5}), r"optim.rule_lr_scale=0.5 must be 1"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            LatticeMazeSolver(**tiny(**kw))


def test_training_on_another_maze_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"training maze side 9 differs from lattice.height=7"):
        trainer(tmp_path, 1, limit_val_batches=0).fit(LatticeMazeSolver(**tiny()), data(size=9))


def test_a_checkpoint_of_a_plain_trainer_tests_through_the_cli(tmp_path, monkeypatch, capsys):
    """A checkpoint written outside the CLI (as the benchmark writes them) records its module class, so
    ``neat test --config configs/lattice_maze.yaml --ckpt_path X`` reads its hyperparameters as this class's and tests
    it with the config's 8 views."""
    import sys
    from pathlib import Path

    from neat_lightning.cli import main

    L.seed_everything(0)
    t = trainer(tmp_path, 1)
    t.fit(LatticeMazeSolver(**tiny()), data())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    saved = torch.load(tmp_path / "plain.ckpt", weights_only=False)["hyper_parameters"]
    assert saved["_class_path"] == "neat_lightning.modules.lattice_maze.LatticeMazeSolver"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["neat"])
    config = Path(__file__).resolve().parents[2] / "configs" / "lattice_maze.yaml"
    code = main(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "plain.ckpt"),
                 "--data.init_args.test_size", "11", "--data.init_args.test_mazes", "2",
                 "--model.init_args.test_steps", "4", "--runs_dir", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "test/path_checked" in out.out
