"""SleepWakeConsolidation: schedule, sleep steps without a wake batch, replay mode at equal budget, the adaptive
rate, pruning, protocol checks, exact mid-sleep resume (buffer included), DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.callbacks.sleep_wake import (
    SleepWakeConsolidation,
    adapted_rate,
    prune_low_importance,
    replay_owed,
)
from neat_lightning.components.episodic_buffer import EpisodicConfig
from neat_lightning.components.titans import TitansConfig, prune_slots
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.data.math import MathDataModule
from neat_lightning.modules.byte_lm import ByteLM
from neat_lightning.modules.neat import NeatModel
from neat_lightning.protocols import ReplayPlan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeMemory(L.LightningModule):
    """The smallest MemoryConsolidator (and MemoryPrunable): a linear model that writes its rows into 8 slots; a
    sleep step fits a slow linear map to the stored rows and never reads the batch."""

    def __init__(self, slots: int = 8) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.slow = nn.Parameter(torch.zeros(4, 4))
        self.register_buffer("episodic_importance", torch.zeros(slots))
        self.register_buffer("episodic_keys", torch.zeros(slots, 4))
        self.calls: dict[str, int] = {"sleep": 0, "reset": 0}
        self.plans: list[ReplayPlan] = []
        self._plan: ReplayPlan | None = None
        self._stats: dict[str, float] = {}

    def plan_step(self, plan: ReplayPlan) -> None:
        self._plan = plan
        self.plans.append(plan)

    def replay_stats(self) -> dict[str, float]:
        return dict(self._stats)

    def training_step(self, batch, batch_idx):
        plan, self._plan = self._plan, None
        if plan is not None and plan.sleep:  # only stored rows, only the slow map
            self.calls["sleep"] += 1
            keys = self.episodic_keys[self.episodic_importance > 0][: plan.replay]
            loss = (keys @ self.slow - keys.flip(-1)).pow(2).mean()
            self._stats = {"replay_loss": float(loss), "replayed": float(len(keys)), "stored": 8.0}
            return loss
        err = (self.layer(batch) - batch.flip(-1)).pow(2).mean(-1)  # (B,)
        with torch.no_grad():  # write the rows into the slots, most surprising first
            imp = torch.cat([self.episodic_importance * 0.9, err.detach() + 1e-3])
            keys = torch.cat([self.episodic_keys, batch])
            top = torch.topk(imp, len(self.episodic_importance)).indices
            self.episodic_importance.copy_(imp[top])
            self.episodic_keys.copy_(keys[top])
        self._stats = {"replay_loss": math.nan, "replayed": 0.0}
        return err.mean()

    def train_dataloader(self):
        # every batch holds the same rows, so a resumed epoch (restarted at batch 0) sees the same data
        rows = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(rows.repeat(16, 1), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        filled = self.episodic_importance > 0
        return {"importance": self.episodic_importance[filled].clone()}

    def reset_short_term(self) -> None:
        self.calls["reset"] += 1

    def prune_memory(self, fraction: float) -> int:
        return prune_slots(self.episodic_importance, fraction, self.episodic_keys)


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


def test_phases_follow_the_schedule_and_sleep_steps_train_on_stored_rows_only(tmp_path):
    module, rec = FakeMemory(), Recorder()
    cb = SleepWakeConsolidation(wake_steps=3, sleep_steps=2, replay_size=4)
    trainer(tmp_path, [cb, rec], 12).fit(module)
    assert cb.history == [(0, "wake"), (3, "sleep"), (5, "wake"), (8, "sleep"), (10, "wake")]
    assert (cb.sleeps, cb.phase, cb.phase_step, cb.wake_updates) == (2, "wake", 2, 8)
    assert module.calls == {"sleep": 4, "reset": 2}
    asleep = {3, 4, 8, 9}
    for step in range(1, 12):  # the wake weights move on wake steps only
        moved = not torch.equal(rec.weights[step], rec.weights[step - 1])
        assert moved == (step not in asleep), step
    assert [p.phase_step for p in module.plans if p.sleep] == [0, 1, 0, 1]
    assert all(p.replay == 0 for p in module.plans if not p.sleep)
    assert cb.items_replayed == 4 * 4  # replay_size rows per sleep step


class SeenBatches(Callback):
    """The data's batch at every sleep step (read before the callback under test moves its phase)."""

    def __init__(self, sw: SleepWakeConsolidation) -> None:
        self.sw, self.sleep_batches = sw, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sw.asleep:
            self.sleep_batches.append(batch["ids"].clone())


