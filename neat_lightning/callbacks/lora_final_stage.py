"""LoRAFinalStage: the last phase of pretraining ("initiation") trains low-rank adapters, then merges them.

At a configured point of ``fit`` the callback freezes every base weight, injects LoRA adapters
(:mod:`neat_lightning.components.lora`) into the layers whose names match ``targets``, swaps the trainer's optimizer
for an AdamW over the adapters only (its own learning rate and warm-up/cosine schedule over the stage), and — when
the DataModule is a :class:`~neat_lightning.data.SceneDataModule` with a ``pretrain`` DataModule — switches the
training batches to the dialogue-scene corpus at the same step. When ``fit`` ends it merges the adapters into the
base weights (``at_end="merge"``: plain architecture again) or keeps them separate (``at_end="keep"``).

Checkpoints and resume:
  * the injected structure is recorded with ``module.record_structure("lora", ...)`` (the ``StructureRecorder``
    protocol, which ``ResumableModule`` implements), so
    ``Module.load_from_checkpoint(path)`` alone rebuilds the adapters; a copy is also written under
    ``checkpoint["lora"]`` for other LightningModules, which call
    :func:`~neat_lightning.components.lora.restore_from_checkpoint` in their ``on_load_checkpoint``;
  * on ``--ckpt_path`` resume Lightning calls, in order: ``setup`` -> module ``on_load_checkpoint`` (adapters
    re-injected) and ``load_state_dict`` -> this callback's ``load_state_dict`` -> ``strategy.setup`` (the module's
    own ``configure_optimizers``) -> ``on_fit_start`` (here the adapter optimizer replaces it) -> optimizer and
    scheduler states loaded from the checkpoint into the adapter optimizer. The resumed run therefore equals the
    uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from typing_extensions import override

from neat_lightning.choices import check_choice
from neat_lightning.components.lora import (
    CHECKPOINT_KEY,
    DEFAULT_TARGETS,
    adapter_parameters,
    freeze_base,
    inject_lora,
    lora_layers,
    lora_report,
    lora_state,
    merge_lora,
    rank_for_budget,
    target_names,
)
from neat_lightning.components.optim import warmup_cosine
from neat_lightning.protocols import DataSwitchable, StructureRecorder, missing_methods

log = logging.getLogger(__name__)

StartUnit = Literal["fraction", "step", "epoch"]
AtEnd = Literal["merge", "keep"]


class LoRAFinalStage(Callback):
    """Train LoRA adapters (base frozen) for the last part of ``fit``, optionally on the scene corpus, then merge.

    Args:
        start: where the stage begins, in ``start_unit``: a fraction of ``Trainer(max_steps)`` (in (0, 1)), an
            optimizer step, or an epoch (the stage starts with that epoch's first batch).
        start_unit: ``"fraction"``, ``"step"`` or ``"epoch"``.
        targets: regex searched in the module's qualified layer names; matching ``nn.Linear`` layers get adapters.
            The default picks attention ``qkv`` / ``proj`` of every block (``lora.MLP_TARGETS`` adds the MLP).
        r: adapter rank; ``None`` picks the largest rank whose adapters stay within ``max_adapter_fraction`` of the
            model's parameters (at least 1).
        max_adapter_fraction: the parameter budget used when ``r`` is ``None``.
        alpha: LoRA scale numerator (the update is scaled by ``alpha / r``); ``None`` -> ``2 * r``.
        dropout: dropout on the adapters' input.
        learning_rate: peak AdamW learning rate of the adapters.
        weight_decay: AdamW weight decay of the adapters.
        warmup_steps: linear warm-up at the start of the stage.
        min_lr_ratio: the learning rate decays (cosine) to ``min_lr_ratio * learning_rate`` at ``max_steps``;
            ``1.0`` keeps it constant. Without ``max_steps`` it stays at the peak after warm-up.
        switch_data: switch the training data to the scene corpus when the stage begins. ``None``: when the
            DataModule can (the ``DataSwitchable`` protocol, as ``SceneDataModule``); ``True``: require it.
        at_end: ``"merge"`` folds the adapters into the base weights when ``fit`` ends and restores plain layers;
            ``"keep"`` leaves the adapters separate and unmerged. Either way the base's ``requires_grad`` is restored.
        seed: seed of the adapters' initialisation (independent of the global RNG).

    Attributes:
        active: the stage is running (adapters injected, base frozen, adapter optimizer in use).
        done: the stage has ended (merged or kept).
        began_at: the global step at which the stage began (``None`` before).

    Raises:
        ValueError: a bad ``start`` / ``start_unit`` / ``at_end``, or ``start_unit="fraction"`` without
            ``Trainer(max_steps)``; ``targets`` matching no linear layer (at ``setup``).
        TypeError: ``switch_data=True`` with a DataModule that cannot switch (at ``setup``).

    Example::

        trainer = L.Trainer(max_steps=1000, callbacks=[LoRAFinalStage(start=0.9)])
        trainer.fit(ByteLM(), datamodule=SceneDataModule(pretrain=ByteTextDataModule()))
    """

    def __init__(
        self,
        start: float = 0.9,
        start_unit: StartUnit = "fraction",
        targets: str = DEFAULT_TARGETS,
        r: int | None = None,
        max_adapter_fraction: float = 0.01,
        alpha: float | None = None,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        switch_data: bool | None = None,
        at_end: AtEnd = "merge",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("start_unit", start_unit, StartUnit)
        if start_unit == "fraction" and not 0.0 < start < 1.0:
            raise ValueError(f"start={start} must be in (0, 1) with start_unit='fraction'")
        if start_unit != "fraction" and (start < 0 or start != int(start)):
            raise ValueError(f"start={start} must be a whole number >= 0 with start_unit={start_unit!r}")
        check_choice("at_end", at_end, AtEnd)
        if r is not None and r < 1:
            raise ValueError(f"r={r} must be >= 1 or None")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} must be > 0")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        self.start, self.start_unit, self.targets = start, start_unit, targets
        self.r, self.max_adapter_fraction, self.alpha, self.dropout = r, max_adapter_fraction, alpha, dropout
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.switch_data, self.at_end, self.seed = switch_data, at_end, seed
        # state (checkpointed)
        self.active = False
        self.done = False
        self.began_at: int | None = None
        self.frozen: list[str] = []
        self.rank: int | None = None
        self._start_step: int | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def state_key(self) -> str:
        # one stage per run: the key does not depend on the settings, so a resume with another `start` keeps state
        return type(self).__name__

    # -- setup -----------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ValueError(
                f"{type(self).__name__} swaps parameters and the optimizer mid-run, which a multi-process strategy "
                f"(world_size={trainer.world_size}) does not see: run the stage on one device"
            )
        if not lora_layers(pl_module):
            target_names(pl_module, self.targets)  # fail now, naming the layers, rather than at the stage start
        if self.start_unit == "fraction":
            if trainer.max_steps is None or trainer.max_steps <= 0:
                raise ValueError(
                    f"{type(self).__name__}(start={self.start}, start_unit='fraction') needs Trainer(max_steps) > 0; "
                    f"got max_steps={trainer.max_steps}"
                )
            self._start_step = int(round(self.start * trainer.max_steps))
        elif self.start_unit == "step":
            self._start_step = int(self.start)
        if self._start_step is not None and trainer.max_steps and 0 < trainer.max_steps <= self._start_step:
            rank_zero_warn(f"{type(self).__name__}: the stage starts at step {self._start_step}, at or after "
                           f"max_steps={trainer.max_steps}; it will not run")
        if not isinstance(pl_module, StructureRecorder):
            rank_zero_warn(
                f"{type(self).__name__}: {type(pl_module).__name__} is not a ResumableModule; to load its checkpoints, "
                "call neat_lightning.components.lora.restore_from_checkpoint(self, checkpoint) in its "
                "on_load_checkpoint"
            )
        self._schedule_data_switch(trainer)

    def _schedule_data_switch(self, trainer: L.Trainer) -> None:
        if self.switch_data is False:
            return
        dm = trainer.datamodule
        if dm is None or missing_methods(dm, DataSwitchable):
            if self.switch_data:
                raise TypeError(
                    f"{type(self).__name__}(switch_data=True) needs a DataModule with `schedule_switch` (e.g. "
                    f"SceneDataModule(pretrain=...)), but {type(dm).__name__} lacks it"
                )
            return
        if self.start_unit == "epoch":
            dm.schedule_switch(epoch=int(self.start))
        else:
            dm.schedule_switch(step=self._start_step)

    # -- the stage -------------------------------------------------------------------------------------------------

    def _reached(self, trainer: L.Trainer) -> bool:
        if self.start_unit == "epoch":
            return trainer.current_epoch >= int(self.start)
        return trainer.global_step >= self._start_step

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active or self.done or not self._reached(trainer):
            return
        self.began_at = trainer.global_step
        self.rank = self.r or rank_for_budget(pl_module, self.targets, self.max_adapter_fraction)
        inject_lora(pl_module, self.targets, r=self.rank, alpha=self.alpha, dropout=self.dropout,
                    generator=torch.Generator().manual_seed(self.seed))
        self.frozen = freeze_base(pl_module)
        self._record(pl_module)
        self._use_adapter_optimizer(trainer, pl_module)
        self.active = True
        rank_zero_info(f"{type(self).__name__}: stage begins at step {self.began_at}. {lora_report(pl_module)}")

    def _record(self, pl_module: L.LightningModule, frozen: bool = True) -> None:
        if isinstance(pl_module, StructureRecorder):
            state = lora_state(pl_module, frozen=frozen) if lora_layers(pl_module) else None
            pl_module.record_structure("lora", state)

    def _use_adapter_optimizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace the trainer's optimizers and schedulers by one AdamW over the adapters (a deterministic order)."""
        for p in pl_module.parameters():
            if not p.requires_grad:
                p.grad = None  # stale base gradients from the last pretraining step
        optimizer = torch.optim.AdamW(
            adapter_parameters(pl_module), lr=self.learning_rate, betas=(0.9, 0.999), weight_decay=self.weight_decay
        )
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        total = max_steps - self.began_at if max_steps is not None else math.inf
        min_ratio = self.min_lr_ratio if max_steps is not None else 1.0
        lr_lambda = partial(_stage_lr, warmup_steps=self.warmup_steps, total_steps=total, min_ratio=min_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self._optimizer = optimizer
        trainer.strategy.optimizers = [optimizer]
        trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(scheduler, name="lora", interval="step")]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On resume mid-stage: the adapters were re-injected before the weights loaded; rebuild the adapter
        optimizer now, so Lightning loads the checkpoint's optimizer state into it right after this hook."""
        if not self.active:
            return
        if not lora_layers(pl_module):
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint was taken mid-stage but {type(pl_module).__name__} has no "
                "LoRA layers after loading it; call restore_from_checkpoint(self, checkpoint) in on_load_checkpoint"
            )
        freeze_base(pl_module)
        self._use_adapter_optimizer(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        if self.at_end == "merge":
            merge_lora(pl_module, remove=True)
            rank_zero_info(f"{type(self).__name__}: adapters merged into the base weights")
        params = dict(pl_module.named_parameters())
        for name in self.frozen:  # the stage is over: the base trains again if training continues
            if name in params:
                params[name].requires_grad_(True)
        self._record(pl_module, frozen=False)
        self.active, self.done = False, True

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if lora_layers(pl_module):
            checkpoint[CHECKPOINT_KEY] = lora_state(pl_module, frozen=self.active)
        if self.done and any(opt is self._optimizer for opt in trainer.optimizers):
            # saved after the stage ended (ModelCheckpoint's save_last at train end): the adapter optimizer's state
            # is meaningless now (merged: its parameters are gone); without it, continuing from this checkpoint
            # starts the module's own optimizer afresh instead of failing on mismatched parameter groups
            checkpoint["optimizer_states"], checkpoint["lr_schedulers"] = [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "done": self.done, "began_at": self.began_at, "frozen": list(self.frozen),
                "rank": self.rank}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.active = bool(state_dict.get("active", False))
        self.done = bool(state_dict.get("done", False))
        self.began_at = state_dict.get("began_at")
        self.frozen = list(state_dict.get("frozen", []))
        self.rank = state_dict.get("rank")


def _stage_lr(step: int, warmup_steps: int, total_steps: float, min_ratio: float) -> float:
    """LR multiplier at stage step ``step``: warm-up, then cosine to ``min_ratio`` (constant if ``total`` is inf)."""
    if math.isinf(total_steps):
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return warmup_cosine(step, warmup_steps, int(total_steps), min_ratio)
