"""ComponentSchedule: fires at its steps, checks the protocol, and survives resume without firing twice."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from neat_lightning.callbacks.component_schedule import ComponentSchedule


class Switchable(L.LightningModule):
    components = ("titans", "svf")

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.calls: list[tuple[str, bool, int]] = []
        self.active: set[str] = set()

    def component_names(self) -> tuple[str, ...]:
        return self.components

    def set_component_active(self, name: str, active: bool) -> None:
        self.calls.append((name, active, self.trainer.global_step))
        (self.active.add if active else self.active.discard)(name)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(torch.randn(40, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NotSwitchable(Switchable):
    set_component_active = None


def fit(tmp_path, module, schedule, steps, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[schedule])
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_components_switch_at_their_steps(tmp_path):
    module = Switchable()
    fit(tmp_path, module, ComponentSchedule(activate={"titans": 0, "svf": 3}, deactivate={"titans": 5}), 7)
    assert module.calls == [("titans", True, 0), ("svf", True, 3), ("titans", False, 5)]
    assert module.active == {"svf"}


def test_state_survives_resume_and_nothing_fires_twice(tmp_path):
    module = Switchable()
    trainer = fit(tmp_path, module, ComponentSchedule(activate={"titans": 1, "svf": 4}), 3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert module.calls == [("titans", True, 1)]
    resumed_module, schedule = Switchable(), ComponentSchedule(activate={"titans": 1, "svf": 4})
    fit(tmp_path, resumed_module, schedule, 6, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed_module.calls == [("svf", True, 4)]
    assert schedule.state_dict() == {"fired": ["titans:on@1", "svf:on@4"]}


def test_a_late_start_applies_every_due_event_in_order():
    module, schedule = Switchable(), ComponentSchedule(activate={"svf": 2, "titans": 1}, deactivate={"svf": 3})
    seen = []
    module.set_component_active = lambda name, active: seen.append((name, active))
    assert schedule.apply_due(module, 10) == ["titans:on@1", "svf:on@2", "svf:off@3"]
    assert seen == [("titans", True), ("svf", True), ("svf", False)]
    assert schedule.apply_due(module, 11) == []


def test_setup_rejects_modules_without_the_protocol_and_unknown_components(tmp_path):
    with pytest.raises(TypeError, match=r"ComponentSchedule needs a module implementing the ComponentSwitchable"):
        fit(tmp_path, NotSwitchable(), ComponentSchedule(activate={"titans": 0}), 1)
    with pytest.raises(ValueError, match=r"Switchable has no component 'blt'; it has \['titans', 'svf'\]"):
        fit(tmp_path, Switchable(), ComponentSchedule(activate={"blt": 0}), 1)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match=r"activate\['titans'\]=-1 must be an integer step >= 0"):
        ComponentSchedule(activate={"titans": -1})
    with pytest.raises(ValueError, match=r"'svf' is both activated and deactivated at step 3"):
        ComponentSchedule(activate={"svf": 3}, deactivate={"svf": 3})