def test_a_neat_sleep_step_runs_no_wake_batch(tmp_path, monkeypatch):
    """The batch Lightning hands a sleep step never reaches the model; the step trains on stored windows with the
    distillation and Titans memory terms, and its time is counted."""
    L.seed_everything(0)
    model, data = tiny_neat(), tiny_math()
    forwarded = []
    loss_terms = model.loss_terms
    monkeypatch.setattr(model, "loss_terms", lambda batch, record=False: forwarded.append(
        batch["ids"].clone()) or loss_terms(batch, record))
    cb = SleepWakeConsolidation(wake_steps=2, sleep_steps=3, replay_size=4, distill_weight=0.5, memory_weight=1.0)
    seen = SeenBatches(cb)
    t = trainer(tmp_path, [seen, cb], 4, limit_val_batches=0)  # 2 wake steps, then two sleep steps
    t.fit(model, data)
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    assert len(seen.sleep_batches) == 2 and len(forwarded) == 4
    for batch in seen.sleep_batches:
        assert not any(f.shape == batch.shape and torch.equal(f, batch) for f in forwarded)
    assert [f.shape[0] for f in forwarded] == [4, 4, 4, 4]  # two wake batches, two draws of replay_size
    assert metrics["sleep/phase"] == 1.0 and metrics["sleep/replayed"] == 4
    assert metrics["sleep/memory_loss"] > 0 and metrics["sleep/distill_loss"] > 0 and metrics["sleep/replay_loss"] > 0
    assert 0 < metrics["sleep/time_fraction"] < 1 and cb.items_replayed == 8


def test_memory_pressure_brings_sleep_forward(tmp_path):
    cb = SleepWakeConsolidation(wake_steps=100, sleep_steps=1, early_sleep_items=8, min_wake_steps=2)
    trainer(tmp_path, [cb], 6).fit(FakeMemory())  # the 8 slots are full after 2 steps of 4 rows
    assert cb.history == [(0, "wake"), (2, "sleep"), (3, "wake"), (5, "sleep"), (6, "wake")]


class Windows(IterableDataset):
    """Random (4, 17) id windows, batch k a pure function of k (so a resumed run sees the same)."""

    def __iter__(self):
        for k in range(1000):
            yield torch.randint(4, 260, (4, 17), generator=torch.Generator().manual_seed(k))


