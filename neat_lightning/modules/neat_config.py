"""NeatModel's typed argument groups: ``SVFConfig`` and ``MVoTConfig``, and the rewrite of format-1 hyperparameters.

``TitansConfig`` and ``BLTConfig`` live beside their components; these two live here because their defaults and
meaning belong to the LightningModule (the SVF experts are named after the data's task types; the MVoT path loads a
``modules.VQVAE`` checkpoint). Both are frozen dataclasses that LightningCLI reads from YAML as nested mappings::

    svf_config:
      rank: 4
      dispatch: classify
    mvot_config:
      vqvae_ckpt: runs/vqvae/checkpoints/last.ckpt
      visual_vocab_size: 8192
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from neat_lightning.choices import check_choice
from neat_lightning.components.svf import SVDMethod
from neat_lightning.data.math import MATH_TASKS

# 8 experts: the math types, the three one-fact memory types and a general one (mqar and needle rows use general)
Dispatch = Literal["oracle", "classify", "mixture"]
DEFAULT_SVF_TASKS = (*MATH_TASKS, "fact_recall", "temporal_gap", "surprise", "general")


@dataclass(frozen=True)
class SVFConfig:
    """Transformer² SVF experts over the backbone's linears (:mod:`neat_lightning.components.svf`).

    Attributes:
        tasks: expert names; a data task type maps to the expert of the same name, else to ``general`` if present,
            else to the base model.
        rank: singular directions per matrix; ``None`` for all.
        method: ``"full"`` SVD or ``"randomized"`` (needs ``rank``) for large matrices.
        targets: regex over backbone module names of the linears to adapt.
        dispatch: ``"oracle"`` uses the batch's task labels; ``"classify"`` / ``"mixture"`` use the dispatcher's
            first pass (trained on the labels while SVF is active).
        freeze_base: while SVF is active only ``z`` and the dispatcher train (other gradients are dropped).
        train_experts: experts whose ``z`` trains (e.g. one task type); ``None`` for all.
        dispatch_prefix: leading bytes the dispatcher pools (the start of the prompt).
    """

    tasks: tuple[str, ...] = DEFAULT_SVF_TASKS
    rank: int | None = None
    method: SVDMethod = "full"
    targets: str = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(w1|w2|w3))"
    dispatch: Dispatch = "classify"
    freeze_base: bool = True
    train_experts: tuple[str, ...] | None = None
    dispatch_prefix: int = 32

    def __post_init__(self) -> None:
        for name in ("tasks", "train_experts"):  # YAML and checkpoints give lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.tasks:
            raise ValueError("SVFConfig.tasks=[] must name at least one expert")
        check_choice("SVFConfig.dispatch", self.dispatch, Dispatch)
        check_choice("SVFConfig.method", self.method, SVDMethod)
        for name in self.train_experts or ():
            if name not in self.tasks:
                raise ValueError(f"SVFConfig.train_experts: {name!r} is not an expert; tasks are {list(self.tasks)}")
        if self.dispatch_prefix < 1:
            raise ValueError(f"SVFConfig.dispatch_prefix={self.dispatch_prefix} must be >= 1")


@dataclass(frozen=True)
class MVoTConfig:
    """The MVoT visual-token path (:mod:`neat_lightning.components.mvot`, ``docs/mvot.md``).

    Attributes:
        vqvae_ckpt: the trained VQ-VAE checkpoint (``modules.VQVAE``) the visual path loads frozen.
        visual_vocab_size: visual tokens K; must equal the VQ-VAE's ``codebook_size``.
        image_size: image side in pixels (a multiple of the VQ-VAE's ``downsample``): sets the h x w codes per image.
        discrepancy_weight: λ of the token discrepancy loss, ``L_CE + λ L_D`` (MVoT uses 0.1; 0 disables it).
        decision_weight: weight of the visualization-decision head's binary cross-entropy.
    """

    vqvae_ckpt: str | None = None
    visual_vocab_size: int = 128
    image_size: int = 32
    discrepancy_weight: float = 0.1
    decision_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.discrepancy_weight < 0 or self.decision_weight < 0:
            raise ValueError(
                f"MVoTConfig.discrepancy_weight={self.discrepancy_weight} and "
                f"decision_weight={self.decision_weight} must be >= 0"
            )
        if self.visual_vocab_size < 1:
            raise ValueError(f"MVoTConfig.visual_vocab_size={self.visual_vocab_size} must be >= 1")
        if self.image_size < 1:
            raise ValueError(f"MVoTConfig.image_size={self.image_size} must be >= 1")


# ----------------------------------------------------------------------------------------------------------------------
# format 1 -> 2: flat svf_* / mvot_* arguments and a flat blt_config become typed groups

SVF_FORMAT_1 = {  # format-1 hyperparameter -> SVFConfig field
    "svf_tasks": "tasks", "svf_rank": "rank", "svf_method": "method", "svf_targets": "targets",
    "svf_dispatch": "dispatch", "svf_freeze_base": "freeze_base", "svf_train_experts": "train_experts",
    "dispatch_prefix": "dispatch_prefix",
}
MVOT_FORMAT_1 = {  # format-1 hyperparameter -> MVoTConfig field
    "vqvae_ckpt": "vqvae_ckpt", "visual_vocab_size": "visual_vocab_size", "image_size": "image_size",
    "mvot_lambda": "discrepancy_weight", "decision_weight": "decision_weight",
}
PATCHER_FORMAT_1 = {  # format-1 BLTConfig field -> PatcherConfig field
    "patching": "mode", "threshold": "threshold", "max_patch_length": "max_patch_length",
    "patch_size": "patch_size", "entropy_batch_windows": "batch_windows",
}


def upgrade_hparams_from_format_1(hparams: dict[str, Any]) -> list[str]:
    """Rewrite format-1 NeatModel hyperparameters in place; returns one line per change."""
    changes = []
    for group, table in (("svf_config", SVF_FORMAT_1), ("mvot_config", MVOT_FORMAT_1)):
        found = [old for old in table if old in hparams]
        if found and group not in hparams:
            hparams[group] = {table[old]: hparams.pop(old) for old in found}
            changes.append(f"{', '.join(found)} -> {group}")
    blt = hparams.get("blt_config")
    if isinstance(blt, dict) and "patcher" not in blt:
        found = [old for old in PATCHER_FORMAT_1 if old in blt]
        patcher = {PATCHER_FORMAT_1[old]: blt.pop(old) for old in found}
        blt["patcher"] = patcher
        changes.append(f"blt_config.{{{', '.join(found)}}} -> blt_config.patcher")
    return changes
