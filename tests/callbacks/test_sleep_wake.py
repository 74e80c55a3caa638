"""SleepWakeConsolidation: schedule, real consolidation, pruning, protocol checks, exact mid-sleep resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from neat_lightning.callbacks.sleep_wake import SleepWakeConsolidation, prune_low_importance, select_replay
from neat_lightning.components.titans import TitansConfig, prune_slots
from neat_lightning.data.math import MathDataModule
from neat_lightning.modules.byte_lm import ByteLM
from neat_lightning.modules.neat import NeatModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeMemory(L.LightningModule):
    """The smallest MemoryConsolidator (and MemoryPrunable): a linear model whose rows are written as (key, value)
    items into 8 slots; ``consolidate`` fits a slow linear map to them by gradient descent and accepts an explicit
    replay set."""

    def __init__(self, slots: int = 8) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.slow = nn.Parameter(torch.zeros(4, 4))
        self.register_buffer("episodic_importance", torch.zeros(slots))
        self.register_buffer("episodic_keys", torch.zeros(slots, 4))
        self.register_buffer("episodic_values", torch.zeros(slots, 4))
        self.calls: dict[str, int] = {"consolidate": 0, "reset": 0}
        self.replayed: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        err = (self.layer(batch) - batch.flip(-1)).pow(2).mean(-1)  # (B,)
        with torch.no_grad():  # write the rows into the slots, most surprising first
            imp = torch.cat([self.episodic_importance * 0.9, err.detach() + 1e-3])
            keys = torch.cat([self.episodic_keys, batch])
            values = torch.cat([self.episodic_values, batch.flip(-1)])
            top = torch.topk(imp, len(self.episodic_importance)).indices
            self.episodic_importance.copy_(imp[top])
            self.episodic_keys.copy_(keys[top])
            self.episodic_values.copy_(values[top])
        return err.mean()

    def train_dataloader(self):
        # every batch holds the same rows, so a resumed epoch (restarted at batch 0) sees the same data
        rows = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(rows.repeat(16, 1), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        filled = self.episodic_importance > 0
        return {"keys": self.episodic_keys[filled].clone(), "values": self.episodic_values[filled].clone(),
                "importance": self.episodic_importance[filled].clone()}

    def consolidate(self, steps: int, lr: float, max_items: int | None = None, items=None) -> dict[str, float]:
        self.calls["consolidate"] += 1
        items = items if items is not None else self.memory_snapshot()
        self.replayed.append(items["keys"].clone())
        losses = []
        for _ in range(steps + 1):
            loss = (items["keys"] @ self.slow - items["values"]).pow(2).mean()
            losses.append(float(loss))
            if len(losses) > steps:
                break
            (grad,) = torch.autograd.grad(loss, [self.slow])
            with torch.no_grad():
                self.slow.sub_(lr * grad)
        return {"consolidation_loss": losses[0], "consolidation_loss_after": losses[-1], "items": len(items["keys"])}

    def reset_short_term(self) -> None:
        self.calls["reset"] += 1
        self.episodic_importance.zero_()

    def prune_memory(self, fraction: float) -> int:
        return prune_slots(self.episodic_importance, fraction, self.episodic_keys, self.episodic_values)


class Recorder(Callback):
    """Copies the plain layer's weight after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.layer.weight.detach().clone())


def trainer(tmp_path, callbacks, steps, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                     callbacks=callbacks, **kwargs)


def test_phases_follow_the_schedule_and_sleep_only_consolidates(tmp_path):
    module, rec = FakeMemory(), Recorder()
    cb = SleepWakeConsolidation(wake_steps=3, sleep_steps=2, consolidation_strength=0.5, replay_count=4,
                                sample_replay=True, prune_fraction=0.0)
    trainer(tmp_path, [cb, rec], 12).fit(module)
    assert cb.history == [(0, "wake"), (3, "sleep"), (5, "wake"), (8, "sleep"), (10, "wake")]
    assert (cb.sleeps, cb.phase, cb.phase_step) == (2, "wake", 2)
    assert module.calls == {"consolidate": 4, "reset": 2}
    asleep = {3, 4, 8, 9}
    for step in range(1, 12):  # the wake weights move on wake steps only
        moved = not torch.equal(rec.weights[step], rec.weights[step - 1])
        assert moved == (step not in asleep), step
    assert cb.items_replayed == 4 * 4  # replay_count items per sleep step, 8 filled slots
    assert all(len(keys) == 4 for keys in module.replayed)