def test_replay_mode_spreads_the_sleep_budget_over_the_wake_batches(tmp_path):
    assert [replay_owed(u, 6, 4, 0) for u in range(4)] == [1, 3, 4, 6]  # cumulative owed, nothing replayed yet
    assert [replay_owed(u, 6, 4, u * 6 // 4) for u in range(4)] == [1, 2, 1, 2]  # 6 per 4 updates, spread evenly
    L.seed_everything(0)
    model = ByteLM(dim=32, n_layers=1, heads=2, block_size=16, warmup_steps=1, episodic=EpisodicConfig(capacity=64))
    cb = SleepWakeConsolidation(wake_steps=4, sleep_steps=1, replay_size=6, mode="replay")
    trainer(tmp_path, [cb], 8).fit(model, DataLoader(Windows(), batch_size=None))
    assert cb.history == [(0, "wake")] and cb.sleeps == 0 and cb.wake_updates == 8
    assert cb.items_replayed == 12  # as many as two sleep steps of 6; the first step's (empty buffer) made up later
    assert int(model.episodic.replays.sum()) == 12


def test_the_rate_backs_off_when_the_replay_loss_stops_falling(tmp_path):
    assert adapted_rate(1.0, [2.0, 2.0, 1.0, 1.0], 0.5, 0.1, 0.02) == 1.0  # fell by half: recovers (capped at 1)
    assert adapted_rate(0.5, [2.0, 2.0, 1.0, 1.0], 0.5, 0.1, 0.02) == 1.0
    assert adapted_rate(1.0, [2.0, 2.0, 2.0, 1.99], 0.5, 0.1, 0.02) == 0.5  # fell by 0.25%: backs off
    assert adapted_rate(0.15, [2.0, 2.0], 0.5, 0.1, 0.02) == 0.1  # not below min_rate
    assert adapted_rate(0.5, [2.0], 0.5, 0.1, 0.02) == 0.5 and adapted_rate(0.5, [math.nan, 1.0], 0.5, 0.1, 0.0) == 0.5
    module = FakeMemory()
    cb = SleepWakeConsolidation(wake_steps=1, sleep_steps=2, replay_size=4, adaptive_rate=True, min_improvement=0.99)
    trainer(tmp_path, [cb], 9).fit(module)
    assert [p.rate for p in module.plans if p.sleep] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert cb.rate == 0.125


def test_setup_refuses_modules_without_the_protocol(tmp_path):
    class Plain(FakeMemory):
        memory_snapshot = plan_step = replay_stats = reset_short_term = None

    with pytest.raises(TypeError, match=r"SleepWakeConsolidation needs a module implementing the MemoryConsolidator "
                                        r"protocol, but Plain lacks `memory_snapshot`, `plan_step`, `replay_stats`, "
                                        r"`reset_short_term`"):
        trainer(tmp_path, [SleepWakeConsolidation()], 1).fit(Plain())

    class Unprunable(FakeMemory):
        prune_memory = None

    with pytest.raises(TypeError, match=r"SleepWakeConsolidation needs a module implementing the MemoryPrunable "
                                        r"protocol, but Unprunable lacks `prune_memory`"):
        trainer(tmp_path, [SleepWakeConsolidation(prune_fraction=0.25)], 1).fit(Unprunable())
    trainer(tmp_path, [SleepWakeConsolidation(prune_fraction=0.0)], 1).fit(Unprunable())  # no pruning: not needed

    class OddSignature(FakeMemory):
        def plan_step(self, epochs: int) -> None:
            pass

    with pytest.raises(TypeError, match=r"OddSignature.plan_step\(plan=ReplayPlan\(...\)\) \(the "
                                        r"MemoryConsolidator protocol\) raised TypeError: .*plan_step\(\) got an "
                                        r"unexpected keyword argument 'plan'"):
        trainer(tmp_path, [SleepWakeConsolidation(wake_steps=1)], 2).fit(OddSignature())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"wake_steps": 0}, r"wake_steps=0 must be an integer >= 1"),
     ({"sleep_steps": 1.5}, r"sleep_steps=1.5 must be an integer >= 1"),
     ({"replay_size": 0}, r"replay_size=0 must be an integer >= 1"),
     ({"mode": "dream"}, r"mode='dream' must be 'sleep' or 'replay'"),
     ({"distill_weight": -1.0}, r"distill_weight=-1.0 must be >= 0"),
     ({"temperature": 0.0}, r"temperature=0.0 must be > 0"),
     ({"rate_backoff": 1.0}, r"rate_backoff=1.0 must be in \(0, 1\)"),
     ({"min_rate": 0.0}, r"min_rate=0.0 must be in \(0, 1\]"),
     ({"adaptive_rate": True, "sleep_steps": 1}, r"adaptive_rate=True needs sleep_steps >= 2, got 1"),
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
    return dict(wake_steps=3, sleep_steps=3, replay_size=16, prune_fraction=0.25, distill_weight=0.5,
                memory_weight=1.0, adaptive_rate=True, min_improvement=0.5)


