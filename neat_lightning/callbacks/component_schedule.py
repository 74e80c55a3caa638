"""ComponentSchedule: switch a module's components on (or off) at configured training steps.

NeatModel's parts are activated progressively — the backbone first, the long-term memory once the bytes are
modelled, SVF experts last. Any module implementing :class:`~neat_lightning.protocols.ComponentSwitchable` works.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from neat_lightning.protocols import ComponentSwitchable, require

log = logging.getLogger(__name__)


class ComponentSchedule(Callback):
    """Activate components at given global steps (and optionally deactivate others).

    Before the first training batch of step ``s`` every event with ``step <= s`` that has not fired yet is applied
    in step order, so a run resumed past an event (or started late) still ends up in the scheduled state. Which
    events fired is the callback's checkpointed state; the module's own checkpoint rebuilds its active components.

    Args:
        activate: component name -> global step at which it is switched on (``0``: before the first step).
        deactivate: component name -> global step at which it is switched off.

    Raises:
        ValueError: a negative step, or a component both activated and deactivated at the same step; at ``setup``, a
            component the module does not have (``component_names()``).
        TypeError: at ``setup``, when the module does not implement ``ComponentSwitchable``.

    Example::

        trainer = L.Trainer(callbacks=[ComponentSchedule(activate={"titans": 200, "svf": 2000})])
    """

    def __init__(self, activate: dict[str, int] | None = None, deactivate: dict[str, int] | None = None) -> None:
        super().__init__()
        activate, deactivate = dict(activate or {}), dict(deactivate or {})
        for field, table in (("activate", activate), ("deactivate", deactivate)):
            for name, step in table.items():
                if not isinstance(step, int) or step < 0:
                    raise ValueError(f"ComponentSchedule {field}[{name!r}]={step!r} must be an integer step >= 0")
        for name in set(activate) & set(deactivate):
            if activate[name] == deactivate[name]:
                raise ValueError(
                    f"ComponentSchedule: {name!r} is both activated and deactivated at step {activate[name]}"
                )
        self.activate, self.deactivate = activate, deactivate
        # (step, order, name, active): deactivations before activations at the same step
        self.events = sorted(
            [(s, 1, n, True) for n, s in activate.items()] + [(s, 0, n, False) for n, s in deactivate.items()]
        )
        self.fired: list[str] = []  # event keys "name:on@step" already applied

    @staticmethod
    def _key(name: str, active: bool, step: int) -> str:
        return f"{name}:{'on' if active else 'off'}@{step}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(activate=sorted(self.activate.items()), deactivate=sorted(self.deactivate.items()))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, ComponentSwitchable, self)
        known = tuple(pl_module.component_names())
        for _, _, name, _ in self.events:
            if name not in known:
                raise ValueError(
                    f"ComponentSchedule: {type(pl_module).__name__} has no component {name!r}; it has {list(known)}"
                )

    def apply_due(self, pl_module: L.LightningModule, step: int) -> list[str]:
        """Apply every not-yet-fired event with ``event step <= step``; returns the keys applied."""
        applied = []
        for at, _, name, active in self.events:
            key = self._key(name, active, at)
            if at <= step and key not in self.fired:
                pl_module.set_component_active(name, active)
                self.fired.append(key)
                applied.append(key)
                log.info("ComponentSchedule: %s %s at step %d", name, "activated" if active else "deactivated", step)
        return applied

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.apply_due(pl_module, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fired": list(self.fired)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fired = list(state_dict.get("fired", []))