def test_wake_learning_continues_in_sleep_when_not_paused(tmp_path):
    module, rec = FakeMemory(), Recorder()
    trainer(tmp_path, [SleepWakeConsolidation(wake_steps=2, sleep_steps=2, pause_wake_learning=False), rec], 5).fit(
        module)
    assert all(not torch.equal(a, b) for a, b in zip(rec.weights[1:], rec.weights[:-1]))


def test_consolidation_trains_the_neat_memory_with_real_gradients(tmp_path):
    """Three consolidation steps lower the consolidation loss.

    Margin, measured on a 2-core AMD EPYC (AVX2) with seed offsets 0-2 (``NEAT_TEST_SEED_OFFSET``) under
    ``OMP_NUM_THREADS=1`` and ``=2``: after/before = 0.945 / 0.827 / 0.940, identical at both thread counts, so the
    strict ``<`` holds with >= 5.5% to spare.
    """
    L.seed_everything(0)
    model, data = tiny_neat(), tiny_math()
    cb = SleepWakeConsolidation(wake_steps=2, sleep_steps=3, consolidation_strength=0.5, consolidation_steps=3,
                                replay_count=16, prune_fraction=0.5, reset_short_term=False)
    slow = [w.detach().clone() for b in model.model.memory_blocks() for w in b.memory.weights]
    t = trainer(tmp_path, [cb], 3, limit_val_batches=0)  # 2 wake steps, then one sleep step
    t.fit(model, data)
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    assert metrics["sleep/phase"] == 1.0 and metrics["sleep/items_replayed"] == 16
    assert metrics["sleep/consolidation_loss_after"] < metrics["sleep/consolidation_loss"]
    # the wake gradients were dropped, yet the slow memory weights moved: the consolidation loss did it
    after = [w.detach() for b in model.model.memory_blocks() for w in b.memory.weights]
    assert any(not torch.equal(a, b) for a, b in zip(slow, after))
    filled = int(sum((b.memory.episodic_importance > 0).sum() for b in model.model.memory_blocks()))
    assert metrics["sleep/items_pruned"] > 0 and filled == model.hparams.titans_config["memory_size"] - \
        metrics["sleep/items_pruned"]
    assert 0 < metrics["sleep/consolidation_time_fraction"] < metrics["sleep/time_fraction"] < 1


def test_memory_pressure_brings_sleep_forward(tmp_path):
    cb = SleepWakeConsolidation(wake_steps=100, sleep_steps=1, early_sleep_items=8, min_wake_steps=2)
    trainer(tmp_path, [cb], 6).fit(FakeMemory())  # the 8 slots are full after 2 steps of 4 rows
    assert cb.history == [(0, "wake"), (2, "sleep"), (3, "wake"), (5, "sleep"), (6, "wake")]


