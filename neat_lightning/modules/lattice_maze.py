"""LatticeMazeSolver: the lattice's shared local rule, iterated on a maze, marks the shortest path.

A maze (``S × S`` cells: free, wall, start, goal) is the initial state of a thin ``1 × S × S`` lattice; the rule of
:mod:`neat_lightning.components.lattice` runs for ``steps`` steps with the maze recalled every step, over the plastic
connections of a :class:`~neat_lightning.components.lattice_state.LatticeState`, and a per-cell readout gives path
logits (:mod:`neat_lightning.components.maze_lattice`). Training follows the deep-thinking recipe (recall,
progressive loss, random step counts; Bansal et al. 2022, arXiv 2202.05826), which is what lets a rule trained on
small mazes solve larger ones when it is given more steps: ``test_steps`` is a free argument.

``use_lattice=False`` is the fixed-depth baseline: a residual 3×3 convolutional network of ``lattice.steps`` layers
(the same receptive field as the lattice's training steps) with the parameter count of the lattice model
(:class:`~neat_lightning.components.maze_lattice.FixedDepthConvNet`); it ignores step counts.

Plasticity (``plasticity.enabled``) and emergence feedback (``plasticity.emergence_feedback``: the local spectral
structure of the activity scales each cell's plasticity; ``plasticity.emergence_pruning``: it weights pruning) are
options, for the ablations. The connections start uniform (``maze.connection_init``) and live at the training size;
on another maze size the lattice reads them tiled (edges anchored, the 2-periodic interior repeated:
:func:`~neat_lightning.components.maze_lattice.tile_cells`) or resampled (``maze.resize``); plasticity runs only in
training.

Batches: ``{"maze": (B, S, S) int64, "target": (B, S, S) int64}`` from
:class:`~neat_lightning.data.maze.MazeDataModule`. Logged: ``train/loss``, ``train/steps``, ``val/loss``,
``val/exact_path_accuracy`` (a maze counts when every cell is right), ``val/cell_f1`` (path cells, torchmetrics),
the same under ``test/`` (with ``test_steps``, and with ``test_views=8`` the answer checked over the maze's 8 views:
:meth:`LatticeMazeSolver.solve`) plus ``test/path_checked``, and ``lattice/activity``, ``lattice/emergence``,
``lattice/wavelength``, ``lattice/clusters``, ``lattice/sparsity``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryF1Score

from neat_lightning.choices import check_choice
from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.lattice_state import LatticeState, resample_cells
from neat_lightning.components.maze_lattice import (
    N_CLASSES,
    FixedDepthConvNet,
    MazeConfig,
    build_rule,
    maze_channels,
    run_recall,
    select_path,
    square_views,
    tile_cells,
    unview,
)
from neat_lightning.components.plasticity import (
    PlasticityConfig,
    emergence_prune_scale,
    local_structure,
    magnitude_prune_mask,
)
from neat_lightning.modules.base import ResumableModule
from neat_lightning.modules.lattice import LatticeOptimConfig, as_config
from neat_lightning.modules.optim import default_adamw
from neat_lightning.modules.plastic import PlasticLattice

STRUCTURE_NAME = "lattice_maze"
Views = Literal[1, 8]  # a maze as given, or in all 8 rotations and reflections of the square
GROUPS: dict[str, type] = {
    "lattice": LatticeConfig, "maze": MazeConfig, "plasticity": PlasticityConfig, "clustering": ClusteringConfig,
    "optim": LatticeOptimConfig,
}
MAZE_LATTICE = LatticeConfig(depth=1, height=9, width=9, channels=6, hidden=32, steps=30, fire_rate=1.0)
MAZE_OPTIM = LatticeOptimConfig(learning_rate=1e-2, weight_decay=0.0, warmup_steps=20, min_lr_ratio=0.1)


def exact_paths(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, S, S) 0/1 predictions and targets -> (B,) float: 1 where every cell of the maze is right."""
    return (pred == target).flatten(1).all(1).float()


