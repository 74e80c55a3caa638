"""SleepWakeConsolidation: alternate wake phases (training, memory writes) with sleep phases (replay + consolidation).

A *wake* phase is ``wake_steps`` ordinary optimizer steps: the module trains on its data and writes high-surprise
items into its episodic memory. A *sleep* phase is ``sleep_steps`` optimizer steps during which the wake batch's
gradients are dropped (``pause_wake_learning``) and, after each step, the callback

1. reads the memory (:meth:`MemoryConsolidator.memory_snapshot`) and replays up to ``replay_count`` of its items
   into the slow weights with :meth:`MemoryConsolidator.consolidate` — a real gradient-descent step on a
   differentiable consolidation loss (run under ``torch.enable_grad``). The module picks the items (e.g. its most
   important), or with ``sample_replay`` the callback draws them by importance from its own generator;
2. prunes the lowest-importance ``prune_fraction`` of the filled memory slots
   (:meth:`MemoryPrunable.prune_memory`), so the next sleep step replays the most important items again and the
   slots are free for new surprises;

and at the end of the phase calls :meth:`MemoryConsolidator.reset_short_term`. Any module implementing the
protocols works (``MemoryPrunable`` only when ``prune_fraction > 0``); others are refused in ``setup`` with the
protocol's ``TypeError``.

Phases count optimizer steps and are a state machine (phase, step in phase, completed sleeps), checkpointed with
the callback's random generator, so resuming in the middle of a sleep phase continues it exactly. Under DDP every
phase change is agreed through ``trainer.strategy.reduce_boolean_decision`` (as Lightning's EarlyStopping does) and,
since each rank consolidates its own episodic items, rank 0's weights are broadcast after every sleep step so the
replicas stay identical.

Logged (``on_step``): ``sleep/phase`` (1 asleep, 0 awake), ``sleep/consolidation_loss`` and
``sleep/consolidation_loss_after`` (before/after the replay, sleep steps only), ``sleep/items_replayed``,
``sleep/items_pruned``, ``sleep/time_fraction`` (share of training-step wall time spent in sleep steps, their
discarded wake forward/backward included) and ``sleep/consolidation_time_fraction`` (share spent in the callback's
replay, pruning and reset alone).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from neat_lightning.protocols import MemoryConsolidator, MemoryPrunable, require

log = logging.getLogger(__name__)

WAKE, SLEEP = "wake", "sleep"


# ----------------------------------------------------------------------------------------------------------------------
# pure helpers


def snapshot_size(snapshot: dict[str, torch.Tensor]) -> int:
    """Number of items in a memory snapshot (length of ``importance``, else of its first tensor)."""
    if "importance" in snapshot:
        return int(snapshot["importance"].shape[0])
    for value in snapshot.values():
        return int(value.shape[0])
    return 0


def select_replay(
    snapshot: dict[str, torch.Tensor], count: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Draw ``count`` items without replacement, with probability proportional to importance (prioritised replay).

    Args:
        snapshot: item tensors of one length M (``importance`` (M,) >= 0 among them; uniform without it).
        count: items to draw; all M items when ``count >= M``.
        generator: the callback's CPU generator (checkpointed, so a resumed sleep draws the same items).

    Returns:
        the same keys, each indexed by the drawn items (count,).
    """
    m = snapshot_size(snapshot)
    if m <= count:
        return dict(snapshot)
    weights = snapshot["importance"].detach().float().cpu() if "importance" in snapshot else torch.ones(m)
    weights = weights.clamp_min(1e-12)
    index = torch.multinomial(weights, count, replacement=False, generator=generator)  # (count,)
    return {k: v[index.to(v.device)] for k, v in snapshot.items()}


def prune_low_importance(module: object, fraction: float) -> int:
    """Prune the lowest-importance ``fraction`` of a module's memory slots; returns how many were emptied.

    A :class:`MemoryPrunable` module prunes itself (``prune_memory``); anything else, or ``fraction <= 0``, is left
    alone (0).
    """
    if fraction <= 0 or not isinstance(module, MemoryPrunable):
        return 0
    return int(module.prune_memory(fraction))


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and persistent buffers to every rank, in place (no-op outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():  # detached views sharing the parameters' storage
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor, src=src)


# ----------------------------------------------------------------------------------------------------------------------
# the callback


