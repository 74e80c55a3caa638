"""Retention of facts learned one table after another: no sleep, plain replay and sleep at equal budgets.

Protocols (one run per seed and arm; every arm starts from the same weights and sees the same wake batches):

* ``ab`` — table A (``n_facts`` facts ``key -> digit``, asked as ``Q: cat?\\n#### 7\\n``: no facts in the context,
  the answer must come from the weights) for ``table_steps`` wake updates, then table B (other keys) for as many;
* ``tables4`` — four tables in a row (``tables=4``), recall of every table at the end.

Arms, at the same number of wake updates and the same number of replayed stored windows:

* ``no_sleep`` — training only;
* ``replay`` — :class:`~neat_lightning.callbacks.SleepWakeConsolidation` with ``mode="replay"``: stored windows are
  appended to the wake batches, no sleep phases;
* ``sleep`` — the callback with ``mode="sleep"``: after every ``wake_steps`` wake updates, ``sleep_steps`` sleep
  steps each replay ``replay_size`` stored windows through the whole model (no wake batch is used in them; the
  loader hands them a placeholder). Each table ends with a sleep when ``table_steps`` is a multiple of ``wake_steps``.

Recall of a table is the fraction of its facts whose whole completion ``#### v\\n<eos>`` is the greedy (argmax)
prediction (teacher-forced exact match, as NeatModel's ``val/exact_match``); chance is about 1/10 once the format
is learned. It is probed every ``eval_every`` optimizer steps and at the end of every table.

Everything runs on a CPU (tiny model, one thread per run, one Trainer per run). :mod:`neat_lightning.eval.sleep_bytes`
holds the ByteLM protocol and :mod:`neat_lightning.eval.sleep_report` the statistics, tables and files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.callbacks.sleep_wake import SleepWakeConsolidation
from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, encode
from neat_lightning.data.generators.math import KEYS, rng_for
from neat_lightning.data.loading import batch_generator

ARMS = ("no_sleep", "replay", "sleep")
LETTERS = "abcdefghij"


@dataclass(frozen=True)
class SleepSettings:
    """The replay arms' settings: the SleepWakeConsolidation schedule and the module's episodic buffer."""

    wake_steps: int = 5  # wake updates between sleeps (short cycles measured best; docs/sleep_wake.md)
    sleep_steps: int = 1  # sleep steps per sleep phase
    replay_size: int = 16  # stored windows replayed per sleep step (the replay arm spreads as many over the wake)
    distill_weight: float = 0.0  # LwF distillation toward the pre-sleep model (sleep arm)
    temperature: float = 2.0
    distill_correct_only: bool = False  # distil only where the pre-sleep model is right
    memory_weight: float = 0.0  # Titans slow-memory term in sleep steps (NeatModel)
    adaptive_rate: bool = False
    min_rate: float = 0.125
    prune_fraction: float = 0.0
    capacity: int = 128  # stored windows
    policy: str = "reservoir"  # "reservoir" or "greedy" (components/episodic_buffer.py)
    usage_weight: float = 0.0
    age_weight: float = 0.0
    priority_exponent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("wake_steps", "sleep_steps", "replay_size", "capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"SleepSettings.{name}={getattr(self, name)} must be >= 1")

    def episodic(self):
        from neat_lightning.components.episodic_buffer import EpisodicConfig

        return EpisodicConfig(capacity=self.capacity, policy=self.policy, usage_weight=self.usage_weight,
                              age_weight=self.age_weight, priority_exponent=self.priority_exponent)

    def callback(self, arm: str) -> SleepWakeConsolidation | None:
        """The arm's callback (None for ``no_sleep``)."""
        if arm == "no_sleep":
            return None
        return SleepWakeConsolidation(
            wake_steps=self.wake_steps, sleep_steps=self.sleep_steps, replay_size=self.replay_size,
            mode="replay" if arm == "replay" else "sleep", distill_weight=self.distill_weight,
            temperature=self.temperature, distill_correct_only=self.distill_correct_only, memory_weight=self.memory_weight, adaptive_rate=self.adaptive_rate,
            min_rate=self.min_rate, prune_fraction=self.prune_fraction,
        )


