"""MemoryCleanup: periodic garbage collection, cache release and memory logging during long runs.

Long runs of large models can grow their memory step after step (stale carrier buffers, cached activity fields,
CUDA's caching allocator holding freed blocks). Every ``every_n_steps`` optimiser steps (before the next batch) this
callback

1. runs ``gc.collect()`` (reference cycles holding tensors);
2. calls ``release_memory()`` on every submodule implementing :class:`~neat_lightning.protocols.Releasable`
   (the LightningModule itself included), which drops caches and returns the bytes (or items) freed;
3. empties the CUDA cache when reserved memory exceeds ``cuda_reserved_threshold_gb`` (default 20 GB);
4. logs ``memory/rss_mib`` (process resident set, from ``/proc/self/status``), and on CUDA
   ``memory/cuda_allocated_mib`` / ``memory/cuda_reserved_mib``, plus ``memory/released_mib``.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from neat_lightning.protocols import Releasable

log = logging.getLogger(__name__)
MIB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process in bytes (``VmRSS``; 0 where ``/proc`` is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def releasables(module: torch.nn.Module) -> list[Any]:
    """The module and its submodules that implement ``Releasable`` (each once)."""
    return [m for m in module.modules() if isinstance(m, Releasable)]


class MemoryCleanup(Callback):
    """Free memory every ``every_n_steps`` steps and log how much is in use.

    Args:
        every_n_steps: run the cleanup after every this many optimiser steps.
        cuda_reserved_threshold_gb: empty the CUDA cache when reserved memory exceeds this (GB, 1e9 bytes).
        log_memory: log ``memory/*`` metrics through the LightningModule.

    Attributes:
        cleanups: cleanups run so far.
        released_bytes: total reported by ``release_memory()`` calls.

    Raises:
        ValueError: ``every_n_steps < 1`` or a negative threshold.

    Example::

        trainer = L.Trainer(callbacks=[MemoryCleanup(every_n_steps=10)])
    """

    def __init__(self, every_n_steps: int = 10, cuda_reserved_threshold_gb: float = 20.0,
                 log_memory: bool = True) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"MemoryCleanup every_n_steps={every_n_steps} must be >= 1")
        if cuda_reserved_threshold_gb < 0:
            raise ValueError(f"MemoryCleanup cuda_reserved_threshold_gb={cuda_reserved_threshold_gb} must be >= 0")
        self.every_n_steps = every_n_steps
        self.cuda_reserved_threshold_gb = cuda_reserved_threshold_gb
        self.log_memory = log_memory
        self.cleanups = 0
        self.released_bytes = 0
        self.cuda_cache_emptied = 0

    def cleanup(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Run one cleanup now; returns the memory metrics (MiB)."""
        gc.collect()
        released = sum(int(m.release_memory()) for m in releasables(pl_module))
        self.released_bytes += released
        self.cleanups += 1
        metrics = {"memory/rss_mib": rss_bytes() / MIB, "memory/released_mib": released / MIB}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            reserved = torch.cuda.memory_reserved(pl_module.device)
            if reserved > self.cuda_reserved_threshold_gb * 1e9:
                torch.cuda.empty_cache()
                self.cuda_cache_emptied += 1
                log.info("MemoryCleanup: emptied the CUDA cache (%.1f GB reserved)", reserved / 1e9)
            metrics["memory/cuda_allocated_mib"] = torch.cuda.memory_allocated(pl_module.device) / MIB
            metrics["memory/cuda_reserved_mib"] = torch.cuda.memory_reserved(pl_module.device) / MIB
        return metrics

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # before the batch rather than after it: the module's own on_train_batch_end (which runs after the
        # callbacks') may still read the caches of the step that just ended
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        metrics = self.cleanup(pl_module)
        if self.log_memory:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cleanups": self.cleanups, "released_bytes": self.released_bytes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cleanups = int(state_dict.get("cleanups", 0))
        self.released_bytes = int(state_dict.get("released_bytes", 0))
