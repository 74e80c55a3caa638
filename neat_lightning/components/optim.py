"""Optimizer helpers in plain torch: AdamW parameter groups and the warm-up/cosine LR multiplier."""

from __future__ import annotations

import math

import torch


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices (dim >= 2) decay, gains and biases do not (nanoGPT's split)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
