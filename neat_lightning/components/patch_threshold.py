"""Choosing the global entropy threshold: exact calibration to a target mean patch size, and an adaptive EMA
controller that keeps a target boundary ratio on a stream of batches.

BLT's global rule starts a patch at byte ``t`` when ``H_t > θ`` (:func:`~neat_lightning.components.patching.
global_start_mask`). A fixed θ fits one entropy model and one kind of text; users of the reference code ask for θ
calibrated to a target mean patch size (:func:`calibrate_threshold`, by quantile and bisection) and for a θ that
follows a target boundary ratio during training (:class:`AdaptiveEntropyThreshold`). Plain ``torch``, no Lightning.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neat_lightning.components.entropy import check_2d
from neat_lightning.components.patching import PatcherConfig, global_start_mask, split_long_patches


def _count_patches(entropies: torch.Tensor, threshold: float, max_patch_length: int | None) -> int:
    mask = global_start_mask(entropies, threshold)
    if max_patch_length is not None:
        mask = split_long_patches(mask, max_patch_length)
    return int(mask.sum())


def calibrate_threshold(
    entropies: torch.Tensor, target_mean_patch_size: float, max_patch_length: int | None = None
) -> float:
    """The global threshold whose patches on ``entropies`` have mean size ``target_mean_patch_size``.

    The number of patches is ``B`` forced first bytes + the bytes above the threshold (+ splits of long patches),
    so the target count fixes how many entropies must lie above it: the threshold is taken between two neighbouring
    order statistics (a quantile), then, when ``max_patch_length`` adds patches, the number of entropies above it
    is bisected until the count is the closest achievable. Exact up to ties and rounding to whole patches.

    Args:
        entropies: (B, T) or (T,) float entropies, nats (each row's first byte is a forced start).
        target_mean_patch_size: bytes per patch, >= 1.
        max_patch_length: the limit the patcher will apply (adds patches), or None.

    Returns:
        threshold in nats (use with the strict rule ``H > threshold``).

    Raises:
        ValueError: a target below 1 or beyond what the forced starts and ``max_patch_length`` allow.
    """
    if entropies.dim() == 1:
        entropies = entropies[None]
    check_2d("entropies", entropies)
    if not target_mean_patch_size >= 1.0:
        raise ValueError(f"target_mean_patch_size={target_mean_patch_size} must be >= 1 byte")
    entropies = entropies.detach().float()
    b, t = entropies.shape
    n = b * t
    if n == 0:
        raise ValueError("entropies is empty: nothing to calibrate on")
    candidates = torch.sort(entropies[:, 1:].reshape(-1), descending=True).values  # (K,)
    big = float(candidates[0]) + 1.0 if len(candidates) else 1.0

    def theta(k: int) -> float:  # a threshold with exactly the top-k candidates above it (up to ties)
        if len(candidates) == 0:
            return big
        if k <= 0:
            return float(candidates[0])
        if k >= len(candidates):
            return float(candidates[-1]) - 1.0
        return 0.5 * (float(candidates[k - 1]) + float(candidates[k]))

    target_count = n / target_mean_patch_size
    fewest = _count_patches(entropies, theta(0), max_patch_length)
    if n / fewest < target_mean_patch_size * (1 - 1e-9):
        raise ValueError(
            f"target_mean_patch_size={target_mean_patch_size} is unreachable: the largest mean patch size is "
            f"{n / fewest:.4g} bytes ({b} rows of {t} bytes, max_patch_length={max_patch_length})"
        )
    # quantile: without splits, count(k) = B + k
    k_hi = min(max(round(target_count - b), 0), len(candidates))
    if max_patch_length is None:
        return theta(k_hi)
    # bisection: count(k) is non-decreasing in k (a split piece never needs fewer chunks); find the k closest
    lo, hi = 0, k_hi  # count(k_hi) >= B + k_hi ~ target
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_patches(entropies, theta(mid), max_patch_length) >= target_count:
            hi = mid
        else:
            lo = mid + 1
    best = min(
        (k for k in (lo - 1, lo) if 0 <= k <= len(candidates)),
        key=lambda k: abs(_count_patches(entropies, theta(k), max_patch_length) - target_count),
    )
    return theta(best)


class AdaptiveEntropyThreshold:
    """Keeps the boundary ratio (patch starts per byte) of the global rule near a target on a stream of batches.

    Each :meth:`step` patches a batch with the current threshold, observes its boundary ratio ``r``, smooths it
    with an EMA, and moves the threshold multiplicatively (a step on ``log θ``) in proportion to the relative error
    of the smoothed ratio::

        r̄ ← decay · r̄ + (1 − decay) · r          (r̄ = r on the first step)
        log θ ← log θ + gain · clamp(log(r̄ / target), ±max_error)

    Too many boundaries raise θ, too few lower it; in the long run (an integral controller) θ settles on the
    ``1 − target`` quantile of the stream's entropies. :meth:`observe` takes a ratio measured elsewhere (e.g. a
    logged ``patch/mean_size``). The state is plain values (:meth:`state_dict`).

    The loop gain is ``gain · θ · density(θ) / target``: with the defaults it is below 1 for a trained byte LM's
    entropies (spread over several nats), so θ neither lags nor rings. Entropies squeezed into a sliver (an
    untrained model: all near log 260) make it ring; use :func:`calibrate_threshold` there.

    The per-batch ratio still varies with the text of each batch (code vs prose) as it would at any fixed θ; what
    the controller holds is the ratio over a few batches and the stream's mean.

    Args:
        target_boundary_ratio: wanted patches per byte (0.1 = mean patch size 10).
        initial_threshold: θ before the first batch, nats (> 0); by default the patcher's default threshold.
        gain: step size on ``log θ`` per unit of ``log(r̄ / target)``.
        ema_decay: smoothing of the observed ratio, in [0, 1) (0 = none).
        max_error: clamp on ``|log(r̄ / target)|`` per step (an empty or all-boundary batch).
        min_threshold: lower clamp on θ (> 0).
        max_threshold: upper clamp on θ.
        max_patch_length: applied to the masks (its extra starts count in the ratio), or None.
    """

    def __init__(
        self,
        target_boundary_ratio: float = 0.1,
        initial_threshold: float = PatcherConfig.threshold,
        gain: float = 0.2,
        ema_decay: float = 0.3,
        max_error: float = 2.0,
        min_threshold: float = 1e-3,
        max_threshold: float = 50.0,
        max_patch_length: int | None = None,
    ) -> None:
        if not 0.0 < target_boundary_ratio <= 1.0:
            raise ValueError(f"target_boundary_ratio={target_boundary_ratio} must be in (0, 1]")
        if not 0.0 < min_threshold <= initial_threshold <= max_threshold:
            raise ValueError(
                f"need 0 < min_threshold={min_threshold} <= initial_threshold={initial_threshold} "
                f"<= max_threshold={max_threshold}"
            )
        if not gain > 0.0:
            raise ValueError(f"gain={gain} must be > 0")
        if not max_error > 0.0:
            raise ValueError(f"max_error={max_error} must be > 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        if max_patch_length is not None and max_patch_length < 1:
            raise ValueError(f"max_patch_length={max_patch_length} must be >= 1 or None")
        self.target_boundary_ratio = target_boundary_ratio
        self.gain, self.ema_decay = gain, ema_decay
        self.min_threshold, self.max_threshold = min_threshold, max_threshold
        self.max_patch_length = max_patch_length
        self.max_error = max_error
        self.threshold = float(initial_threshold)
        self.ema_ratio: float | None = None
        self.last_ratio: float | None = None
        self.steps = 0

    def observe(self, ratio: float) -> float:
        """Update θ from one batch's observed boundary ratio; returns the new θ."""
        self.last_ratio = float(ratio)
        d = self.ema_decay
        self.ema_ratio = self.last_ratio if self.ema_ratio is None else d * self.ema_ratio + (1 - d) * self.last_ratio
        # log of the relative error: symmetric in over/undershoot, clamped so an empty or all-boundary batch moves
        # log θ by at most gain * max_error
        error = math.log(max(self.ema_ratio, 1e-6) / self.target_boundary_ratio)
        error = min(max(error, -self.max_error), self.max_error)
        log_theta = math.log(self.threshold) + self.gain * error
        self.threshold = min(max(math.exp(log_theta), self.min_threshold), self.max_threshold)
        self.steps += 1
        return self.threshold

    def start_mask(self, entropies: torch.Tensor) -> torch.Tensor:
        """entropies: (B, T) nats -> (B, T) bool start mask at the current θ (no update)."""
        mask = global_start_mask(entropies, self.threshold)
        if self.max_patch_length is not None:
            mask = split_long_patches(mask, self.max_patch_length)
        return mask

    def step(self, entropies: torch.Tensor) -> torch.Tensor:
        """Patch one batch with the current θ, then update θ from its boundary ratio.

        Args:
            entropies: (B, T) float, nats.

        Returns:
            (B, T) bool start mask the batch was patched with.
        """
        check_2d("entropies", entropies)
        mask = self.start_mask(entropies)
        self.observe(float(mask.float().mean()))
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "ema_ratio": self.ema_ratio, "last_ratio": self.last_ratio,
            "steps": self.steps, "target_boundary_ratio": self.target_boundary_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.ema_ratio = state.get("ema_ratio")
        self.last_ratio = state.get("last_ratio")
        self.steps = int(state.get("steps", 0))
        self.target_boundary_ratio = float(state.get("target_boundary_ratio", self.target_boundary_ratio))
