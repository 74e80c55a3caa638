"""Memory budget of one LatticeNetwork training step (NCA mode): an analytic estimate, and the largest lattice of a
growth schedule that fits a budget.

The estimate counts, in bytes, what one training step (forward, backward, plasticity, optimizer) keeps alive at its
peak, per cell ``N = D·H·W`` and batch element ``B``:

- **runtime**: the Python interpreter with torch imported (a constant, measured: ~0.3 GiB RSS on CPU, 0 on GPU);
- **per-cell buffers**: connections (26 floats), pruning mask (26 bools), cluster ids (int64), STDP trace and BCM
  threshold (float each), plus during the step the effective connections, the message operator's weights and the
  plasticity update's temporaries (~4 more ``(N, 26)`` float fields);
- **stencils**: ``stencil="sparse"`` stores CSR index/value buffers (~3.5 kB per cell); ``"shift"`` stores none.
  Building them takes about as much again, once, before any activation exists: the estimate is the larger of that
  build peak and the step's peak (at 96×128×128 with T = 3 the build is the larger);
- **saved activations** per lattice step and cell·batch: the perception (``6C``), the MLP's hidden pre- and
  post-activation (``2h``), the firing mask (1) — 4 bytes each in fp32; under ``bf16-mixed`` the MLP's saved
  tensors are bf16 (2 bytes). Without checkpointing all ``T`` steps are kept; with ``checkpoint_every=k`` only the
  state every ``k`` steps (``C`` floats) plus one recomputed segment of ``k`` steps;
- **transients** of one step's forward/backward (stencils ``4C``, gradients of the perception ``6C`` and the state);
- **activity history** for plasticity: ``T`` fields of ``N`` floats;
- parameters, gradients and two AdamW moments (``4 ×`` the parameter bytes; face-sized parameters grow with
  ``H·W``).

``benchmarks/lattice_scale.py`` compares the estimate with measured peaks (RSS on CPU, ``max_memory_allocated`` on
GPU). Sparse connection storage is not modelled: at 70 % pruning it would save ~60 bytes per cell (< 1 % of a
training step's peak), which is why the connections stay dense (see docs/lattice_scale.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from neat_lightning.choices import check_choice

GIB = 2**30

# the default growth schedule of ProgressiveScaling: ten sizes from 16³ to 96×128×128, (D, H, W) with depth first
SIZE_SCHEDULE: tuple[tuple[int, int, int], ...] = (
    (16, 16, 16),
    (20, 20, 20),
    (24, 24, 24),
    (24, 32, 32),
    (30, 40, 40),
    (36, 48, 48),
    (48, 64, 64),
    (60, 80, 80),
    (72, 96, 96),
    (96, 128, 128),
)

Precision = Literal["32-true", "bf16-mixed"]
Stencil = Literal["sparse", "shift"]


@dataclass(frozen=True)
class MemoryConfig:
    """What the peak memory of one training step depends on."""

    size: tuple[int, int, int] = (16, 16, 16)  # (D, H, W)
    channels: int = 16  # C
    hidden: int = 64  # width of the rule's MLP
    steps: int | None = None  # T lattice steps; None: depth - 1
    batch: int = 1  # B
    precision: Precision = "32-true"
    checkpoint_every: int = 0  # 0: no activation checkpointing
    stencil: Stencil = "sparse"
    sparsity: float = 0.0  # fraction of connections pruned (dense storage: does not change the estimate)
    encoder_dim: int = 64
    decoder_dim: int = 128
    decoder_layers: int = 2
    runtime_bytes: int = int(0.30 * GIB)  # interpreter + torch (CPU RSS); set 0 for GPU memory

    def __post_init__(self) -> None:
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size={self.size} must be three positive ints (D, H, W)")
        for name in ("channels", "hidden", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 0")
        check_choice("precision", self.precision, Precision)
        check_choice("stencil", self.stencil, Stencil)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} must be in [0, 1)")

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, self.size[0] - 1)


def estimate_memory(config: MemoryConfig) -> int:
    """Estimated peak bytes of one training step (see the module docstring for what is counted)."""
    D, H, W = config.size
    N, B, C, h, T = D * H * W, config.batch, config.channels, config.hidden, config.n_steps
    act = 2 if config.precision == "bf16-mixed" else 4  # bytes of the MLP's saved tensors
    # per-cell buffers: connections 26·4 + mask 26 + cluster ids 8 + trace, theta 2·4, and ~4 (N, 26) float
    # temporaries while the step runs (effective connections, message weights, plasticity deltas)
    buffers = N * (26 * 4 + 26 + 8 + 8 + 4 * 26 * 4)
    stencils = N * 3_500 if config.stencil == "sparse" else 0  # CSR buffers, kept for the module's lifetime
    per_step = N * B * (6 * C * act + 2 * h * act + 4)  # saved activations of one lattice step
    state = N * B * C * 4
    if config.checkpoint_every > 0:
        k = min(config.checkpoint_every, T)
        saved = math.ceil(T / k) * state + k * per_step
    else:
        saved = T * per_step
    transient = N * B * (4 * C + 6 * C + 2 * C) * 4 + N * B * 2 * h * 4  # one step's stencils, grads, MLP
    history = T * N * 4  # batch-mean activity of every step, for plasticity
    E = config.decoder_dim
    params = (
        260 * config.encoder_dim * 2 + 16 * config.encoder_dim**2  # encoder embed/out + block
        + config.decoder_layers * 16 * E**2 + 2 * 260 * E  # decoder layers, embed, head
        + H * W * (C + E)  # face-sized parameters (cell bias, cell positions)
        + (6 * C + 1) * h + (h + 1) * C  # the rule
    ) * 4
    face = B * H * W * (E + C) * 4 * (2 + 2 * config.decoder_layers)  # decoder memory, cross-attention keys/values
    # building the CSR buffers needs about as much again, before the first step: the peak is the larger of the two
    build = 2 * stencils + 4 * params
    step = buffers + stencils + saved + transient + history + 4 * params + face
    return int(config.runtime_bytes + max(build, step))


def largest_lattice_within(
    budget_bytes: int, config: MemoryConfig | None = None,
    sizes: tuple[tuple[int, int, int], ...] = SIZE_SCHEDULE, step_margin: int = 0,
) -> tuple[int, int, int] | None:
    """The largest size of ``sizes`` (in order) whose training step fits ``budget_bytes``, or None if none does.

    Args:
        budget_bytes: the memory budget.
        config: everything but the size (channels, precision, checkpointing...); steps follow each size as
            ``depth - 1 + step_margin`` unless ``config.steps`` is set.
        sizes: candidate sizes, smallest first.
        step_margin: lattice steps beyond ``depth - 1``.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes} must be > 0")
    config = config or MemoryConfig()
    best = None
    for size in sizes:  # over a handful of candidate sizes
        steps = config.steps if config.steps is not None else size[0] - 1 + step_margin
        if estimate_memory(replace(config, size=tuple(size), steps=max(1, steps))) > budget_bytes:
            break
        best = tuple(size)
    return best
