"""ConsolidationMixin: the ``MemoryConsolidator`` and ``MemoryPrunable`` protocols for any byte LightningModule.

A module mixes this in before :class:`~neat_lightning.modules.base.ResumableModule`, builds its buffer with
:meth:`ConsolidationMixin.init_consolidation` and implements :meth:`~ConsolidationMixin.replay_terms` (a batch of
stored rows -> loss, per-window loss, logits). Its ``training_step`` starts with :meth:`~ConsolidationMixin.take_plan`:

* no plan: an ordinary step, nothing stored (the module's own code path, unchanged);
* a sleep plan: ``return self.sleep_step(plan)`` — the data's batch is not used at all; a prioritised draw of stored
  windows goes through the whole model (plus the distillation and memory terms the plan asks for) and that loss is
  the step's loss, so Lightning's backward, DDP all-reduce, gradient clipping and optimizer step apply as to any
  step;
* a wake plan: :meth:`~ConsolidationMixin.wake_rows` appends ``plan.replay`` stored windows to the batch (plain
  experience replay when > 0) and :meth:`~ConsolidationMixin.remember` offers the batch's own windows to the buffer.

The plan's ``rate`` multiplies every learning rate for that one optimizer step (:meth:`optimizer_step`). The
distillation teacher is a copy of the parameters taken at the first step of a sleep phase; its logits come from
``torch.func.functional_call`` of the module's ``forward``.

Checkpoints carry the buffer under ``"neat_episodic"`` (every rank's, gathered when a checkpoint is written; each
rank reloads its own when the world size is the same, else rank 0's) and the teacher under ``"neat_sleep_teacher"``
while a sleep phase is under way, so a run resumed mid-sleep continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from torch.func import functional_call

from neat_lightning.components.episodic_buffer import EpisodicBuffer, EpisodicConfig, distillation_loss
from neat_lightning.data.loading import batch_generator
from neat_lightning.protocols import ReplayPlan

EPISODIC_KEY = "neat_episodic"
TEACHER_KEY = "neat_sleep_teacher"
DRAW, ADMIT = 1, 2  # purposes of the buffer's generators


class ReplayTerms(NamedTuple):
    """One batch of rows through a module (:meth:`ConsolidationMixin.replay_terms`)."""

    loss: torch.Tensor  # () the module's training loss of the batch
    row_loss: torch.Tensor  # (B,) per-window loss, nats (the same weighting as ``loss``)
    logits: torch.Tensor  # (B, T, V)
    mask: torch.Tensor  # (B, T) bool, the positions that count
    inputs: torch.Tensor  # (B, T) ids: ``forward(inputs, **forward_kwargs)`` gives ``logits`` again
    targets: torch.Tensor  # (B, T) next ids
    forward_kwargs: dict[str, Any]
    surprise: torch.Tensor | None = None  # (B,) Titans surprise per window, where the module has a memory
    output: Any = None  # the module's own full output, for its logging


def episodic_config(value: Any) -> EpisodicConfig:
    """``value`` as an :class:`EpisodicConfig` (checkpoints store it as a plain dict)."""
    if isinstance(value, dict):
        value = EpisodicConfig(**value)
    if not isinstance(value, EpisodicConfig):
        raise TypeError(f"episodic must be an EpisodicConfig, got {type(value).__name__}")
    return value


def gather_ranks(module, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``state`` (same keys and shapes on every rank), as a list by rank (collective under DDP)."""
    gathered = {}
    for k, v in state.items():
        g = module.all_gather(v.to(torch.uint8) if v.dtype == torch.bool else v)  # (W, ...)
        gathered[k] = g.bool() if v.dtype == torch.bool else g
    world = next(iter(gathered.values())).shape[0]
    return [{k: v[r].cpu() for k, v in gathered.items()} for r in range(world)]


