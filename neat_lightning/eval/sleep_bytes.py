"""Continual pretraining of a ByteLM on two text domains: no sleep, plain replay and sleep at equal budgets.

Protocol ``bytes`` (one run per seed and arm, same initial weights and the same wake batches in every arm): a small
:class:`~neat_lightning.modules.byte_lm.ByteLM` trains ``domain_steps`` wake updates on the first built-in corpus
(``pydoc_topics``: the Python documentation's prose), then ``domain_steps`` on a different domain (``stdlib_code``:
the standard library's source). Reported: bits per byte on held-out windows of the first domain after the second
(forgetting), and of each domain right after it was learned. The arms and their budgets are those of
:mod:`neat_lightning.eval.sleep_wake` (same :class:`~neat_lightning.eval.sleep_wake.SleepSettings`).

Held-out windows come from each corpus's validation documents (split by whole document, as
:class:`~neat_lightning.data.bytes.ByteTextDataModule` does), so nothing measured was trained on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from neat_lightning.eval.sleep_wake import (
    ARMS,
    Probe,
    ScheduledBatches,
    SleepSettings,
    arm_stats,
    fit_scheduled,
    phase_ends,
    schedule,
)

BUILTINS = ("pydoc_topics", "stdlib_docs", "stdlib_code")


@dataclass(frozen=True)
class ContinualConfig:
    """Sizes of the ByteLM two-domain protocol (defaults: about a minute per run on one CPU thread)."""

    first: str = "pydoc_topics"  # built-in corpus learned first
    second: str = "stdlib_code"  # then this one
    domain_steps: int = 400  # wake updates per domain
    batch_size: int = 16
    block_size: int = 64
    dim: int = 64
    n_layers: int = 2
    heads: int = 4
    learning_rate: float = 3e-3
    eval_windows: int = 64  # held-out windows per domain for bits per byte
    eval_every: int = 100  # optimizer steps between probes
    sleep: SleepSettings = field(default_factory=lambda: SleepSettings(replay_size=16, capacity=256))

    def __post_init__(self) -> None:
        for name in ("first", "second"):
            if getattr(self, name) not in BUILTINS:
                raise ValueError(f"ContinualConfig.{name}={getattr(self, name)!r} must be one of {list(BUILTINS)}")
        if self.first == self.second:
            raise ValueError(f"ContinualConfig.first and .second are both {self.first!r}: they must differ")
        for name in ("domain_steps", "batch_size", "block_size", "eval_windows", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContinualConfig.{name}={getattr(self, name)} must be >= 1")


@functools.cache
def domain_streams(name: str, block_size: int):
    """(train, validation) id streams of a built-in corpus (built once per process)."""
    from neat_lightning.data.bytes import ByteTextDataModule

    dm = ByteTextDataModule(builtin=name, block_size=block_size, batch_size=1)
    dm.setup()
    return dm.train_stream, dm.val_stream


class DomainBatches:
    """Random training windows of one domain: batch ``k`` is a pure function of ``(seed, domain, k)``."""

    def __init__(self, name: str, block_size: int, batch_size: int, seed: int, index: int) -> None:
        from neat_lightning.data.bytes import RandomWindowBatches

        train, _ = domain_streams(name, block_size)
        self.batches = RandomWindowBatches(train, block_size, batch_size, 1, seed * 1000 + index)

    def batch(self, k: int) -> torch.Tensor:
        return self.batches.batch(k)  # (B, T + 1) int64


def heldout(name: str, block_size: int, n: int) -> torch.Tensor:
    """The first ``n`` held-out windows of a domain, (n, T + 1) (evenly spread over its validation stream)."""
    _, val = domain_streams(name, block_size)
    span = max(1, (len(val) - block_size - 1) // n)
    starts = torch.arange(n) * span
    return val.windows(starts.clamp(max=max(0, len(val) - block_size - 1)), block_size + 1)


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte loss over the non-PAD targets of ``windows``, in bits."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        loss, n = model.loss(windows[i:i + batch_size].to(model.device))
        nats += float(loss) * n
        count += n
    model.train(was_training)
    return nats / max(count, 1) / math.log(2)


def run_bytes_arm(cfg: ContinualConfig, seed: int, arm: str) -> dict[str, Any]:
    """Train one arm through the two domains; returns bits per byte on each domain over time and at the end."""
    from neat_lightning.modules.byte_lm import ByteLM

    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} must be one of {list(ARMS)}")
    torch.set_num_threads(1)
    domains = (cfg.first, cfg.second)
    phases = [DomainBatches(d, cfg.block_size, cfg.batch_size, seed, i) for i, d in enumerate(domains)]
    evals = {"first": heldout(cfg.first, cfg.block_size, cfg.eval_windows),
             "second": heldout(cfg.second, cfg.block_size, cfg.eval_windows)}
    L.seed_everything(seed, verbose=False)
    model = ByteLM(dim=cfg.dim, n_layers=cfg.n_layers, heads=cfg.heads, block_size=cfg.block_size,
                   learning_rate=cfg.learning_rate, warmup_steps=20, min_lr_ratio=1.0, weight_decay=0.0,
                   episodic=cfg.sleep.episodic())
    steps = schedule(2 * cfg.domain_steps, cfg.sleep, arm)
    ends = phase_ends(steps, cfg.domain_steps)
    probe = Probe(lambda m: {f"bpb_{n}": bits_per_byte(m, w) for n, w in evals.items()}, cfg.eval_every, steps,
                  set(ends))
    probe.measure(model, 0)
    sw = cfg.sleep.callback(arm)
    wall = fit_scheduled(model, ScheduledBatches(phases, cfg.domain_steps, steps), [probe] + ([sw] if sw else []))
    by_step = {p["step"]: p for p in probe.points}
    out: dict[str, Any] = {
        "seed": seed, "arm": arm, "curve": probe.points, "wall_s": wall, "steps": len(steps),
        "wake_updates": 2 * cfg.domain_steps, "phase_ends": ends,
        "bpb_first": by_step[len(steps)]["bpb_first"], "bpb_second": by_step[len(steps)]["bpb_second"],
        "bpb_first_after_learning": by_step[ends[0]]["bpb_first"],
    }
    out["forgetting_bpb"] = out["bpb_first"] - out["bpb_first_after_learning"]
    out.update(arm_stats(sw))
    return out