def test_setup_refuses_modules_without_the_protocol(tmp_path):
    with pytest.raises(TypeError, match=r"SleepWakeConsolidation needs a module implementing the "
                                        r"MemoryConsolidator protocol, but ByteLM lacks `consolidate`"):
        trainer(tmp_path, [SleepWakeConsolidation()], 1).fit(ByteLM(dim=16, n_layers=1, heads=2, block_size=8))

    class Unprunable(FakeMemory):
        prune_memory = None

    with pytest.raises(TypeError, match=r"SleepWakeConsolidation needs a module implementing the MemoryPrunable "
                                        r"protocol, but Unprunable lacks `prune_memory`"):
        trainer(tmp_path, [SleepWakeConsolidation(prune_fraction=0.25)], 1).fit(Unprunable())
    trainer(tmp_path, [SleepWakeConsolidation(prune_fraction=0.0)], 1).fit(Unprunable())  # no pruning: not needed

    class OddSignature(FakeMemory):
        def consolidate(self, epochs: int) -> dict[str, float]:
            return {}

    with pytest.raises(TypeError, match=r"OddSignature.consolidate\(steps=, lr=, max_items=, items=\) \(the "
                                        r"MemoryConsolidator protocol\) raised TypeError: .*consolidate\(\) got an "
                                        r"unexpected keyword argument 'steps'"):
        trainer(tmp_path, [SleepWakeConsolidation(wake_steps=1)], 2).fit(OddSignature())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"wake_steps": 0}, r"wake_steps=0 must be an integer >= 1"),
     ({"sleep_steps": 1.5}, r"sleep_steps=1.5 must be an integer >= 1"),
     ({"consolidation_strength": 0.0}, r"consolidation_strength=0.0 must be > 0"),
     ({"prune_fraction": 1.0}, r"prune_fraction=1.0 must be in \[0, 1\)"),
     ({"early_sleep_items": 0}, r"early_sleep_items=0 must be >= 1 or None")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SleepWakeConsolidation(**kwargs)


def test_pruning_empties_the_least_important_filled_slots():
    importance = torch.tensor([0.0, 5.0, 1.0, 0.0, 3.0, 2.0, 4.0])
    keys = torch.arange(7.0)[:, None].repeat(1, 2)
    assert prune_slots(importance, 0.4, keys) == 2  # 5 filled, floor(2.0)
    assert importance.tolist() == [0.0, 5.0, 0.0, 0.0, 3.0, 0.0, 4.0]
    assert keys[:, 0].tolist() == [0.0, 1.0, 0.0, 3.0, 4.0, 0.0, 6.0]
    assert prune_slots(importance, 0.3) == 0  # floor(0.9): nothing
    module = FakeMemory()
    module.episodic_importance.copy_(torch.arange(1.0, 9.0))
    assert prune_low_importance(module, 0.5) == 4
    assert module.episodic_importance.tolist() == [0, 0, 0, 0, 5, 6, 7, 8]
    assert prune_low_importance(nn.Linear(2, 2), 0.5) == 0  # no memory: nothing to prune


def test_replay_draws_follow_importance_and_the_generator():
    snap = {"keys": torch.arange(6.0)[:, None], "importance": torch.tensor([1e-9, 1e-9, 1e-9, 1.0, 1.0, 1.0])}
    picked = select_replay(snap, 3, torch.Generator().manual_seed(0))
    assert sorted(picked["keys"][:, 0].tolist()) == [3.0, 4.0, 5.0]
    a = select_replay({"keys": torch.arange(50.0)}, 5, torch.Generator().manual_seed(1))["keys"]
    b = select_replay({"keys": torch.arange(50.0)}, 5, torch.Generator().manual_seed(1))["keys"]
    assert torch.equal(a, b) and select_replay(snap, 10, torch.Generator())["keys"].shape == (6, 1)


# ----------------------------------------------------------------------------------------------------------------------
# resume in the middle of a sleep phase


def tiny_neat() -> NeatModel:
    return NeatModel(dim=32, n_layers=1, heads=2, block_size=64, window=16, svf=False, warmup_steps=2,
                     titans_config=TitansConfig(dim_memory=16, chunk_size=8, persistent_tokens=2, memory_size=64,
                                                surprise_threshold=0.1), dropout=0.1)


def tiny_math() -> MathDataModule:
    return MathDataModule(tasks=["temporal_gap", "fact_recall"], difficulties=[1], gap_range=(0, 16), block_size=64,
                          batch_size=4, batches_per_epoch=50, val_batches=1)


def settings() -> dict:
    return dict(wake_steps=3, sleep_steps=3, consolidation_strength=0.2, replay_count=16, prune_fraction=0.25)