def schedule(wake_updates: int, s: SleepSettings, arm: str) -> list[int | None]:
    """Per optimizer step of an arm: the wake update it makes (0, 1, ...) or None for a sleep step. The sleep arm
    sleeps ``sleep_steps`` steps after every ``wake_steps`` wake updates, the last sleep included."""
    if arm != "sleep":
        return list(range(wake_updates))
    steps: list[int | None] = []
    for w in range(wake_updates):
        steps.append(w)
        if (w + 1) % s.wake_steps == 0:
            steps += [None] * s.sleep_steps
    return steps


@dataclass(frozen=True)
class RetentionConfig:
    """Sizes of the fact-table protocols (defaults: ``ab``, about a minute per run on one CPU thread)."""

    tables: int = 2  # tables learned one after another (2: A -> B; 4: the longer protocol)
    n_facts: int = 10  # facts per table; tables use disjoint keys (tables × n_facts <= 20)
    table_steps: int = 150  # wake updates per table
    eval_every: int = 10  # optimizer steps between recall probes
    batch_size: int = 16
    block_size: int = 64  # 3 questions per row
    # model (NeatModel with Titans memory, no SVF)
    dim: int = 32
    n_layers: int = 1
    heads: int = 2
    window: int = 16
    dim_memory: int = 16
    memory_size: int = 256
    chunk_size: int = 8
    learning_rate: float = 1e-2
    answer_weight: float = 4.0
    sleep: SleepSettings = field(default_factory=SleepSettings)

    def __post_init__(self) -> None:
        if self.tables < 2:
            raise ValueError(f"RetentionConfig.tables={self.tables} must be >= 2")
        if not 1 <= self.n_facts <= len(KEYS) // self.tables:
            raise ValueError(f"RetentionConfig.n_facts={self.n_facts} must be in [1, {len(KEYS) // self.tables}] "
                             f"with tables={self.tables} ({len(KEYS)} keys)")
        for name in ("table_steps", "eval_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetentionConfig.{name}={getattr(self, name)} must be >= 1")
        if self.block_size < 24:
            raise ValueError(f"RetentionConfig.block_size={self.block_size} must be >= 24 (one question per row)")


# ----------------------------------------------------------------------------------------------------------------------
# facts


def fact_tables(seed: int, n_facts: int, tables: int = 2) -> list[dict[str, str]]:
    """``tables`` tables of a seed (disjoint keys, one-digit values)."""
    rng = rng_for("retention-facts", seed)
    keys = rng.sample(KEYS, tables * n_facts)
    values = [str(rng.randint(0, 9)) for _ in keys]
    return [dict(zip(keys[t * n_facts:(t + 1) * n_facts], values[t * n_facts:(t + 1) * n_facts]))
            for t in range(tables)]


