"""Running the sleep evaluations and reporting them: jobs over worker processes, summaries, tables, JSON, PNG.

:func:`evaluate` runs every (protocol, seed, arm) of :data:`PROTOCOLS` — ``ab`` and ``tables4``
(:mod:`neat_lightning.eval.sleep_wake`) and ``bytes`` (:mod:`neat_lightning.eval.sleep_bytes`) — optionally in
``workers`` processes (one torch thread each; a run's result does not depend on where it ran), and summarises each
metric as mean ± sample std over seeds, with the paired difference between arms (same seed: same initial weights and
wake batches) and its 95% t interval.

Summary keys: ``<arm>/<metric>`` for ``ab`` (``no_sleep/final_recall_a``, ``sleep/final_recall_b``,
``replay/wall_s``, ``sleep/time_fraction``, ...) and ``<protocol>/<arm>/<metric>`` for the others
(``tables4/sleep/final_recall_a``, ``bytes/replay/bpb_first``, ...); differences under
``[<protocol>/]diff/<arm>-<arm>/<metric>``. Each is ``{"mean", "std"}`` (differences add ``ci95`` and
``per_seed``).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from neat_lightning.eval.sleep_bytes import ContinualConfig, run_bytes_arm
from neat_lightning.eval.sleep_wake import ARMS, LETTERS, RetentionConfig, SleepSettings, run_arm

PROTOCOLS = ("ab", "tables4", "bytes")
PAIRS = (("sleep", "no_sleep"), ("sleep", "replay"), ("replay", "no_sleep"))
# two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def default_config(protocol: str) -> RetentionConfig | ContinualConfig:
    """The measured settings of each protocol."""
    if protocol == "ab":
        return RetentionConfig(tables=2, n_facts=10, table_steps=150)
    if protocol == "tables4":
        return RetentionConfig(tables=4, n_facts=5, table_steps=100)
    if protocol == "bytes":
        return ContinualConfig()
    raise ValueError(f"protocol={protocol!r} must be one of {list(PROTOCOLS)}")


def metrics(protocol: str, cfg: Any) -> tuple[str, ...]:
    """The per-run numbers a protocol summarises (lower is better only for the ``bpb`` ones)."""
    if protocol == "bytes":
        return ("bpb_first", "bpb_first_after_learning", "bpb_second", "forgetting_bpb", "wall_s", "time_fraction")
    letters = LETTERS[:cfg.tables]
    earlier = ("mean_final_recall_earlier",) if cfg.tables > 2 else ()
    return (*(f"final_recall_{n}" for n in letters), *(f"recall_{n}_after_learning" for n in letters[:-1]),
            *earlier, "wall_s", "time_fraction")


# ----------------------------------------------------------------------------------------------------------------------
# statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    return T95[df - 1] if df <= len(T95) else 1.96


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """``a − b`` seed by seed: mean, std, 95% t interval of the mean (None for one seed) and the values."""
    diffs = [x - y for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    n = len(diffs)
    ci = [m - t95(n - 1) * s / math.sqrt(n), m + t95(n - 1) * s / math.sqrt(n)] if n > 1 else None
    return {"mean": m, "std": s, "ci95": ci, "per_seed": diffs}


# ----------------------------------------------------------------------------------------------------------------------
# running


def run_job(protocol: str, cfg: Any, seed: int, arm: str) -> dict[str, Any]:
    """One run (also the worker processes' entry point)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    run = run_bytes_arm(cfg, seed, arm) if protocol == "bytes" else run_arm(cfg, seed, arm)
    if protocol != "bytes":
        earlier = [run[f"final_recall_{n}"] for n in LETTERS[:cfg.tables - 1]]
        run["mean_final_recall_earlier"] = sum(earlier) / len(earlier)
    return {"protocol": protocol, **run}


def describe(run: dict[str, Any]) -> str:
    keys = ("bpb_first", "bpb_second") if run["protocol"] == "bytes" else tuple(
        k for k in run if k.startswith("final_recall_"))
    cells = ", ".join(f"{k} {run[k]:.3f}" for k in keys)
    return f"{run['protocol']:8s} seed {run['seed']} {run['arm']:8s}: {cells} ({run['wall_s']:.0f} s)"


def evaluate(
    protocols: list[str], seeds: list[int], configs: dict[str, Any] | None = None, workers: int = 1, log=print
) -> dict[str, Any]:
    """Every arm of every protocol for every seed; returns the configs, runs and summary."""
    if not seeds:
        raise ValueError("seeds=[] must name at least one seed")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocol={p!r} must be one of {list(PROTOCOLS)}")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    configs = {p: (configs or {}).get(p) or default_config(p) for p in protocols}
    jobs = [(p, configs[p], seed, arm) for p in protocols for seed in seeds for arm in ARMS]
    runs: list[dict[str, Any]] = []
    if workers == 1:
        for job in jobs:
            runs.append(run_job(*job))
            log(describe(runs[-1]))
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for run in pool.map(run_job, *zip(*jobs)):
                runs.append(run)
                log(describe(run))
    return {"protocols": list(protocols), "seeds": list(seeds), "workers": workers,
            "config": {p: as_plain(c) for p, c in configs.items()}, "summary": summarise(runs, configs),
            "runs": runs}


def as_plain(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def prefix(protocol: str) -> str:
    return "" if protocol == "ab" else f"{protocol}/"


def summarise(runs: list[dict[str, Any]], configs: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for protocol, cfg in configs.items():
        mine = [r for r in runs if r["protocol"] == protocol]
        by_arm = {arm: sorted((r for r in mine if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
        for arm, arm_runs in by_arm.items():
            for key in metrics(protocol, cfg):
                if key == "time_fraction" and arm != "sleep":
                    continue
                m, s = mean_std([r[key] for r in arm_runs])
                summary[f"{prefix(protocol)}{arm}/{key}"] = {"mean": m, "std": s}
            summary[f"{prefix(protocol)}{arm}/items_replayed"] = {
                "mean": mean_std([float(r["items_replayed"]) for r in arm_runs])[0], "std": 0.0}
        for a, b in PAIRS:
            for key in metrics(protocol, cfg):
                if key in ("time_fraction",):
                    continue
                summary[f"{prefix(protocol)}diff/{a}-{b}/{key}"] = paired_difference(
                    [r[key] for r in by_arm[a]], [r[key] for r in by_arm[b]])
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# the printed table


def cell(entry: dict[str, Any], digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """One table per protocol (mean ± std over seeds per arm), the paired differences with 95% intervals and the
    sleep arm's share of wall time."""
    s, lines = result["summary"], []
    n = len(result["seeds"])
    for protocol in result["protocols"]:
        cfg = result["config"][protocol]
        pre = prefix(protocol)
        keys = [k for k in metrics_for(protocol, cfg) if k not in ("wall_s", "time_fraction")]
        lines.append(f"[{protocol}] {n} seed{'s' if n > 1 else ''}, mean ± std")
        lines.append(f"{'arm':9s} " + " ".join(f"{k:>24s}" for k in keys) + f" {'wall s':>9s} {'replayed':>9s}")
        for arm in ARMS:
            row = " ".join(f"{cell(s[f'{pre}{arm}/{k}']):>24s}" for k in keys)
            lines.append(f"{arm:9s} {row} {s[f'{pre}{arm}/wall_s']['mean']:9.1f} "
                         f"{s[f'{pre}{arm}/items_replayed']['mean']:9.0f}")
        main = ["bpb_first", "bpb_second"] if protocol == "bytes" else [k for k in keys if k.startswith("final_")]
        for a, b in PAIRS[:2]:
            parts = []
            for k in main:
                d = s[f"{pre}diff/{a}-{b}/{k}"]
                ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
                parts.append(f"{k} {d['mean']:+.3f}{ci}")
            lines.append(f"  {a} - {b} (95% CI): " + "; ".join(parts))
        lines.append(f"  sleep: {s[f'{pre}sleep/time_fraction']['mean']:.1%} of training-step wall time in sleep "
                     "steps (no wake batch computed in them)")
    return "\n".join(lines)


def metrics_for(protocol: str, cfg: dict[str, Any]) -> tuple[str, ...]:
    """:func:`metrics` from a config stored as a plain dict."""
    if protocol == "bytes":
        return metrics(protocol, None)
    return metrics(protocol, RetentionConfig(**{**cfg, "sleep": SleepSettings(**cfg["sleep"])}))


# ----------------------------------------------------------------------------------------------------------------------
# files


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


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """One panel per protocol: recall of each table (or bits per byte of each domain) over wake updates, mean over
    seeds per arm (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    protocols = result["protocols"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.2), squeeze=False)
    colours = {"no_sleep": "tab:blue", "replay": "tab:green", "sleep": "tab:red"}
    styles = ["-", ":", "--", "-."]
    for ax, protocol in zip(axes[0], protocols):
        runs = [r for r in result["runs"] if r["protocol"] == protocol]
        names = ["first", "second"] if protocol == "bytes" else list(LETTERS[:result["config"][protocol]["tables"]])
        key = "bpb_{}" if protocol == "bytes" else "recall_{}"
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm]
            wake = [p["wake"] for p in mine[0]["curve"]]
            for name, style in zip(names, styles):
                values = torch.tensor([[p[key.format(name)] for p in r["curve"]] for r in mine])  # (seeds, points)
                ax.plot(wake, values.mean(0), style, color=colours[arm], lw=1.2,
                        label=f"{arm}: {key.format(name)}")
        for end in runs[0]["phase_ends"][:-1]:
            ax.axvline(next(p["wake"] for p in runs[0]["curve"] if p["step"] == end), color="black", lw=0.6, ls="--")
        ax.set_xlabel("wake updates (dashed: next table / domain)")
        ax.set_ylabel("bits per byte" if protocol == "bytes" else "recall (exact match)")
        ax.set_title(f"{protocol}: {len(result['seeds'])} seed(s), mean")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