def path_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S) logits and 0/1 targets -> ``(exact (B,) float, predicted (B, S, S) int64)``: a maze is exact when
    every cell's prediction ``logit > 0`` equals its target."""
    pred = (logits > 0).long()
    return exact_paths(pred, target), pred


class LatticeMazeSolver(PlasticLattice, ResumableModule):
    """The lattice's shared rule as a maze solver (or, with ``use_lattice=False``, the fixed-depth baseline).

    Args:
        use_lattice: False builds the fixed-depth convolutional baseline of equal parameter count.
        lattice: the thin lattice: ``depth`` 1, ``height = width`` = the training maze side, ``channels`` (> 4: the
            first 4 hold the maze), the rule's ``hidden`` width, ``steps`` (training run length; the baseline's
            depth), ``fire_rate``, ``perception`` (with ``maze.taps="lattice"``) and ``stencil``.
        maze: the training recipe: neighbour taps, recall, the random run-length range, the progressive-loss weight
            and the path cells' loss weight.
        plasticity: rates, bounds, profile, on/off, and the emergence feedback and emergence-aware pruning options.
        clustering: k-means of the cells (as for LatticeNetwork; off by default).
        optim: the default AdamW with warm-up and cosine decay (``rule_lr_scale`` must stay 1).
        val_steps: lattice steps in validation (None: ``maze.max_steps`` or ``lattice.steps``).
        test_steps: lattice steps in testing, free to exceed the training steps on larger mazes (None: val_steps).
        test_views: 8 runs every test maze also in its 7 other rotations and reflections and answers with the shortest
            prediction that is one simple path from start to goal (:func:`~neat_lightning.components.maze_lattice.
            is_simple_path`, label-free; exact on perfect mazes), else the per-cell majority (:meth:`solve`);
            1 answers with the maze as given. ``test/path_checked`` logs the share of answers that passed the check.
        baseline_width: channels of the fixed-depth baseline (``use_lattice=False``); None: the width whose
            parameter count is closest to the lattice model's.
        metrics_every: log lattice metrics every this many training steps.
        lattice_seed: seed of the run lengths, firing masks and k-means samples (per step: resumes are exact).
    """

    def __init__(
        self,
        use_lattice: bool = True,
        lattice: LatticeConfig = MAZE_LATTICE,
        maze: MazeConfig = MazeConfig(),
        plasticity: PlasticityConfig = PlasticityConfig(),
        clustering: ClusteringConfig = ClusteringConfig(),
        optim: LatticeOptimConfig = MAZE_OPTIM,
        val_steps: int | None = None,
        test_steps: int | None = None,
        test_views: Views = 1,
        baseline_width: int | None = None,
        metrics_every: int = 10,
        lattice_seed: int = 0,
    ) -> None:
        super().__init__()
        groups = {name: as_config(cls, value, name) for (name, cls), value in zip(
            GROUPS.items(), (lattice, maze, plasticity, clustering, optim))}
        lattice, maze, plasticity, clustering, optim = groups.values()
        self.save_hyperparameters(ignore=list(GROUPS))
        for name, cfg in groups.items():  # plain values: checkpoints load with weights_only
            self.hparams[name] = dataclasses.asdict(cfg)
        if lattice.depth != 1:
            raise ValueError(f"lattice.depth={lattice.depth} must be 1: the maze is the one plane of a thin lattice")
        if lattice.height != lattice.width or lattice.height < 5 or lattice.height % 2 == 0:
            raise ValueError(f"lattice.height={lattice.height}, lattice.width={lattice.width} must be equal, odd "
                             "and >= 5: the training maze side in cells")
        if maze.max_steps is not None and maze.max_steps < lattice.steps:
            raise ValueError(f"maze.max_steps={maze.max_steps} must be >= lattice.steps={lattice.steps}")
        for name, value in (("val_steps", val_steps), ("test_steps", test_steps), ("baseline_width", baseline_width)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 or None")
        check_choice("test_views", test_views, Views)
        if metrics_every < 1:
            raise ValueError(f"metrics_every={metrics_every} must be >= 1")
        if optim.rule_lr_scale != 1.0:
            raise ValueError(f"optim.rule_lr_scale={optim.rule_lr_scale} must be 1: the maze solver trains its rule "
                             "and readout at one rate")
        self.config, self.maze_config, self.optim_config = lattice, maze, optim
        rule = build_rule(lattice, maze.taps)
        readout = nn.Linear(lattice.channels, 1)
        if use_lattice:
            self.rule, self.readout = rule, readout
        else:
            lattice_params = sum(p.numel() for m in (rule, readout) for p in m.parameters())
            self.net = (FixedDepthConvNet(baseline_width, lattice.steps) if baseline_width is not None
                        else FixedDepthConvNet.matched(lattice_params, depth=lattice.steps))
        self.cells = LatticeState(lattice.size, lattice.channels, plasticity, clustering)
        if maze.connection_init is not None:
            with torch.no_grad():
                self.cells.connections.fill_(maze.connection_init)
        self.val_steps = val_steps or maze.max_steps or lattice.steps
        self.test_steps = test_steps or self.val_steps
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": metric() for stage in ("val", "test")
            for name, metric in (("exact", MeanMetric), ("f1", BinaryF1Score), ("checked", MeanMetric))
        })
        self._last_activity: torch.Tensor | None = None  # (T, 1, S, S) of the last training forward
        self._last_cells: torch.Tensor | None = None  # (S·S, C) batch-mean final state
        self._record()

    # -- structure and protocols (Plastic, StagedLattice, Releasable) ---------------------------------------------

    def _record(self) -> None:
        self.record_structure(STRUCTURE_NAME, self.plastic_structure())

    def restore_structure(self, name: str, state: Any) -> None:
        """Rebuild the ``"lattice_maze"`` entry (profile and clustering switch); other names go to the base."""
        if name != STRUCTURE_NAME:
            return super().restore_structure(name, state)
        self.restore_plastic(state)
        self._record()

    def prune_connections(self, sparsity: float) -> float:
        """Magnitude pruning of the connections to ``sparsity``; with ``plasticity.emergence_pruning > 0`` and an
        activity field from the last training step, each score is scaled by the receiving cell's local structure
        (emergence-aware pruning). Returns the sparsity reached."""
        weight = self.cells.plasticity.emergence_pruning
        if weight == 0 or self._last_activity is None:
            return self.cells.prune(sparsity)
        structure = local_structure(self._last_activity[-1], self.cells.plasticity.emergence_window)
        with torch.no_grad():
            mask = magnitude_prune_mask(self.cells.connections, self.cells.connection_mask, sparsity,
                                        emergence_prune_scale(structure, weight))
            self.cells.connection_mask.copy_(mask)
            self.cells.connections.mul_(mask)
        return self.cells.sparsity

    # -- model -----------------------------------------------------------------------------------------------------

    def _step_generator(self) -> torch.Generator:
        """CPU generator of this training step (run lengths, firing, k-means): a function of seed and step."""
        return torch.Generator().manual_seed(int(self.hparams.lattice_seed) * 1_000_003 + int(self.global_step))

    def _operator(self, size: int):
        """The connection message operator for a ``size × size`` maze (stencils rebuilt when the size changes;
        connections tiled or resampled from the training size, ``maze.resize``)."""
        shape = (1, size, size)
        if self.rule.config.size != shape:
            self.rule.build_stencils(shape)
        conn = self.cells.effective_connections()
        if tuple(conn.shape[:3]) != shape:
            conn = (tile_cells(conn, shape) if self.maze_config.resize == "tile"
                    else resample_cells(conn, shape, "trilinear"))
        return self.rule.connection_operator(conn)

    def _logits(self, state: torch.Tensor, size: int) -> torch.Tensor:
        return rearrange(self.readout(state)[..., 0], "(h w) b -> b h w", h=size, w=size)

    def forward(self, maze: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """maze (B, S, S) int64 -> path logits (B, S, S) after ``steps`` lattice steps (None: ``val_steps``; the
        baseline ignores it). Expected updates, no sampling."""
        if not self.hparams.use_lattice:
            return self.net(maze)
        return self._logits(self.run(maze, steps or self.val_steps), maze.shape[-1])

    def run(self, maze: torch.Tensor, steps: int, state: torch.Tensor | None = None) -> torch.Tensor:
        """Iterate the rule on mazes (B, S, S) int64 for ``steps`` steps with this model's recall, bound and wall mask
        (expected updates, no noise), from ``state`` (S·S, B, C) or the initial state -> the (S·S, B, C) state."""
        cfg = self.maze_config
        state, _ = run_recall(self.rule, maze_channels(maze), self._operator(maze.shape[-1]), steps, state=state,
                              recall=cfg.recall, bound=cfg.bound, mask_walls=cfg.mask_walls)
        return state

    def view_logits(self, maze: torch.Tensor, steps: int | None = None, views: Views = 1) -> torch.Tensor:
        """maze (B, S, S) int64 -> path logits (V, B, S, S) of the maze run as given (``views=1``) or in all 8
        rotations and reflections of the square (``views=8``, the identity first; one batch of 8·B), each mapped
        back to the maze's frame."""
        check_choice("views", views, Views)
        if views == 1:
            return self(maze, steps)[None]
        logits = self(rearrange(square_views(maze), "v b h w -> (v b) h w"), steps)
        return unview(rearrange(logits, "(v b) h w -> v b h w", v=views))

    @torch.no_grad()
    def solve(self, maze: torch.Tensor, steps: int | None = None, views: Views = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Path masks for mazes (B, S, S) int64 -> ``(path (B, S, S) int64, checked (B,) bool)``. With ``views=8``
        the answer is the shortest of the 8 views' predictions that is one simple path from start to goal, else the
        per-cell majority (:func:`~neat_lightning.components.maze_lattice.select_path`); ``checked`` says whether
        the answer passed that label-free check."""
        return select_path(maze, (self.view_logits(maze, steps, views) > 0).long())

    @property
    def _longest(self) -> int:
        """The longest training run: ``maze.max_steps``, or ``lattice.steps`` without one."""
        return self.maze_config.max_steps or self.config.steps

    @torch.no_grad()
    def _hardest(self, maze: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``hard_fraction`` of mazes (B, S, S) with the highest per-maze loss after the longest training run,
        noise-free (the fixed-depth baseline: its one pass), hardest first."""
        per_maze = self._bce(self(maze, self._longest), target, reduction="none").flatten(1).mean(1)
        k = max(1, round(self.maze_config.hard_fraction * len(maze)))
        idx = per_maze.topk(k).indices
        return maze[idx], target[idx]

    def _bce(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        weight = torch.as_tensor(self.maze_config.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weight, reduction=reduction)

    def _check_size(self, maze: torch.Tensor) -> int:
        size = maze.shape[-1]
        if size != self.config.height:
            raise ValueError(f"training maze side {size} differs from lattice.height={self.config.height}: the "
                             "plastic connections live at the training size; set both to the same value")
        return size

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        maze, target = batch["maze"], batch["target"]
        if self.maze_config.hard_fraction < 1.0:
            maze, target = self._hardest(maze, target)
        if not self.hparams.use_lattice:
            loss = self._bce(self.net(maze), target)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        size = self._check_size(maze)
        cfg, recipe = self.config, self.maze_config
        gen = self._step_generator()
        fire_gen = gen if cfg.fire_rate < 1.0 or recipe.noise > 0 else None
        kw = dict(recall=recipe.recall, fire_generator=fire_gen, noise=recipe.noise, bound=recipe.bound,
                  mask_walls=recipe.mask_walls)
        longest = self._longest
        inputs, op = maze_channels(maze), self._operator(size)
        alpha, loss, activity = recipe.progressive, 0.0, None
        if alpha < 1.0:  # the full run, of a random length in [steps, max_steps]
            n_full = int(torch.randint(cfg.steps, longest + 1, (1,), generator=gen))
            state, activity = run_recall(self.rule, inputs, op, n_full, record_activity=True, **kw)
            loss = loss + (1.0 - alpha) * self._bce(self._logits(state, size), target)
            self.log("train/steps", float(n_full))
            if recipe.fixed_point > 0:  # one more step should leave the working channels where they are
                after, _ = run_recall(self.rule, inputs, op, 1, state=state, **{**kw, "noise": 0.0})
                drift = (after[..., N_CLASSES:] - state[..., N_CLASSES:]).pow(2).mean()
                loss = loss + recipe.fixed_point * drift
                self.log("train/fixed_point_drift", drift)
        if alpha > 0.0:  # progressive: n steps without gradient, then k with (Bansal et al. 2022, Alg. 1)
            n = int(torch.randint(0, longest, (1,), generator=gen))
            k = int(torch.randint(1, longest - n + 1, (1,), generator=gen))
            with torch.no_grad():
                start, _ = run_recall(self.rule, inputs, op, n, **kw)
            state_p, act_p = run_recall(self.rule, inputs, op, k, state=start.detach(),
                                        record_activity=activity is None, **kw)
            activity = activity or act_p
            if alpha == 1.0:
                state = state_p
            loss = loss + alpha * self._bce(self._logits(state_p, size), target)
        self._last_activity = torch.stack(activity)  # (T, 1, S, S)
        self._last_cells = state.detach().mean(1)  # (S·S, C)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then plasticity (and clustering) on the activity of the step's forward, before any
        callback's ``on_train_batch_end`` (a checkpoint written at step k holds step k's plasticity)."""
        super().optimizer_step(*args, **kwargs)
        if self.hparams.use_lattice and self._last_activity is not None:
            self.cells.plasticity_step(self._last_activity, self._last_cells, generator=self._step_generator())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._last_activity is not None and self.global_step % self.hparams.metrics_every == 0:
            self.log_dict({f"lattice/{k}": v for k, v in self.cells.metrics(self._last_activity[-1]).items()})

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, steps: int, views: Views = 1) -> None:
        maze, target = batch["maze"], batch["target"]
        logits = self.view_logits(maze, steps, views)  # (V, B, S, S)
        pred, checked = select_path(maze, (logits > 0).long())  # one view: its prediction, checked
        exact = exact_paths(pred, target)
        n = len(maze)
        self.log(f"{stage}/loss", self._bce(logits[0], target), prog_bar=stage == "val", batch_size=n)
        for name, value in (("exact", exact), ("checked", checked.float())):
            self.metrics[f"{stage}_{name}"].update(value)
        self.metrics[f"{stage}_f1"].update(pred.flatten(), target.flatten())
        self.log(f"{stage}/exact_path_accuracy", self.metrics[f"{stage}_exact"], prog_bar=True, batch_size=n)
        self.log(f"{stage}/cell_f1", self.metrics[f"{stage}_f1"], batch_size=n)
        self.log(f"{stage}/path_checked", self.metrics[f"{stage}_checked"], batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_steps)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_steps, self.hparams.test_views)
        self.log("test/steps", float(self.test_steps if self.hparams.use_lattice else self.config.steps),
                 batch_size=len(batch["maze"]))

    def configure_optimizers(self):
        o = self.optim_config
        return default_adamw(self, o.learning_rate, o.weight_decay, o.warmup_steps, o.min_lr_ratio)