def encode_fact(key: str, value: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``BOS Q: key?\\n #### value\\n EOS`` -> ids (N,) and the completion mask (N,) (``#### value\\n EOS``)."""
    prompt, solution = encode(f"Q: {key}?\n"), encode(f"#### {value}\n")
    ids = torch.cat([torch.tensor([BOS_ID]), prompt, solution, torch.tensor([EOS_ID])])
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[1 + len(prompt):] = True
    return ids, mask


def pack(facts: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded facts packed into one row of ``length`` ids (PAD after the last that fits) and its answer ids
    (k on fact k's completion, 1-based)."""
    ids = torch.full((length,), PAD_ID, dtype=torch.long)
    answer = torch.zeros(length, dtype=torch.long)
    pos = 0
    for k, (f_ids, f_mask) in enumerate(facts, start=1):
        if pos + len(f_ids) > length:
            break
        ids[pos:pos + len(f_ids)] = f_ids
        answer[pos:pos + len(f_ids)] = f_mask.long() * k
        pos += len(f_ids)
    return ids, answer


class FactRows:
    """Batches of one table: rows of random questions packed to ``length`` ids (batch ``k`` is a pure function of
    ``(seed, table index, k)``)."""

    def __init__(self, table: dict[str, str], length: int, seed: int, index: int, batch_size: int) -> None:
        self.encoded = [encode_fact(k, v) for k, v in table.items()]
        self.length, self.seed, self.index, self.batch_size = length, seed, index, batch_size
        self.per_row = max(1, length // len(self.encoded[0][0]))

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        g = batch_generator(self.seed, self.index, k)
        pick = torch.randint(len(self.encoded), (self.batch_size, self.per_row), generator=g)  # (B, q)
        rows = [pack([self.encoded[int(i)] for i in row], self.length) for row in pick]
        return {"ids": torch.stack([r[0] for r in rows]), "answer_ids": torch.stack([r[1] for r in rows]),
                "task": torch.zeros(self.batch_size, dtype=torch.long)}


def probe_rows(table: dict[str, str], length: int) -> dict[str, torch.Tensor]:
    """One row per fact: ``Q: key?\\n#### v\\n`` alone (what recall is measured on)."""
    packed = [pack([encode_fact(k, v)], length) for k, v in table.items()]
    return {"ids": torch.stack([p[0] for p in packed]), "answer_ids": torch.stack([p[1] for p in packed]),
            "task": torch.zeros(len(packed), dtype=torch.long)}


class ScheduledBatches(IterableDataset):
    """The batches of one run: optimizer step ``k`` gets the batch of its wake update (phase by phase, ``per_phase``
    wake updates each), or, at a sleep step, a placeholder the sleeping module never reads (no data is made)."""

    def __init__(self, phases: list[Any], per_phase: int, steps: list[int | None]) -> None:
        super().__init__()
        self.phases, self.per_phase, self.steps = phases, per_phase, steps

    def __iter__(self):
        placeholder = None
        for w in self.steps:
            if w is None:
                yield placeholder
                continue
            placeholder = self.phases[w // self.per_phase].batch(w % self.per_phase)
            yield placeholder

    def __len__(self) -> int:
        return len(self.steps)


# ----------------------------------------------------------------------------------------------------------------------
# probing


@torch.no_grad()
def recall(model, rows: dict[str, torch.Tensor]) -> float:
    """Fraction of probe rows whose whole completion is the argmax prediction (teacher-forced exact match)."""
    was_training = model.training
    model.eval()
    out = model.loss_terms({k: v.to(model.device) for k, v in rows.items()})
    targets = rows["ids"][:, 1:].to(model.device)
    ok = (out.logits.argmax(-1) == targets) | (out.seg == 0)  # (N, T)
    model.train(was_training)
    return float(ok.all(dim=1).float().mean())


class Probe(Callback):
    """Measure ``measure(module) -> dict`` every ``every`` optimizer steps and at the given steps."""

    def __init__(self, measure, every: int, steps: list[int | None], marks: set[int]) -> None:
        self.measure_fn, self.every, self.steps, self.marks = measure, every, steps, marks
        self.points: list[dict[str, float]] = []

    def measure(self, pl_module, step: int) -> None:
        wake = sum(w is not None for w in self.steps[:step])
        self.points.append({"step": step, "wake": wake, **self.measure_fn(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step in self.marks:
            self.measure(pl_module, step)


# ----------------------------------------------------------------------------------------------------------------------
# one run


def build_model(cfg: RetentionConfig):
    from neat_lightning.components.titans import TitansConfig
    from neat_lightning.modules.neat import NeatModel

    titans = TitansConfig(dim_memory=cfg.dim_memory, memory_depth=1, chunk_size=cfg.chunk_size, persistent_tokens=4,
                          memory_size=cfg.memory_size, surprise_threshold=0.3)
    return NeatModel(dim=cfg.dim, n_layers=cfg.n_layers, heads=cfg.heads, block_size=cfg.block_size,
                     window=cfg.window, titans=True, titans_config=titans, svf=False, active_components=["titans"],
                     answer_weight=cfg.answer_weight, learning_rate=cfg.learning_rate, warmup_steps=10,
                     min_lr_ratio=1.0, weight_decay=0.0, episodic=cfg.sleep.episodic())


def phase_ends(steps: list[int | None], per_phase: int) -> list[int]:
    """The optimizer step count at the end of each phase (after its closing sleep, if any)."""
    ends, n = [], len(steps)
    for k, w in enumerate(steps):
        if w is not None and (w + 1) % per_phase == 0:
            j = k + 1
            while j < n and steps[j] is None:
                j += 1
            ends.append(j)
    return ends


def fit_scheduled(model, data: ScheduledBatches, callbacks: list[Callback]) -> float:
    """One Trainer over the whole schedule; returns the wall time in seconds."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(data.steps), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, deterministic=True, gradient_clip_val=1.0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    return time.perf_counter() - t0


def arm_stats(sw: SleepWakeConsolidation | None) -> dict[str, Any]:
    if sw is None:
        return {"time_fraction": 0.0, "sleeps": 0, "items_replayed": 0}
    return {"time_fraction": sw.time_sleep / max(sw.time_total, 1e-9), "sleeps": sw.sleeps,
            "items_replayed": sw.items_replayed, "rate": sw.rate,
            "sleep_phases": [[s, e] for (s, p), (e, _) in zip(sw.history, sw.history[1:] + [(None, "end")])
                             if p == "sleep"]}


def run_arm(cfg: RetentionConfig, seed: int, arm: str) -> dict[str, Any]:
    """Train one arm through the tables; returns its recall curve, final recalls, timings and replay counts."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} must be one of {list(ARMS)}")
    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    tables = fact_tables(seed, cfg.n_facts, cfg.tables)
    model = build_model(cfg)
    steps = schedule(cfg.tables * cfg.table_steps, cfg.sleep, arm)
    length = cfg.block_size + 1
    data = ScheduledBatches([FactRows(t, length, seed, i, cfg.batch_size) for i, t in enumerate(tables)],
                            cfg.table_steps, steps)
    probes = {LETTERS[i]: probe_rows(t, length) for i, t in enumerate(tables)}
    ends = phase_ends(steps, cfg.table_steps)
    probe = Probe(lambda m: {f"recall_{n}": recall(m, rows) for n, rows in probes.items()}, cfg.eval_every, steps,
                  set(ends))
    probe.measure(model, 0)
    sw = cfg.sleep.callback(arm)
    wall = fit_scheduled(model, data, [probe] + ([sw] if sw is not None else []))
    by_step = {p["step"]: p for p in probe.points}
    final = by_step[len(steps)]
    out: dict[str, Any] = {"seed": seed, "arm": arm, "curve": probe.points, "wall_s": wall, "steps": len(steps),
                           "wake_updates": cfg.tables * cfg.table_steps, "phase_ends": ends}
    for i in range(cfg.tables):
        n = LETTERS[i]
        out[f"final_recall_{n}"] = final[f"recall_{n}"]
        out[f"recall_{n}_after_learning"] = by_step[ends[i]][f"recall_{n}"]
    out.update(arm_stats(sw))
    return out


def config_with(cfg: Any, **changes: Any) -> Any:
    """``cfg`` (a frozen config) with the given fields replaced; unknown fields raise naming the known ones."""
    known = set(asdict(cfg))
    for name in changes:
        if name not in known:
            raise ValueError(f"{type(cfg).__name__} has no field {name!r}; fields: {sorted(known)}")
    return replace(cfg, **changes)
