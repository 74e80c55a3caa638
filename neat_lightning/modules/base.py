"""The base class of every neat_lightning LightningModule: structural state that survives checkpoints.

Some changes happen to a module *during* training — LoRA adapters injected by a callback, a lattice grown to a new
size, components switched on. A checkpoint must rebuild them with ``Module.load_from_checkpoint(path)`` alone, so
each change is recorded in ``module.structure`` (plain, picklable values), written to the checkpoint under
``"neat_structure"`` and replayed by a named restorer before the weights are loaded (Lightning calls
``on_load_checkpoint`` before ``load_state_dict``, both in ``load_from_checkpoint`` and on ``--ckpt_path`` resume).
"""

from __future__ import annotations

import importlib
import math
import random
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

STRUCTURE_KEY = "neat_structure"
RNG_KEY = "neat_rng_states"

# entry name -> "module:function" called as fn(module, state) before the state dict is loaded
RESTORERS = MappingProxyType(
    {
        "lora": "neat_lightning.components.lora:restore_lora",
        "lattice": "neat_lightning.modules.lattice:restore_lattice",
    }
)


def rng_states() -> dict[str, Any]:
    """The process's random states (torch CPU/CUDA, Python): what dropout and sampling consume."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise a clear error unless ``path`` is a complete torch checkpoint (a zip archive with its central
    directory: a truncated or half-copied file fails here instead of deep inside ``torch.load``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such file: {str(path)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"{what}: {str(path)!r} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(p):
        raise ValueError(
            f"{what}: {str(path)!r} is not a complete checkpoint ({p.stat().st_size} bytes; truncated, corrupt, "
            "or not written by torch.save)"
        )


def mismatched_hparams(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: checkpoint=X, config=Y`` for every hyperparameter whose value differs."""
    return [
        f"{k}: checkpoint={saved[k]!r}, config={current[k]!r}"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
    ]


def _resolve(path: str):
    module_name, fn_name = path.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


class ResumableModule(L.LightningModule):
    """LightningModule whose structural changes are saved with and replayed from checkpoints.

    Subclasses that override ``on_save_checkpoint`` / ``on_load_checkpoint`` call ``super()``. Their own
    structural state (e.g. active components) can be an entry in ``self.structure`` with a restorer in
    :data:`RESTORERS`, or simply live in ``hparams`` when it is known at construction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.structure: dict[str, Any] = {}

    def record_structure(self, name: str, state: Any) -> None:
        """Record (or with ``state=None`` forget) a structural change so checkpoints carry it."""
        if state is None:
            self.structure.pop(name, None)
        else:
            self.structure[name] = state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.structure:
            checkpoint[STRUCTURE_KEY] = dict(self.structure)
        # Lightning does not checkpoint random states; without them a resumed run draws other dropout masks.
        # Ranks seed identically and consume identically, so rank 0's states serve every rank.
        checkpoint[RNG_KEY] = rng_states()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Lightning's ``load_from_checkpoint`` with a clear error for a missing, truncated or corrupt file."""
        if isinstance(checkpoint_path, (str, Path)) and "://" not in str(checkpoint_path):
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_before_backward(self, loss) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            step = self.trainer.global_step if self._trainer is not None else "?"
            raise FloatingPointError(
                f"{type(self).__name__}: the training loss is {value} at global step {step}. Training stops before "
                "the non-finite value reaches the weights; the last checkpoint is intact. Lower the learning rate, "
                "clip gradients (--trainer.gradient_clip_val) or check the data."
            )

    def _check_shapes(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint whose tensors do not fit this module fails with the config fields that differ."""
        own = self.state_dict()
        bad = [
            f"{k} {tuple(v.shape)} in checkpoint vs {tuple(own[k].shape)} here"
            for k, v in checkpoint.get("state_dict", {}).items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            fields = mismatched_hparams(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
            raise ValueError(
                f"the checkpoint does not match this {type(self).__name__}'s configuration. Differing fields: "
                f"{'; '.join(fields) or 'none recorded'}. First mismatched tensor: {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            set_rng_states(checkpoint[RNG_KEY])  # resuming a fit; plain load_from_checkpoint leaves RNGs alone
        for name, state in checkpoint.get(STRUCTURE_KEY, {}).items():
            if name in self.structure and self.structure[name] == state:
                continue  # already in this shape (e.g. resuming in the same process)
            if name not in RESTORERS:
                raise ValueError(
                    f"checkpoint records structural change {name!r} that this version cannot rebuild; "
                    f"known: {sorted(RESTORERS)}"
                )
            _resolve(RESTORERS[name])(self, state)
            self.record_structure(name, state)
        self._check_shapes(checkpoint)