class ConsolidationMixin:
    """``MemoryConsolidator`` + ``MemoryPrunable`` over an :class:`EpisodicBuffer` of training windows."""

    episodic: EpisodicBuffer

    def init_consolidation(self, config: EpisodicConfig) -> None:
        self.episodic = EpisodicBuffer(config)
        self._plan: ReplayPlan | None = None
        self._stats: dict[str, float] = {}
        self._teacher: dict[str, torch.Tensor] | None = None
        self._draw_at: tuple[int, int] = (-1, 0)  # (step, draws made at that step)

    # -- what a module provides -----------------------------------------------------------------------------------

    def replay_terms(self, rows: dict[str, torch.Tensor]) -> ReplayTerms:
        """Stored-row batch (``batch_rows``' layout) -> loss terms."""
        raise NotImplementedError

    def batch_rows(self, batch: Any) -> dict[str, torch.Tensor]:
        """A training batch as named per-row tensors (what the buffer stores)."""
        return {"ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)

    def sleep_memory_loss(self, plan: ReplayPlan) -> torch.Tensor | None:
        """The slow-memory consolidation term of a sleep step, where the module has a memory (else None)."""
        return None

    def prune_short_term(self, fraction: float) -> int:
        return 0

    def forget_short_term(self) -> None:
        pass

    # -- the protocols --------------------------------------------------------------------------------------------

    def plan_step(self, plan: ReplayPlan) -> None:
        """Set what the next training step does (``MemoryConsolidator``)."""
        if not isinstance(plan, ReplayPlan):
            raise TypeError(f"{type(self).__name__}.plan_step expects a ReplayPlan, got {type(plan).__name__}")
        self._plan = plan
        if not plan.sleep:
            self._teacher = None  # awake: the pre-sleep teacher of the last phase is done

    def take_plan(self) -> ReplayPlan | None:
        """The plan of this training step (it applies to one step)."""
        plan, self._plan = self._plan, None
        return plan

    def replay_stats(self) -> dict[str, float]:
        """What the last planned step measured (``MemoryConsolidator``)."""
        return dict(self._stats)

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        """Stored windows: ``importance``, ``priority``, ``age``, ``replays`` and ``slot``, each (M,)."""
        return self.episodic.snapshot(self.current_step())

    def prune_memory(self, fraction: float) -> int:
        """Empty the lowest-keep-score ``fraction`` of the stored windows (and of any short-term memory items);
        returns how many windows (plus items) were emptied (``MemoryPrunable``)."""
        return self.episodic.prune(fraction, self.current_step()) + self.prune_short_term(fraction)

    def reset_short_term(self) -> None:
        """Drop the distillation teacher and any short-term memory items; stored windows stay."""
        self._teacher = None
        self.forget_short_term()

    # -- steps ----------------------------------------------------------------------------------------------------

    def current_step(self) -> int:
        return int(self.trainer.global_step) if self._trainer is not None else 0

    def generator(self, purpose: int) -> torch.Generator:
        """A CPU generator of (seed, purpose, step, rank, k-th draw at this step): a resumed run draws the same."""
        step = self.current_step()
        at, k = self._draw_at
        k = k + 1 if at == step else 0
        self._draw_at = (step, k)
        return batch_generator(self.episodic.config.seed, purpose, step, self.global_rank, k)

    def draw(self, n: int) -> torch.Tensor:
        if self.episodic.device != self.device:
            self.episodic.to(self.device)
        return self.episodic.draw(n, self.generator(DRAW)) if n > 0 else torch.empty(0, dtype=torch.long)

    def wake_rows(self, batch: Any, plan: ReplayPlan) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The batch's rows with ``plan.replay`` stored windows appended, and the slots replayed (n,)."""
        rows = self.batch_rows(batch)
        slots = self.draw(plan.replay) if len(self.episodic) else torch.empty(0, dtype=torch.long)
        if len(slots):
            stored = self.episodic.gather(slots)
            if set(stored) != set(rows):
                raise ValueError(f"stored windows have fields {sorted(stored)}, the batch {sorted(rows)}")
            rows = {k: torch.cat([v, stored[k].to(v.dtype)]) for k, v in rows.items()}
        return rows, slots

    @torch.no_grad()
    def remember(self, rows: dict[str, torch.Tensor], terms: ReplayTerms, slots: torch.Tensor) -> None:
        """After a wake step: count the replayed ``slots`` (the last rows) and offer the batch's own rows."""
        n = next(iter(rows.values())).shape[0] - len(slots)
        replay_loss = math.nan
        if len(slots):
            self.episodic.replayed(slots, terms.row_loss[n:])
            replay_loss = float(terms.row_loss[n:].mean())
        use_titans = self.episodic.config.surprise == "titans" and terms.surprise is not None
        surprise = terms.surprise if use_titans else terms.row_loss
        written = self.episodic.write({k: v[:n] for k, v in rows.items()}, surprise[:n].detach(), self.current_step(),
                                      self.generator(ADMIT), loss=terms.row_loss[:n])
        self._stats = {"replay_loss": replay_loss, "replayed": float(len(slots)), "written": float(written),
                       "stored": float(len(self.episodic))}

    def sleep_step(self, plan: ReplayPlan) -> torch.Tensor:
        """One sleep step's loss: ``plan.replay`` stored windows drawn by priority through the whole model, plus
        ``distill_weight`` × the KL to the pre-sleep model and ``memory_weight`` × the slow-memory term."""
        if plan.distill_weight > 0 and (plan.phase_step == 0 or self._teacher is None):
            self._teacher = {k: p.detach().clone() for k, p in self.named_parameters()}
        if len(self.episodic) == 0:
            raise RuntimeError(f"{type(self).__name__}: a sleep step was planned but the episodic buffer is empty "
                               "(nothing was stored during wake)")
        slots = self.draw(plan.replay)
        terms = self.replay_terms(self.episodic.gather(slots))
        loss = terms.loss
        stats = {"replay_loss": float(terms.row_loss.detach().mean()), "replayed": float(len(slots)),
                 "written": 0.0, "stored": float(len(self.episodic))}
        if plan.distill_weight > 0:
            teacher = {k: v.to(self.device) for k, v in self._teacher.items()}
            self._teacher = teacher
            with torch.no_grad():
                target = functional_call(self, teacher, (terms.inputs,), terms.forward_kwargs)
            mask = terms.mask
            if plan.distill_correct_only:  # keep what the pre-sleep model knows, not its mistakes
                mask = mask & (target.argmax(-1) == terms.targets)
            kd = distillation_loss(terms.logits, target, mask, plan.temperature)
            loss = loss + plan.distill_weight * kd
            stats["distill_loss"] = float(kd.detach())
        if plan.memory_weight > 0:
            memory = self.sleep_memory_loss(plan)
            if memory is not None:
                loss = loss + plan.memory_weight * memory
                stats["memory_loss"] = float(memory.detach())
        self.episodic.replayed(slots, terms.row_loss)
        self._stats = stats
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's optimizer step; a sleep plan's ``rate`` scales every learning rate for this step only."""
        plan = self._plan  # still set: the closure (training_step) runs inside the step
        rate = plan.rate if plan is not None and plan.sleep else 1.0
        if rate == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * rate
        try:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = self.episodic.state_dict() if self.episodic.rows else None
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and self.trainer.strategy.reduce_boolean_decision(state is not None, all=True):
            ranks = gather_ranks(self, state)  # every rank takes part; rank 0 writes them all
        else:
            ranks = [{k: v.cpu() for k, v in state.items()}] if state is not None else []
            world = 1
        if ranks:
            checkpoint[EPISODIC_KEY] = {"world_size": world, "ranks": ranks}
        if self._teacher is not None:
            checkpoint[TEACHER_KEY] = {k: v.cpu() for k, v in self._teacher.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(EPISODIC_KEY)
        self.episodic = EpisodicBuffer(self.episodic.config)
        if saved:
            same_world = self._trainer is not None and self.trainer.world_size == saved["world_size"]
            self.episodic.load_state_dict(saved["ranks"][self.global_rank if same_world else 0])
        teacher = checkpoint.get(TEACHER_KEY)
        self._teacher = {k: v.clone() for k, v in teacher.items()} if teacher is not None else None


def store_config(module, config: EpisodicConfig) -> None:
    """Write the group into ``hparams`` as a plain dict (checkpoints load with ``weights_only``)."""
    module.hparams["episodic"] = asdict(config)
