"""Retention after interference, with and without :class:`~neat_lightning.callbacks.SleepWakeConsolidation`.

Protocol (one run per seed and arm, both arms with identical model init, data and number of *wake* updates):

1. **learn** — ``learn_steps`` wake updates on table A: ``n_facts`` facts ``key -> digit`` asked as
   ``Q: cat?\\n#### 7\\n`` (no facts in the context: the answer must come from the weights, slow memory included);
2. **interfere** — ``interfere_steps`` wake updates on table B: the same format over ``n_facts`` other keys;
3. **test** — every ``eval_every`` optimizer steps, recall of A (and B) is measured: a fact counts when the whole
   completion ``#### v\\n<eos>`` is the greedy (argmax) prediction (teacher-forced exact match, as NeatModel's
   ``val/exact_match``). Chance is about 1/10 per fact once the format is learned.

The sleep arm adds the callback: after every ``wake_steps`` wake updates, ``sleep_steps`` sleep steps replay the
memory's high-surprise items into the slow memory weights (the wake batches of those steps are discarded, so the
arms see the same number of wake updates; the sleep arm just runs ``sleep_steps`` more optimizer steps per cycle).
Each phase ends with a sleep when ``learn_steps`` is a multiple of ``wake_steps`` — A is consolidated before B.

Everything here runs on a CPU in a few minutes (tiny model, one thread); no Lightning logger, no files except the
ones :func:`write_json` / :func:`plot_retention` are asked to write (atomically).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.callbacks.sleep_wake import SleepWakeConsolidation
from neat_lightning.data.generators.math import KEYS, Problem, pack_problems, rng_for

ARMS = ("no_sleep", "sleep")


@dataclass(frozen=True)
class RetentionConfig:
    """Sizes and schedules of the retention evaluation (defaults: ~1 min per run on one CPU thread)."""

    # tasks
    n_facts: int = 10  # facts per table; A and B use disjoint keys (2 * n_facts <= 20)
    learn_steps: int = 150  # wake updates on table A
    interfere_steps: int = 150  # wake updates on table B
    eval_every: int = 10  # optimizer steps between recall probes
    batch_size: int = 16
    block_size: int = 64  # 3 questions per row
    # model (NeatModel with Titans memory, no SVF)
    dim: int = 32
    n_layers: int = 1
    heads: int = 2
    window: int = 16
    dim_memory: int = 16
    memory_depth: int = 1  # linear associative memory: consolidation is a least-squares fit of the items
    memory_size: int = 256
    chunk_size: int = 8
    surprise_threshold: float = 0.3
    learning_rate: float = 1e-2
    answer_weight: float = 4.0
    # sleep arm
    wake_steps: int = 25
    sleep_steps: int = 5
    consolidation_strength: float = 0.1
    consolidation_steps: int = 2
    replay_count: int = 256
    prune_fraction: float = 0.25
    reset_short_term: bool = True  # False keeps table A's items in the buffer, replayed again in later sleeps

    def __post_init__(self) -> None:
        if not 1 <= self.n_facts <= len(KEYS) // 2:
            raise ValueError(f"RetentionConfig.n_facts={self.n_facts} must be in [1, {len(KEYS) // 2}]")
        for name in ("learn_steps", "interfere_steps", "eval_every", "batch_size", "wake_steps", "sleep_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetentionConfig.{name}={getattr(self, name)} must be >= 1")
        if self.block_size < 24:
            raise ValueError(f"RetentionConfig.block_size={self.block_size} must be >= 24 (one question per row)")


# ----------------------------------------------------------------------------------------------------------------------
# facts


def fact_tables(seed: int, n_facts: int) -> tuple[dict[str, str], dict[str, str]]:
    """Tables A and B (disjoint keys, one-digit values) of a seed."""
    rng = rng_for("retention-facts", seed)
    keys = rng.sample(KEYS, 2 * n_facts)
    values = [str(rng.randint(0, 9)) for _ in keys]
    table = dict(zip(keys, values))
    return {k: table[k] for k in keys[:n_facts]}, {k: table[k] for k in keys[n_facts:]}


def question(key: str, value: str) -> Problem:
    return Problem("fact_recall", 1, f"Q: {key}?\n", f"#### {value}\n", value)


def fact_rows(table: dict[str, str], length: int, seed: int, tag: str, k: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Batch ``k`` of a table: rows of random questions packed to ``length`` ids (a pure function of its keys)."""
    keys = list(table)
    rows, answers = [], []
    for r in range(batch_size):
        rng = rng_for("retention-rows", seed, tag, k, r)
        problems = [question(key, table[key]) for key in (rng.choice(keys) for _ in range(max(1, length // 16)))]
        ids, ans, _ = pack_problems(problems, length)
        rows.append(ids)
        answers.append(ans)
    ids = torch.stack(rows)
    return {"ids": ids, "answer_ids": torch.stack(answers), "task": torch.zeros(len(ids), dtype=torch.long)}


def probe_rows(table: dict[str, str], length: int) -> dict[str, torch.Tensor]:
    """One row per fact: ``Q: key?\\n#### v\\n`` alone (what recall is measured on)."""
    packed = [pack_problems([question(k, v)], length) for k, v in table.items()]
    ids = torch.stack([p[0] for p in packed])
    return {"ids": ids, "answer_ids": torch.stack([p[1] for p in packed]),
            "task": torch.zeros(len(ids), dtype=torch.long)}


class FactBatches(IterableDataset):
    """Endless batches of one table; the iterator starts at the trainer's global step (resumable)."""

    def __init__(self, table: dict[str, str], length: int, seed: int, tag: str, batch_size: int) -> None:
        super().__init__()
        self.table, self.length, self.seed, self.tag, self.batch_size = table, length, seed, tag, batch_size
        self.start = 0

    def __iter__(self):
        k = self.start
        while True:
            yield fact_rows(self.table, self.length, self.seed, self.tag, k, self.batch_size)
            k += 1


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


class RecallProbe(Callback):
    """Measure recall of tables A and B every ``every`` optimizer steps (steps counted across the phases)."""

    def __init__(self, probes: dict[str, dict[str, torch.Tensor]], every: int) -> None:
        self.probes, self.every = probes, every
        self.offset = 0  # optimizer steps of earlier phases
        self.points: list[dict[str, float]] = []

    def measure(self, pl_module, step: int) -> None:
        point = {"step": step}
        point.update({f"recall_{name}": recall(pl_module, rows) for name, rows in self.probes.items()})
        self.points.append(point)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.offset + trainer.global_step
        if step % self.every == 0:
            self.measure(pl_module, step)


# ----------------------------------------------------------------------------------------------------------------------
# one run


def build_model(cfg: RetentionConfig):
    from neat_lightning.components.titans import TitansConfig
    from neat_lightning.modules.neat import NeatModel

    titans = TitansConfig(dim_memory=cfg.dim_memory, memory_depth=cfg.memory_depth, chunk_size=cfg.chunk_size,
                          persistent_tokens=4, memory_size=cfg.memory_size, surprise_threshold=cfg.surprise_threshold)
    return NeatModel(dim=cfg.dim, n_layers=cfg.n_layers, heads=cfg.heads, block_size=cfg.block_size,
                     window=cfg.window, titans=True, titans_config=titans, svf=False, active_components=["titans"],
                     answer_weight=cfg.answer_weight, learning_rate=cfg.learning_rate, warmup_steps=10,
                     min_lr_ratio=1.0, weight_decay=0.0)


def optimizer_steps(wake: int, cfg: RetentionConfig, sleep: bool) -> int:
    """Optimizer steps that give ``wake`` wake updates (sleep arm: plus the sleeps, the last one included)."""
    return wake + (cfg.sleep_steps * (wake // cfg.wake_steps) if sleep else 0)


def run_arm(cfg: RetentionConfig, seed: int, sleep: bool) -> dict[str, Any]:
    """Train one arm through the two phases; returns its recall curve, sleep phases and timings."""
    L.seed_everything(seed, verbose=False)
    table_a, table_b = fact_tables(seed, cfg.n_facts)
    model = build_model(cfg)
    probe = RecallProbe({"a": probe_rows(table_a, cfg.block_size + 1), "b": probe_rows(table_b, cfg.block_size + 1)},
                        cfg.eval_every)
    sw = SleepWakeConsolidation(
        wake_steps=cfg.wake_steps, sleep_steps=cfg.sleep_steps, consolidation_strength=cfg.consolidation_strength,
        consolidation_steps=cfg.consolidation_steps, replay_count=cfg.replay_count,
        prune_fraction=cfg.prune_fraction, reset_short_term=cfg.reset_short_term, seed=seed,
    ) if sleep else None
    probe.measure(model, 0)
    phases, sleeps, t0 = [], [], time.perf_counter()
    for tag, table, wake in (("learn", table_a, cfg.learn_steps), ("interfere", table_b, cfg.interfere_steps)):
        steps = optimizer_steps(wake, cfg, sleep)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[probe] + ([sw] if sw is not None else []), deterministic=True, gradient_clip_val=1.0,
        )
        data = DataLoader(FactBatches(table, cfg.block_size + 1, seed, tag, cfg.batch_size), batch_size=None)
        if sw is not None:
            sw.history = [(0, sw.phase)]
        trainer.fit(model, train_dataloaders=data)
        if probe.points[-1]["step"] != probe.offset + steps:  # every phase ends with a probe
            probe.measure(model, probe.offset + steps)
        if sw is not None:  # sleep phases in global steps across the run
            marks = sw.history + [(steps, "end")]
            sleeps += [[probe.offset + s, probe.offset + e] for (s, p), (e, _) in zip(marks, marks[1:]) if p == "sleep"]
        phases.append({"phase": tag, "start": probe.offset, "end": probe.offset + steps, "wake_updates": wake})
        probe.offset += steps
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "seed": seed, "arm": "sleep" if sleep else "no_sleep", "curve": probe.points, "phases": phases,
        "sleep_phases": sleeps, "wall_s": wall,
        "final_recall_a": probe.points[-1]["recall_a"], "final_recall_b": probe.points[-1]["recall_b"],
        "recall_a_after_learning": next(p["recall_a"] for p in probe.points if p["step"] == phases[0]["end"]),
    }
    if sw is not None:
        out.update(time_fraction=sw.time_sleep / max(sw.time_total, 1e-9),
                   consolidation_time_fraction=sw.time_consolidation / max(sw.time_total, 1e-9),
                   sleeps=sw.sleeps, items_replayed=sw.items_replayed)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the evaluation


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def evaluate_retention(cfg: RetentionConfig, seeds: list[int], log=print) -> dict[str, Any]:
    """Both arms for every seed; returns the runs and a summary (mean ± std over seeds, the gap)."""
    if not seeds:
        raise ValueError("seeds=[] must name at least one seed")
    runs = []
    for seed in seeds:
        for arm in ARMS:
            run = run_arm(cfg, seed, arm == "sleep")
            runs.append(run)
            log(f"seed {seed} {arm:8s}: recall A after learning {run['recall_a_after_learning']:.2f}, after "
                f"interference {run['final_recall_a']:.2f}; recall B {run['final_recall_b']:.2f} ({run['wall_s']:.0f} s)")
    summary: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        for key in ("recall_a_after_learning", "final_recall_a", "final_recall_b", "wall_s"):
            m, s = mean_std([r[key] for r in mine])
            summary[f"{arm}/{key}"] = {"mean": m, "std": s}
    sleep_runs = [r for r in runs if r["arm"] == "sleep"]
    for key in ("time_fraction", "consolidation_time_fraction"):
        m, s = mean_std([r[key] for r in sleep_runs])
        summary[f"sleep/{key}"] = {"mean": m, "std": s}
    gaps = [s["final_recall_a"] - n["final_recall_a"] for s, n in
            zip(sleep_runs, [r for r in runs if r["arm"] == "no_sleep"])]
    m, s = mean_std(gaps)
    summary["gap_final_recall_a"] = {"mean": m, "std": s, "per_seed": gaps}
    summary["sleep_better_on_every_seed"] = all(g > 0 for g in gaps)
    return {"config": asdict(cfg), "seeds": list(seeds), "summary": summary, "runs": runs}


def format_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"{'arm':10s} {'recall A (learned)':>20s} {'recall A (after B)':>20s} {'recall B':>16s} {'wall s':>8s}"]
    for arm in ARMS:
        cells = [f"{s[f'{arm}/{k}']['mean']:.3f} ± {s[f'{arm}/{k}']['std']:.3f}"
                 for k in ("recall_a_after_learning", "final_recall_a", "final_recall_b")]
        lines.append(f"{arm:10s} {cells[0]:>20s} {cells[1]:>20s} {cells[2]:>16s} {s[f'{arm}/wall_s']['mean']:8.1f}")
    g = s["gap_final_recall_a"]
    lines.append(f"gap (sleep - no_sleep) in recall A after interference: {g['mean']:+.3f} ± {g['std']:.3f} "
                 f"(per seed {', '.join(f'{x:+.2f}' for x in g['per_seed'])})")
    lines.append(f"sleep overhead: {s['sleep/time_fraction']['mean']:.1%} of training-step wall time in sleep steps, "
                 f"{s['sleep/consolidation_time_fraction']['mean']:.1%} in replay/prune/reset")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# outputs


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plot_retention(result: dict[str, Any], path: str | Path) -> Path:
    """Recall of A and B over optimizer steps, mean ± std over seeds per arm, sleep phases shaded (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {"no_sleep": "tab:blue", "sleep": "tab:red"}
    for arm in ARMS:
        runs = [r for r in result["runs"] if r["arm"] == arm]
        steps = [p["step"] for p in runs[0]["curve"]]
        for table, style in (("a", "-"), ("b", ":")):
            values = torch.tensor([[p[f"recall_{table}"] for p in r["curve"]] for r in runs])  # (seeds, points)
            mean = values.mean(0)
            std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean, style, color=colours[arm], label=f"{arm}: recall {table.upper()}")
            if table == "a":
                ax.fill_between(steps, mean - std, mean + std, color=colours[arm], alpha=0.15)
    sleep_run = next(r for r in result["runs"] if r["arm"] == "sleep")
    for i, (start, end) in enumerate(sleep_run["sleep_phases"]):
        ax.axvspan(start, end, color="grey", alpha=0.2, label="sleep (sleep arm)" if i == 0 else None)
    for phase in sleep_run["phases"][1:]:
        ax.axvline(phase["start"], color="black", lw=0.8, ls="--")
    no_sleep = next(r for r in result["runs"] if r["arm"] == "no_sleep")
    ax.axvline(no_sleep["phases"][1]["start"], color="tab:blue", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step (dashed: table A -> table B; the sleep arm runs its sleeps on top)")
    ax.set_ylabel("recall (exact match)")
    ax.set_ylim(-0.02, 1.02)
    n = len(result["seeds"])
    ax.set_title(f"Retention of table A while training on table B ({n} seed{'s' if n > 1 else ''}, mean ± std)")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def config_with(cfg: RetentionConfig, **changes: Any) -> RetentionConfig:
    """``cfg`` with the given fields replaced (unknown fields raise)."""
    known = set(asdict(cfg))
    for name in changes:
        if name not in known:
            raise ValueError(f"RetentionConfig has no field {name!r}; fields: {sorted(known)}")
    return replace(cfg, **changes)