class SleepWakeConsolidation(Callback):
    """Alternate wake and sleep phases; in sleep, replay high-surprise memories into the slow weights.

    Args:
        wake_steps: optimizer steps per wake phase (training as usual, memory writes).
        sleep_steps: optimizer steps per sleep phase (one replay + prune after each).
        consolidation_strength: learning rate of each consolidation step (``lr`` of ``consolidate``).
        consolidation_steps: gradient steps of the consolidation loss per sleep step (``steps`` of ``consolidate``).
        replay_count: items replayed per sleep step (``max_items`` of ``consolidate``).
        sample_replay: draw the replay set here: ``replay_count`` items without replacement, with probability
            proportional to importance, from the callback's own generator, passed as ``consolidate(items=...)``
            (prioritised replay); ``False`` lets the module pick its ``replay_count`` items.
        prune_fraction: share of the filled memory slots, lowest importance first, emptied after each sleep step
            (needs a ``MemoryPrunable`` module when > 0).
        reset_short_term: call ``reset_short_term()`` at the end of every sleep phase.
        pause_wake_learning: drop the wake batch's gradients during sleep steps, so sleep only consolidates
            (``False``: the batch still trains and consolidation follows it).
        early_sleep_items: fall asleep before ``wake_steps`` once any rank's memory snapshot holds this many
            items (memory pressure); ``None`` to follow the schedule only.
        min_wake_steps: with ``early_sleep_items``, the shortest wake phase.
        seed: seed of the callback's own generator (replay draws).

    Attributes:
        phase: ``"wake"`` or ``"sleep"`` — the phase of the next optimizer step.
        phase_step: optimizer steps done in the current phase.
        sleeps: completed sleep phases.
        history: ``(global_step, phase)`` at every phase change (the first step a phase covers).

    Raises:
        ValueError: a non-positive length, strength or replay count, or ``prune_fraction`` outside [0, 1).
        TypeError: at ``setup``, when the module does not implement ``MemoryConsolidator`` (or ``MemoryPrunable``
            with ``prune_fraction > 0``); at a sleep step, when its ``consolidate`` does not take the protocol's
            keyword arguments.

    Example::

        trainer = L.Trainer(callbacks=[SleepWakeConsolidation(wake_steps=200, sleep_steps=20)])
        trainer.fit(NeatModel(), MathDataModule())
    """

    def __init__(
        self,
        wake_steps: int = 200,
        sleep_steps: int = 20,
        consolidation_strength: float = 1e-2,
        consolidation_steps: int = 1,
        replay_count: int = 512,
        sample_replay: bool = False,
        prune_fraction: float = 0.25,
        reset_short_term: bool = True,
        pause_wake_learning: bool = True,
        early_sleep_items: int | None = None,
        min_wake_steps: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("wake_steps", wake_steps), ("sleep_steps", sleep_steps),
                            ("consolidation_steps", consolidation_steps), ("replay_count", replay_count),
                            ("min_wake_steps", min_wake_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SleepWakeConsolidation {name}={value!r} must be an integer >= 1")
        if not consolidation_strength > 0:
            raise ValueError(f"SleepWakeConsolidation consolidation_strength={consolidation_strength} must be > 0")
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"SleepWakeConsolidation prune_fraction={prune_fraction} must be in [0, 1)")
        if early_sleep_items is not None and early_sleep_items < 1:
            raise ValueError(f"SleepWakeConsolidation early_sleep_items={early_sleep_items} must be >= 1 or None")
        self.wake_steps, self.sleep_steps = wake_steps, sleep_steps
        self.consolidation_strength, self.consolidation_steps = consolidation_strength, consolidation_steps
        self.replay_count, self.sample_replay, self.prune_fraction = replay_count, sample_replay, prune_fraction
        self.reset_short_term, self.pause_wake_learning = reset_short_term, pause_wake_learning
        self.early_sleep_items, self.min_wake_steps, self.seed = early_sleep_items, min_wake_steps, seed
        # checkpointed state
        self.phase: Literal["wake", "sleep"] = WAKE
        self.phase_step = 0
        self.sleeps = 0
        self.items_replayed = 0
        self.history: list[tuple[int, str]] = [(0, WAKE)]
        self.generator = torch.Generator().manual_seed(seed)
        self.time_total = 0.0  # seconds of training steps (batch start -> batch end)
        self.time_sleep = 0.0  # of which in sleep steps
        self.time_consolidation = 0.0  # of which in replay, pruning and reset
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

    # -- hooks -----------------------------------------------------------------------------------------------------

    @property
    def asleep(self) -> bool:
        return self.phase == SLEEP

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:  # the first micro-batch of an optimizer step
            self._t0 = time.perf_counter()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.asleep and self.pause_wake_learning:
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are skipped by the optimizer

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_step is not None and trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        was_asleep = self.asleep
        if was_asleep:
            c0 = time.perf_counter()
            stats = self.sleep_step(trainer, pl_module)
            self.phase_step += 1
            if trainer.strategy.reduce_boolean_decision(self.phase_step >= self.sleep_steps, all=False):
                if self.reset_short_term:
                    pl_module.reset_short_term()
                self.enter(WAKE, trainer.global_step)
                self.sleeps += 1
            self.time_consolidation += time.perf_counter() - c0
            for name, value in stats.items():
                pl_module.log(f"sleep/{name}", float(value), on_step=True, on_epoch=False, batch_size=1)
        else:
            self.phase_step += 1
            if trainer.strategy.reduce_boolean_decision(self.wants_sleep(pl_module), all=False):
                self.enter(SLEEP, trainer.global_step)
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        self._t0 = None
        self.time_total += elapsed
        self.time_sleep += elapsed if was_asleep else 0.0
        pl_module.log("sleep/phase", float(was_asleep), on_step=True, on_epoch=False, batch_size=1)
        if self.time_total > 0:
            pl_module.log("sleep/time_fraction", self.time_sleep / self.time_total, on_step=True, on_epoch=False,
                          batch_size=1)
            pl_module.log("sleep/consolidation_time_fraction", self.time_consolidation / self.time_total,
                          on_step=True, on_epoch=False, batch_size=1)

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
        self.history.append((global_step, phase))
        log.info("SleepWakeConsolidation: %s from global step %d", "falling asleep" if phase == SLEEP else "waking up",
                 global_step)

    def sleep_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Replay and consolidate up to ``replay_count`` memory items, then prune; returns what is logged."""
        snapshot = pl_module.memory_snapshot()
        n = snapshot_size(snapshot)
        replayed = min(n, self.replay_count)
        stats: dict[str, float] = {"items_replayed": float(replayed)}
        if n > 0:
            items = select_replay(snapshot, self.replay_count, self.generator) if self.sample_replay else None
            try:
                with torch.enable_grad():
                    result = pl_module.consolidate(steps=self.consolidation_steps, lr=self.consolidation_strength,
                                                   max_items=self.replay_count, items=items)
            except TypeError as err:  # most often a consolidate() whose signature is not the protocol's
                raise TypeError(
                    f"SleepWakeConsolidation: {type(pl_module).__name__}.consolidate(steps=, lr=, max_items=, items=) "
                    f"(the MemoryConsolidator protocol) raised TypeError: {err}"
                ) from err
            for key in ("consolidation_loss", "consolidation_loss_after"):
                if key in result:
                    stats[key] = float(result[key])
        self.items_replayed += replayed
        stats["items_pruned"] = float(prune_low_importance(pl_module, self.prune_fraction))
        broadcast_module_state(pl_module)  # each rank consolidated its own items: keep the replicas identical
        return stats

    # -- checkpointing ---------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "phase_step": self.phase_step,
            "sleeps": self.sleeps,
            "items_replayed": self.items_replayed,
            "history": [list(h) for h in self.history],
            "rng": self.generator.get_state(),
            "time_total": self.time_total,
            "time_sleep": self.time_sleep,
            "time_consolidation": self.time_consolidation,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", WAKE)
        self.phase_step = int(state_dict.get("phase_step", 0))
        self.sleeps = int(state_dict.get("sleeps", 0))
        self.items_replayed = int(state_dict.get("items_replayed", 0))
        self.history = [(int(s), str(p)) for s, p in state_dict.get("history", [(0, WAKE)])]
        if "rng" in state_dict:
            self.generator.set_state(state_dict["rng"])
        self.time_total = float(state_dict.get("time_total", 0.0))
        self.time_sleep = float(state_dict.get("time_sleep", 0.0))
        self.time_consolidation = float(state_dict.get("time_consolidation", 0.0))