def fit_neat(tmp_path, steps, ckpt_path=None, save=None):
    L.seed_everything(3)
    model, cb = tiny_neat(), SleepWakeConsolidation(**settings())
    t = trainer(tmp_path, [cb], steps, deterministic=True, limit_val_batches=0)
    t.fit(model, tiny_math(), ckpt_path=ckpt_path)
    if save is not None:
        t.save_checkpoint(save)
    return model, cb


def test_resume_in_the_middle_of_sleep_reproduces_the_run(tmp_path):
    full, full_cb = fit_neat(tmp_path, 9)
    mid = tmp_path / "mid.ckpt"
    _, mid_cb = fit_neat(tmp_path, 4, save=mid)  # steps 3, 4, 5 sleep: the checkpoint is after step 3
    assert (mid_cb.phase, mid_cb.phase_step) == ("sleep", 1)
    resumed, resumed_cb = fit_neat(tmp_path, 9, ckpt_path=mid)
    assert resumed_cb.history == full_cb.history == [(0, "wake"), (3, "sleep"), (6, "wake"), (9, "sleep")]
    assert (resumed_cb.sleeps, resumed_cb.items_replayed) == (full_cb.sleeps, full_cb.items_replayed) == (1, 48)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_mid_sleep_restores_the_replay_generator(tmp_path):
    def run(steps, ckpt_path=None, save=None):
        L.seed_everything(0)
        module = FakeMemory()
        cb = SleepWakeConsolidation(wake_steps=2, sleep_steps=4, replay_count=3, sample_replay=True,
                                    prune_fraction=0.0, seed=5)
        t = trainer(tmp_path, [cb], steps)
        t.fit(module, ckpt_path=ckpt_path)
        if save is not None:
            t.save_checkpoint(save)
        return module

    full = run(6)
    run(4, save=tmp_path / "fake.ckpt")
    resumed = run(6, ckpt_path=tmp_path / "fake.ckpt")
    assert len(full.replayed) == 4 and len(resumed.replayed) == 2
    assert all(torch.equal(a, b) for a, b in zip(full.replayed[2:], resumed.replayed))
    assert torch.equal(full.slow, resumed.slow)


# ----------------------------------------------------------------------------------------------------------------------
# DDP: two CPU processes fall asleep and wake up together and stay identical

DDP_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import lightning as L, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, {repo!r})
from neat_lightning.callbacks.sleep_wake import SleepWakeConsolidation
from neat_lightning.components.titans import TitansConfig
from neat_lightning.data.math import MathDataModule
from neat_lightning.modules.neat import NeatModel


class Report(Callback):
    def on_train_end(self, trainer, pl_module):
        sw = [c for c in trainer.callbacks if isinstance(c, SleepWakeConsolidation)][0]
        out = {{"history": sw.history, "sleeps": sw.sleeps,
                "weights": {{k: v.double().sum().item() for k, v in pl_module.state_dict().items()}}}}
        with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
            json.dump(out, f)


L.seed_everything(0)
model = NeatModel(dim=32, n_layers=1, heads=2, block_size=64, window=16, svf=False, warmup_steps=2,
                  titans_config=TitansConfig(dim_memory=16, chunk_size=8, persistent_tokens=2, memory_size=32,
                                             surprise_threshold=0.1))
data = MathDataModule(tasks=["temporal_gap"], difficulties=[1], gap_range=(0, 16), block_size=64, batch_size=2,
                      batches_per_epoch=50, val_batches=1)
sw = SleepWakeConsolidation(wake_steps=2, sleep_steps=2, consolidation_strength=0.5, replay_count=8,
                            early_sleep_items=40, min_wake_steps=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    limit_val_batches=0, callbacks=[sw, Report()])
trainer.fit(model, data)
"""


@pytest.mark.slow
def test_ddp_ranks_sleep_together_and_stay_identical(tmp_path):
    script = tmp_path / "ddp_sleep.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(repo=REPO, out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["history"] == r1["history"] == [[0, "wake"], [2, "sleep"], [4, "wake"], [6, "sleep"], [8, "wake"]]
    assert r0["sleeps"] == r1["sleeps"] == 2
    assert r0["weights"] == r1["weights"]  # consolidation of rank-local items did not split the replicas
