"""The default optimizer every module falls back to when the CLI sets no ``optimizer:``."""

from __future__ import annotations

import math

import lightning as L
import torch

from neat_lightning.components.optim import decay_groups, warmup_cosine


def default_adamw(
    module: L.LightningModule, learning_rate: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float
):
    """AdamW + per-step warm-up/cosine schedule over the trainer's estimated number of optimizer steps."""
    optimizer = torch.optim.AdamW(decay_groups(module, weight_decay), lr=learning_rate, betas=(0.9, 0.95))
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 10_000
    total = int(total) if math.isfinite(total) else 10_000
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
