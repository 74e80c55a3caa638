"""The base class of every neat_lightning LightningModule: structural state that survives checkpoints.

Some changes happen to a module *during* training — LoRA adapters injected by a callback, a lattice grown to a new
size, components switched on. A checkpoint must rebuild them with ``Module.load_from_checkpoint(path)`` alone, so
each change is recorded in ``module.structure`` (plain, picklable values), written to the checkpoint under
``"neat_structure"`` and replayed by a named restorer before the weights are loaded (Lightning calls
``on_load_checkpoint`` before ``load_state_dict``, both in ``load_from_checkpoint`` and on ``--ckpt_path`` resume).
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

import lightning as L

STRUCTURE_KEY = "neat_structure"

# entry name -> "module:function" called as fn(module, state) before the state dict is loaded
RESTORERS = MappingProxyType(
    {
        "lora": "neat_lightning.components.lora:restore_lora",
    }
)


def _resolve(path: str):
    module_name, fn_name = path.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


class NeatModule(L.LightningModule):
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
