"""PlasticityStages: a stage table that switches plasticity profiles, turns on clustering and prunes connections.

The default table is a six-stage developmental schedule:

=====  ==============  ==========  ===============
stage  profile         clustering  sparsity target
=====  ==============  ==========  ===============
1      discovery       off         0
2      learning        off         0
3      learning        on          0
4      consolidation   on          0.2
5      consolidation   on          0.3
6      freeze          on          0.7
=====  ==============  ==========  ===============

A stage may set its own spike threshold (``Stage(..., activity_threshold=0.05)``), overriding its profile's, so
any threshold (0.01, 0.02, 0.03, 0.05, 0.1, ...) is expressible per stage.

Stage boundaries count optimiser steps (``unit="steps"``) or training samples seen (``unit="samples"``). The
callback reaches the module through the ``Plastic`` protocol (``set_plasticity_profile``); a table with stages that
cluster or prune also needs the ``StagedLattice`` protocol (``set_clustering_enabled(bool)``,
``prune_connections(sparsity) -> float``), and a module that has it gets every stage's clustering switch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from neat_lightning.choices import check_choice
from neat_lightning.components.plasticity import PROFILES, profile_by_name, with_threshold
from neat_lightning.protocols import Plastic, StagedLattice, require

log = logging.getLogger(__name__)

StageUnit = Literal["steps", "samples"]


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: from ``start`` (steps or samples) on, use ``profile`` (with its spike threshold
    replaced by ``activity_threshold`` when given), cluster or not, and prune the connections to ``sparsity`` (a
    fraction pruned; pruning never grows connections back)."""

    start: int
    profile: str = "learning"
    clustering: bool = False
    sparsity: float = 0.0
    activity_threshold: float | None = None  # None: the profile's own threshold


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage(0, "discovery"),
    Stage(200, "learning"),
    Stage(400, "learning", clustering=True),
    Stage(600, "consolidation", clustering=True, sparsity=0.2),
    Stage(800, "consolidation", clustering=True, sparsity=0.3),
    Stage(1000, "freeze", clustering=True, sparsity=0.7),
)


class PlasticityStages(Callback):
    """Drive a ``Plastic`` module through a table of plasticity stages.

    Args:
        stages: the stage table, sorted by ``start``, the first starting at 0; None for :data:`DEFAULT_STAGES`.
        unit: ``"steps"`` (optimiser steps) or ``"samples"`` (training samples seen, summed over ranks).

    Attributes:
        stage: index of the current stage (-1 before the first batch).
        samples_seen: training samples seen so far (saved in checkpoints).

    Raises:
        ValueError: for an unsorted table, an unknown profile or a bad sparsity.
        TypeError: in ``setup`` if the module is not ``Plastic`` (or, when a stage clusters or prunes, not a
            ``StagedLattice``).

    Example::

        stages = [Stage(0, "discovery"), Stage(100, "learning", clustering=True), Stage(300, "freeze", sparsity=0.5)]
        trainer = L.Trainer(callbacks=[PlasticityStages(stages)])
    """

    def __init__(self, stages: list[Stage] | None = None, unit: StageUnit = "steps") -> None:
        super().__init__()
        stages = list(DEFAULT_STAGES if stages is None else stages)
        if not stages:
            raise ValueError("stages=[]: need at least one stage")
        check_choice("unit", unit, StageUnit)
        if stages[0].start != 0:
            raise ValueError(f"stages[0].start={stages[0].start} must be 0")
        for i, (a, b) in enumerate(zip(stages, stages[1:])):
            if b.start <= a.start:
                raise ValueError(f"stages[{i + 1}].start={b.start} must be > stages[{i}].start={a.start}")
        for i, s in enumerate(stages):
            if s.profile not in PROFILES:
                raise ValueError(f"stages[{i}].profile={s.profile!r} is unknown; known profiles: {list(PROFILES)}")
            if not 0.0 <= s.sparsity < 1.0:
                raise ValueError(f"stages[{i}].sparsity={s.sparsity} must be in [0, 1)")
            if s.activity_threshold is not None and not 0.0 <= s.activity_threshold < 1.0:
                raise ValueError(f"stages[{i}].activity_threshold={s.activity_threshold} must be in [0, 1)")
        self.stages, self.unit = stages, unit
        self.stage = -1
        self.samples_seen = 0
        self.staged = False  # set in setup: the module is a StagedLattice

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, Plastic, self)
        if any(s.clustering or s.sparsity > 0 for s in self.stages):
            try:
                require(pl_module, StagedLattice, self)
            except TypeError as err:
                raise TypeError(f"{err} Its stage table clusters or prunes.") from None
        self.staged = isinstance(pl_module, StagedLattice)

    def position(self, trainer: L.Trainer) -> int:
        return trainer.global_step if self.unit == "steps" else self.samples_seen

    def stage_at(self, position: int) -> int:
        """Index of the stage in force at ``position`` (steps or samples)."""
        return max(i for i, s in enumerate(self.stages) if s.start <= position)

    def apply(self, pl_module: L.LightningModule, index: int) -> None:
        """Put the module in stage ``index``: profile, clustering switch, pruning to the stage's sparsity."""
        s = self.stages[index]
        pl_module.set_plasticity_profile(with_threshold(profile_by_name(s.profile), s.activity_threshold))
        if self.staged:
            pl_module.set_clustering_enabled(s.clustering)
        reached = pl_module.prune_connections(s.sparsity) if s.sparsity > 0 else None
        threshold = s.activity_threshold if s.activity_threshold is not None else "the profile's"
        log.info("plasticity stage %d: profile %s (threshold %s), clustering %s, sparsity %s", index + 1, s.profile,
                 threshold, s.clustering,
                 f"{reached:.3f}" if reached is not None else "unchanged")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        index = self.stage_at(self.position(trainer))
        if index != self.stage:
            self.stage = index
            self.apply(pl_module, index)
        pl_module.log("plasticity/stage", float(self.stage + 1), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples_seen += batch_size_of(batch) * trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict.get("stage", -1))
        self.samples_seen = int(state_dict.get("samples_seen", 0))


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (dicts, tuples and lists are searched)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        n = batch_size_of(item)
        if n:
            return n
    return 0
