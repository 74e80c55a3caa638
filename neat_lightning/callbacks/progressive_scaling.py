"""ProgressiveScaling: grow the lattice between stages, carrying over what was learnt, within a memory budget.

The default schedule grows the lattice 16³ → 20³ → 24³ → 32×32×24 → 40×40×30 → … → 128×128×96 (written ``W×H×D``;
here sizes are ``(D, H, W)``, depth first: :data:`~neat_lightning.components.memory_budget.SIZE_SCHEDULE`), one size
every 1,000 steps. At the first training batch of a stage the module's ``grow(size)`` resamples every per-cell field
(connections and traces trilinearly, the pruning mask and cluster ids by nearest neighbour) and the face-sized
parameters bilinearly, in place; the shared rule and the encoder/decoder are unchanged. This callback then resamples
the optimizer's per-parameter state (AdamW's moments) of the resized parameters the same way (each
:class:`~neat_lightning.protocols.GrownParameter` carries its resampling), so the optimizer continues rather than
restarts. The module records its new size (and lattice steps) as structural state: a checkpoint taken after growth
loads with ``load_from_checkpoint(path)`` alone and a ``ckpt_path`` resume continues exactly.

With ``memory_budget_gb`` set, a growth whose estimated training-step memory (the module's ``estimate_memory``)
exceeds the budget is skipped, and growth stops there for the rest of the run. The lattice never shrinks: a stage
smaller than the current lattice in any dimension is skipped (so the default schedule also suits a base config that
starts larger than 16³).

The module is reached only through the :class:`~neat_lightning.protocols.Growable` protocol (``current_size``,
``estimate_memory``, ``grow``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from neat_lightning.callbacks.plasticity_stages import batch_size_of
from neat_lightning.components.memory_budget import SIZE_SCHEDULE
from neat_lightning.protocols import Growable, GrownParameter, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeStage:
    """From global step ``start`` on, the lattice has ``size`` = [D, H, W]."""

    start: int
    size: tuple[int, int, int]


DEFAULT_SCHEDULE: tuple[SizeStage, ...] = tuple(SizeStage(1000 * i, s) for i, s in enumerate(SIZE_SCHEDULE))


@torch.no_grad()
def resample_optimizer_state(optimizer: torch.optim.Optimizer, resized: dict[str, GrownParameter]) -> int:
    """Resample the per-parameter optimizer state (e.g. AdamW's ``exp_avg``, ``exp_avg_sq``) of parameters whose
    shape changed: every state tensor with the parameter's old shape goes through the parameter's own ``resample``;
    scalars (``step``) are kept. Returns the number of tensors resampled."""
    n = 0
    for grown in resized.values():
        state = optimizer.state.get(grown.parameter)
        if not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and tuple(value.shape) == tuple(grown.old_shape):
                state[key] = grown.resample(value).to(value.dtype)
                n += 1
    return n


class ProgressiveScaling(Callback):
    """Grow a lattice module through a size schedule.

    Args:
        schedule: ``SizeStage(start, size)`` rows sorted by ``start``, the first at 0; None for the ten sizes of
            :data:`~neat_lightning.components.memory_budget.SIZE_SCHEDULE`, one every 1,000 steps
            (:data:`DEFAULT_SCHEDULE`).
        memory_budget_gb: stop growing before a size whose estimated training-step memory exceeds this (GiB);
            None for no limit.

    Attributes:
        stage: index of the stage in force (-1 before the first batch).
        stopped_at: the size refused by the budget, or None.

    Raises:
        ValueError: an unsorted schedule, a first stage not at 0, a non-positive size or budget.
        TypeError: at ``setup``, when the module does not implement the ``Growable`` protocol.

    Example::

        trainer = L.Trainer(callbacks=[ProgressiveScaling([SizeStage(0, (16, 16, 16)), SizeStage(500, (20, 20, 20))])])
    """

    def __init__(self, schedule: list[SizeStage] | None = None, memory_budget_gb: float | None = None) -> None:
        super().__init__()
        schedule = [SizeStage(s.start, tuple(int(x) for x in s.size)) for s in (schedule or DEFAULT_SCHEDULE)]
        if schedule[0].start != 0:
            raise ValueError(f"schedule[0].start={schedule[0].start} must be 0")
        for i, (a, b) in enumerate(zip(schedule, schedule[1:])):
            if b.start <= a.start:
                raise ValueError(f"schedule[{i + 1}].start={b.start} must be > schedule[{i}].start={a.start}")
        for i, s in enumerate(schedule):
            if len(s.size) != 3 or min(s.size) < 1:
                raise ValueError(f"schedule[{i}].size={list(s.size)} must be three positive ints [D, H, W]")
        if memory_budget_gb is not None and memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb={memory_budget_gb} must be > 0")
        self.schedule, self.memory_budget_gb = schedule, memory_budget_gb
        self.stage = -1
        self.stopped_at: tuple[int, int, int] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, Growable, self)

    def stage_at(self, step: int) -> int:
        return max(i for i, s in enumerate(self.schedule) if s.start <= step)

    def estimate(self, trainer: L.Trainer, pl_module: Growable, size: tuple[int, int, int], batch: int = 1) -> int:
        """Estimated training-step bytes of ``pl_module`` grown to ``size``, for batches of ``batch`` samples at the
        trainer's precision."""
        precision = "bf16-mixed" if "bf16" in str(trainer.precision) else "32-true"
        return pl_module.estimate_memory(tuple(size), batch=max(1, batch), precision=precision)

    def grow(self, trainer: L.Trainer, pl_module: Growable, size: tuple[int, int, int]) -> None:
        """Grow the module to ``size`` and resample the optimizers' state of the resized parameters."""
        resized = pl_module.grow(size)
        for opt in trainer.optimizers:
            resample_optimizer_state(opt, resized)
        log.info("ProgressiveScaling: lattice grown to %s", pl_module.current_size())

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        index = self.stage_at(trainer.global_step)
        self.stage = index
        size = self.schedule[index].size
        current = tuple(pl_module.current_size())
        if self.stopped_at is not None or current == size:
            return  # nothing to do (also after a resume: the checkpoint already rebuilt the grown size)
        if any(n < c for n, c in zip(size, current)):
            return  # growth only: a stage smaller than the lattice in any dimension is skipped
        if self.memory_budget_gb is not None:
            need = self.estimate(trainer, pl_module, size, batch_size_of(batch))
            if need > self.memory_budget_gb * 2**30:
                self.stopped_at = size
                log.warning("ProgressiveScaling: %s needs ~%.2f GiB > budget %.2f GiB; growth stops at %s",
                            size, need / 2**30, self.memory_budget_gb, current)
                return
        self.grow(trainer, pl_module, size)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stopped_at": list(self.stopped_at) if self.stopped_at else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict.get("stage", -1))
        stopped = state_dict.get("stopped_at")
        self.stopped_at = tuple(stopped) if stopped else None

