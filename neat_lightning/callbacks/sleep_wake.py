"""SleepWakeConsolidation: alternate wake phases with sleep phases that replay stored sequences through the model.

A *wake* phase is ``wake_steps`` ordinary optimizer steps; the module keeps the most surprising training windows in
its episodic buffer. A *sleep* phase is ``sleep_steps`` optimizer steps that do not use the data's batch at all:
before each one the callback plans a sleep step (:meth:`MemoryConsolidator.plan_step` with a
:class:`~neat_lightning.protocols.ReplayPlan`), and the module's training step trains the whole model on
``replay_size`` stored windows drawn by priority, optionally with

* a distillation term toward the pre-sleep model's outputs on those windows (``distill_weight``, LwF-style KL);
* the Titans slow-memory consolidation term (``memory_weight``, NeatModel);
* an adaptive consolidation rate (``adaptive_rate``): a learning-rate multiplier for sleep steps that backs off by
  ``rate_backoff`` after a sleep phase whose replay loss fell by less than ``min_improvement`` (relative, second
  half of the phase against the first) and recovers when it falls again.

A sleep step is an ordinary Lightning optimizer step, so under DDP its gradients are all-reduced like any other and
the replicas stay identical while each rank replays its own buffer. After each sleep step the lowest-keep-score
``prune_fraction`` of the buffer is emptied (:meth:`MemoryPrunable.prune_memory`); the last one of a phase calls
:meth:`MemoryConsolidator.reset_short_term`.

``mode="replay"`` is the baseline at equal budget: no sleep phases; every wake step appends stored windows to the
batch, as many in total after every ``wake_steps`` wake updates as ``mode="sleep"`` replays in one sleep phase
(``sleep_steps × replay_size``, spread evenly; windows owed while the buffer was still empty are made up later).

Phases count optimizer steps and are a state machine (phase, step in phase, completed sleeps, wake updates, rate),
checkpointed, so resuming in the middle of a sleep phase continues it exactly. Under DDP every phase change is agreed
through ``trainer.strategy.reduce_boolean_decision`` (as Lightning's EarlyStopping does).

Logged (``on_step``): ``sleep/phase`` (1 asleep, 0 awake), ``sleep/replay_loss`` (mean loss of the replayed windows
before the update), ``sleep/replayed``, ``sleep/stored``, ``sleep/distill_loss`` and ``sleep/memory_loss`` (when
on), ``sleep/rate``, ``sleep/pruned`` and ``sleep/time_fraction`` (share of training-step wall time spent in sleep
steps).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from neat_lightning.choices import check_choice
from neat_lightning.protocols import MemoryConsolidator, MemoryPrunable, ReplayPlan, require

log = logging.getLogger(__name__)

WAKE, SLEEP = "wake", "sleep"
SleepMode = Literal["sleep", "replay"]


# ----------------------------------------------------------------------------------------------------------------------
# pure helpers


def snapshot_size(snapshot: dict[str, torch.Tensor]) -> int:
    """Number of entries in a memory snapshot (length of ``importance``, else of its first tensor)."""
    if "importance" in snapshot:
        return int(snapshot["importance"].shape[0])
    for value in snapshot.values():
        return int(value.shape[0])
    return 0


def prune_low_importance(module: object, fraction: float) -> int:
    """Prune the lowest-keep-score ``fraction`` of a module's episodic store; returns how many entries went.

    A :class:`MemoryPrunable` module prunes itself (``prune_memory``); anything else, or ``fraction <= 0``, is left
    alone (0).
    """
    if fraction <= 0 or not isinstance(module, MemoryPrunable):
        return 0
    return int(module.prune_memory(fraction))


def replay_owed(updates: int, per_phase: int, wake_steps: int, replayed: int) -> int:
    """Stored windows to append to the next wake batch in ``mode="replay"``: ``per_phase`` windows per
    ``wake_steps`` wake updates, spread evenly (exact integer arithmetic) and owed until replayed (a step that found
    the buffer empty is made up later), so after ``updates + 1`` updates ``(updates + 1) · per_phase // wake_steps``
    windows have been replayed in all."""
    return max(0, (updates + 1) * per_phase // wake_steps - replayed)


def adapted_rate(rate: float, losses: list[float], backoff: float, min_rate: float, min_improvement: float) -> float:
    """The next sleep phase's rate from this phase's replay losses (one per sleep step, in order): backed off
    (``rate × backoff``, not below ``min_rate``) when the mean of the second half fell by less than
    ``min_improvement`` relative to the mean of the first half, else recovered (``rate / backoff``, at most 1).
    Unchanged with fewer than two finite losses."""
    values = [v for v in losses if math.isfinite(v)]
    if len(values) < 2:
        return rate
    h = len(values) // 2
    first, last = sum(values[:h]) / h, sum(values[-h:]) / h
    fell = 1.0 - last / first if first > 0 else 0.0
    if fell < min_improvement:
        return max(min_rate, rate * backoff)
    return min(1.0, rate / backoff)


# ----------------------------------------------------------------------------------------------------------------------
# the callback


class SleepWakeConsolidation(Callback):
    """Alternate wake and sleep phases; in sleep, replay stored sequences through the whole model.

    Args:
        wake_steps: optimizer steps per wake phase.
        sleep_steps: optimizer steps per sleep phase (each replays ``replay_size`` stored windows, no wake batch).
        replay_size: stored windows replayed per sleep step (per rank).
        mode: ``"sleep"``, or ``"replay"``: no sleep phases, the same number of stored windows appended to the
            wake batches instead (plain experience replay at equal budget).
        distill_weight: weight of the KL divergence to the pre-sleep model's outputs on the replayed windows.
        temperature: softmax temperature of that distillation.
        distill_correct_only: distil only the positions the pre-sleep model predicted right (its argmax is the
            target): what it knows is kept, what it has forgotten is left to the replay loss.
        memory_weight: weight of the Titans slow-memory consolidation term in sleep steps (modules with a memory).
        memory_items: most important memory items per memory block in that term.
        adaptive_rate: adapt the sleep steps' learning-rate multiplier to the replay loss (see the module doc; needs
            ``sleep_steps >= 2``).
        rate_backoff: factor in (0, 1) by which the rate backs off (and 1 / factor by which it recovers).
        min_rate: the lowest rate.
        min_improvement: relative fall of the replay loss within a sleep phase below which the rate backs off.
        prune_fraction: share of the stored windows, lowest keep score first, emptied after each sleep step (needs a
            ``MemoryPrunable`` module when > 0).
        reset_short_term: call ``reset_short_term()`` at the end of every sleep phase.
        early_sleep_items: fall asleep before ``wake_steps`` once any rank's buffer holds this many windows (memory
            pressure); ``None`` to follow the schedule only.
        min_wake_steps: with ``early_sleep_items``, the shortest wake phase.

    Attributes:
        phase: ``"wake"`` or ``"sleep"`` — the phase of the next optimizer step.
        phase_step: optimizer steps done in the current phase.
        sleeps: completed sleep phases.
        wake_updates: wake optimizer steps done.
        items_replayed: stored windows replayed on this rank (in sleep, or appended to wake batches).
        rate: the sleep steps' learning-rate multiplier.
        history: ``(global_step, phase)`` at every phase change (the first step a phase covers).

    Raises:
        ValueError: a non-positive length or replay size, a negative weight, an unknown ``mode``, ``rate_backoff``
            outside (0, 1), ``min_rate`` outside (0, 1], ``adaptive_rate`` with fewer than 2 sleep steps or
            ``prune_fraction`` outside [0, 1).
        TypeError: at ``setup``, when the module does not implement ``MemoryConsolidator`` (or ``MemoryPrunable``
            with ``prune_fraction > 0``); at the first step, when its ``plan_step`` does not take ``plan=``.

    Example::

        trainer = L.Trainer(callbacks=[SleepWakeConsolidation(wake_steps=200, sleep_steps=20, replay_size=32)])
        trainer.fit(ByteLM(), ByteTextDataModule())
    """

    def __init__(
        self,
        wake_steps: int = 200,
        sleep_steps: int = 20,
        replay_size: int = 32,
        mode: SleepMode = "sleep",
        distill_weight: float = 0.0,
        temperature: float = 2.0,
        distill_correct_only: bool = False,
        memory_weight: float = 0.0,
        memory_items: int = 512,
        adaptive_rate: bool = False,
        rate_backoff: float = 0.5,
        min_rate: float = 0.125,
        min_improvement: float = 0.02,
        prune_fraction: float = 0.0,
        reset_short_term: bool = True,
        early_sleep_items: int | None = None,
        min_wake_steps: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (("wake_steps", wake_steps), ("sleep_steps", sleep_steps), ("replay_size", replay_size),
                            ("memory_items", memory_items), ("min_wake_steps", min_wake_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SleepWakeConsolidation {name}={value!r} must be an integer >= 1")
        check_choice("SleepWakeConsolidation mode", mode, SleepMode)
        for name, value in (("distill_weight", distill_weight), ("memory_weight", memory_weight)):
            if not value >= 0:
                raise ValueError(f"SleepWakeConsolidation {name}={value} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"SleepWakeConsolidation temperature={temperature} must be > 0")
        if not 0.0 < rate_backoff < 1.0:
            raise ValueError(f"SleepWakeConsolidation rate_backoff={rate_backoff} must be in (0, 1)")
        if not 0.0 < min_rate <= 1.0:
            raise ValueError(f"SleepWakeConsolidation min_rate={min_rate} must be in (0, 1]")
        if adaptive_rate and sleep_steps < 2:
            raise ValueError(f"SleepWakeConsolidation adaptive_rate=True needs sleep_steps >= 2, got {sleep_steps} "
                             "(the rate compares the two halves of each sleep phase)")
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"SleepWakeConsolidation prune_fraction={prune_fraction} must be in [0, 1)")
        if early_sleep_items is not None and early_sleep_items < 1:
            raise ValueError(f"SleepWakeConsolidation early_sleep_items={early_sleep_items} must be >= 1 or None")
        self.wake_steps, self.sleep_steps, self.replay_size, self.mode = wake_steps, sleep_steps, replay_size, mode
        self.distill_weight, self.temperature, self.distill_correct_only = distill_weight, temperature, distill_correct_only
        self.memory_weight, self.memory_items = memory_weight, memory_items
        self.adaptive_rate, self.rate_backoff, self.min_rate = adaptive_rate, rate_backoff, min_rate
        self.min_improvement, self.prune_fraction, self.reset_short_term = min_improvement, prune_fraction, reset_short_term
        self.early_sleep_items, self.min_wake_steps = early_sleep_items, min_wake_steps
        # checkpointed state
        self.phase: Literal["wake", "sleep"] = WAKE
        self.phase_step = 0
        self.sleeps = 0
        self.wake_updates = 0
        self.items_replayed = 0
        self.rate = 1.0
        self.phase_losses: list[float] = []  # replay loss of each sleep step of the current phase (rank mean)
        self.history: list[tuple[int, str]] = [(0, WAKE)]
        self.time_total = 0.0  # seconds of training steps (batch start -> batch end)
        self.time_sleep = 0.0  # of which in sleep steps
        # per-run bookkeeping (not checkpointed)
        self._last_step: int | None = None
        self._t0: float | None = None

    # -- setup -----------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, MemoryConsolidator, self)
        if self.prune_fraction > 0:
            require(pl_module, MemoryPrunable, self)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if self.history == [(0, WAKE)] and trainer.global_step > 0:  # attached to a run already under way
            self.history = [(trainer.global_step, WAKE)]

    @property
    def asleep(self) -> bool:
        return self.phase == SLEEP

    # -- the plan of each step -------------------------------------------------------------------------------------

    def plan(self) -> ReplayPlan:
        """What the next optimizer step does."""
        if self.asleep:
            return ReplayPlan(sleep=True, replay=self.replay_size, distill_weight=self.distill_weight,
                              temperature=self.temperature, distill_correct_only=self.distill_correct_only,
                              memory_weight=self.memory_weight,
                              memory_items=self.memory_items, rate=self.rate, phase_step=self.phase_step)
        if self.mode == "replay":
            return ReplayPlan(replay=replay_owed(self.wake_updates, self.sleep_steps * self.replay_size,
                                                 self.wake_steps, self.items_replayed))
        return ReplayPlan()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:  # the first micro-batch of an optimizer step
            self._t0 = time.perf_counter()
        try:
            pl_module.plan_step(plan=self.plan())
        except TypeError as err:  # most often a plan_step() whose signature is not the protocol's
            raise TypeError(
                f"SleepWakeConsolidation: {type(pl_module).__name__}.plan_step(plan=ReplayPlan(...)) (the "
                f"MemoryConsolidator protocol) raised TypeError: {err}"
            ) from err

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_step is not None and trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        stats = pl_module.replay_stats()
        was_asleep = self.asleep
        self.items_replayed += int(stats.get("replayed", 0))
        if was_asleep:
            stats["rate"] = self.rate
            self.phase_losses.append(self.rank_mean(trainer, pl_module, stats.get("replay_loss", math.nan)))
            stats["pruned"] = float(prune_low_importance(pl_module, self.prune_fraction))
            self.phase_step += 1
            if trainer.strategy.reduce_boolean_decision(self.phase_step >= self.sleep_steps, all=False):
                if self.adaptive_rate:
                    self.rate = adapted_rate(self.rate, self.phase_losses, self.rate_backoff, self.min_rate,
                                             self.min_improvement)
                if self.reset_short_term:
                    pl_module.reset_short_term()
                self.enter(WAKE, trainer.global_step)
                self.sleeps += 1
        else:
            self.phase_step += 1
            self.wake_updates += 1
            if self.mode == "sleep" and trainer.strategy.reduce_boolean_decision(self.wants_sleep(pl_module), all=False):
                # a sleep needs something stored on every rank
                if trainer.strategy.reduce_boolean_decision(snapshot_size(pl_module.memory_snapshot()) > 0, all=True):
                    self.enter(SLEEP, trainer.global_step)
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        self._t0 = None
        self.time_total += elapsed
        self.time_sleep += elapsed if was_asleep else 0.0
        if was_asleep or stats.get("replayed", 0) > 0:
            for name, value in stats.items():
                if math.isfinite(float(value)):
                    pl_module.log(f"sleep/{name}", float(value), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("sleep/phase", float(was_asleep), on_step=True, on_epoch=False, batch_size=1)
        if self.time_total > 0:
            pl_module.log("sleep/time_fraction", self.time_sleep / self.time_total, on_step=True, on_epoch=False,
                          batch_size=1)

    @staticmethod
    def rank_mean(trainer: L.Trainer, pl_module: L.LightningModule, value: float) -> float:
        """``value`` averaged over ranks (itself on one process)."""
        if trainer.world_size == 1:
            return float(value)
        return float(trainer.strategy.reduce(torch.tensor(float(value), device=pl_module.device), reduce_op="mean"))

    # -- the state machine -----------------------------------------------------------------------------------------

    def wants_sleep(self, pl_module: L.LightningModule) -> bool:
        """This rank's vote to fall asleep before the next step (schedule or memory pressure)."""
        if self.phase_step >= self.wake_steps:
            return True
        if self.early_sleep_items is not None and self.phase_step >= self.min_wake_steps:
            return snapshot_size(pl_module.memory_snapshot()) >= self.early_sleep_items
        return False

    def enter(self, phase: Literal["wake", "sleep"], global_step: int) -> None:
        """Switch phase; ``global_step`` is the first optimizer step the new phase covers."""
        self.phase, self.phase_step = phase, 0
        self.phase_losses = []
        self.history.append((global_step, phase))
        log.info("SleepWakeConsolidation: %s from global step %d", "falling asleep" if phase == SLEEP else "waking up",
                 global_step)

    # -- checkpointing ---------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "phase_step": self.phase_step,
            "sleeps": self.sleeps,
            "wake_updates": self.wake_updates,
            "items_replayed": self.items_replayed,
            "rate": self.rate,
            "phase_losses": list(self.phase_losses),
            "history": [list(h) for h in self.history],
            "time_total": self.time_total,
            "time_sleep": self.time_sleep,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", WAKE)
        self.phase_step = int(state_dict.get("phase_step", 0))
        self.sleeps = int(state_dict.get("sleeps", 0))
        self.wake_updates = int(state_dict.get("wake_updates", 0))
        self.items_replayed = int(state_dict.get("items_replayed", 0))
        self.rate = float(state_dict.get("rate", 1.0))
        self.phase_losses = [float(v) for v in state_dict.get("phase_losses", [])]
        self.history = [(int(s), str(p)) for s, p in state_dict.get("history", [(0, WAKE)])]
        self.time_total = float(state_dict.get("time_total", 0.0))
        self.time_sleep = float(state_dict.get("time_sleep", 0.0))