class StopAt(Callback):
    """Interrupt a run after ``step`` optimizer steps (a crash or a pre-empted job: the LR schedule is the full
    run's)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            trainer.should_stop = True


def fit_neat(tmp_path, stop=None, ckpt_path=None, save=None):
    L.seed_everything(3)
    model, cb = tiny_neat(), SleepWakeConsolidation(**settings())
    t = trainer(tmp_path, [cb, StopAt(stop)], 12, deterministic=True, limit_val_batches=0)
    t.fit(model, tiny_math(), ckpt_path=ckpt_path)
    if save is not None:
        t.save_checkpoint(save)
    return model, cb


def test_resume_in_the_middle_of_sleep_reproduces_the_run(tmp_path):
    """Weights, the episodic buffer (windows and bookkeeping), the distillation teacher, the rate and the phase:
    all as in the uninterrupted run."""
    full, full_cb = fit_neat(tmp_path)
    mid = tmp_path / "mid.ckpt"
    _, mid_cb = fit_neat(tmp_path, stop=4, save=mid)  # steps 3, 4, 5 sleep: the checkpoint is after step 3
    assert (mid_cb.phase, mid_cb.phase_step) == ("sleep", 1)
    assert "neat_sleep_teacher" in torch.load(mid, weights_only=True)
    resumed, resumed_cb = fit_neat(tmp_path, ckpt_path=mid)
    assert resumed_cb.history == full_cb.history == [(0, "wake"), (3, "sleep"), (6, "wake"), (9, "sleep"),
                                                     (12, "wake")]
    assert (resumed_cb.sleeps, resumed_cb.items_replayed) == (full_cb.sleeps, full_cb.items_replayed) == (2, 96)
    assert resumed_cb.rate == full_cb.rate and resumed_cb.phase_losses == full_cb.phase_losses
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = full.episodic.state_dict(), resumed.episodic.state_dict()
    assert ea.keys() == eb.keys() and len(full.episodic) > 0
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    assert full._teacher is None and resumed._teacher is None  # dropped at the end of each sleep phase


def test_resume_of_the_replay_mode_reproduces_the_run(tmp_path):
    def run(stop=None, ckpt_path=None, save=None):
        L.seed_everything(0)
        model = ByteLM(dim=32, n_layers=1, heads=2, block_size=16, warmup_steps=1, dropout=0.1,
                       episodic=EpisodicConfig(capacity=8, policy="reservoir"))
        cb = SleepWakeConsolidation(wake_steps=3, sleep_steps=1, replay_size=5, mode="replay")
        t = trainer(tmp_path, [cb, StopAt(stop)], 9, deterministic=True, limit_val_batches=0)
        t.fit(model, ByteTextDataModule(block_size=16, batch_size=4, batches_per_epoch=50), ckpt_path=ckpt_path)
        if save is not None:
            t.save_checkpoint(save)
        return model, cb

    full, full_cb = run()
    run(stop=4, save=tmp_path / "replay.ckpt")
    resumed, resumed_cb = run(ckpt_path=tmp_path / "replay.ckpt")
    assert resumed_cb.items_replayed == full_cb.items_replayed == 15
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for k, v in full.episodic.state_dict().items():
        assert torch.equal(v, resumed.episodic.state_dict()[k]), k


# ----------------------------------------------------------------------------------------------------------------------
# DDP: two CPU processes fall asleep and wake up together and stay identical

DDP_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import lightning as L, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, {repo!r})
from neat_lightning.callbacks.sleep_wake import SleepWakeConsolidation
from neat_lightning.components.episodic_buffer import EpisodicConfig
from neat_lightning.components.titans import TitansConfig
from neat_lightning.data.math import MathDataModule
from neat_lightning.modules.neat import NeatModel


class Report(Callback):
    def on_train_end(self, trainer, pl_module):
        sw = [c for c in trainer.callbacks if isinstance(c, SleepWakeConsolidation)][0]
        out = {{"history": sw.history, "sleeps": sw.sleeps, "replayed": sw.items_replayed,
                "weights": {{k: v.double().sum().item() for k, v in pl_module.named_parameters()}},
                "episodic": {{k: v.double().sum().item() for k, v in pl_module.episodic.state_dict().items()}}}}
        with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
            json.dump(out, f)


L.seed_everything(0)
model = NeatModel(dim=32, n_layers=1, heads=2, block_size=64, window=16, svf=False, warmup_steps=2,
                  titans_config=TitansConfig(dim_memory=16, chunk_size=8, persistent_tokens=2, memory_size=32,
                                             surprise_threshold=0.1), episodic=EpisodicConfig(capacity=8))
data = MathDataModule(tasks=["temporal_gap"], difficulties=[1], gap_range=(0, 16), block_size=64, batch_size=2,
                      batches_per_epoch=50, val_batches=1)
sw = SleepWakeConsolidation(wake_steps=2, sleep_steps=2, replay_size=3, distill_weight=0.5, memory_weight=1.0,
                            adaptive_rate=True, early_sleep_items=40, min_wake_steps=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    limit_val_batches=0, callbacks=[sw, Report()])
trainer.fit(model, data)
trainer.save_checkpoint({out!r} + "/ddp.ckpt")  # every rank takes part: each rank's buffer is gathered
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
    assert r0["sleeps"] == r1["sleeps"] == 2 and r0["replayed"] == r1["replayed"] == 4 * 3
    assert r0["weights"] == r1["weights"]  # all-reduced sleep gradients kept the replicas identical
    assert r0["episodic"]["rows.ids"] != r1["episodic"]["rows.ids"]  # while each rank kept its own windows
    saved = torch.load(tmp_path / "ddp.ckpt", weights_only=True)["neat_episodic"]
    assert saved["world_size"] == 2
    for r, report in enumerate((r0, r1)):
        assert {k: v.double().sum().item() for k, v in saved["ranks"][r].items()} == report["episodic"]
