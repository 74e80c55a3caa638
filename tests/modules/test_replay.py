"""ConsolidationMixin (ByteLM, NeatModel): planned wake steps store windows, sleep steps train on stored windows
without reading the batch, replay appended to wake batches, the consolidation rate, the distillation teacher, the
Titans terms, and checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.components.episodic_buffer import EpisodicConfig
from neat_lightning.components.titans import TitansConfig
from neat_lightning.modules.byte_lm import ByteLM
from neat_lightning.modules.neat import NeatModel
from neat_lightning.modules.replay import EPISODIC_KEY, TEACHER_KEY
from neat_lightning.protocols import ReplayPlan

POISON = 10_000  # an id no embedding has: a batch of it cannot go through the model


class Batches(IterableDataset):
    """Random (4, 17) id windows; the steps listed in ``poison`` get ids no model can embed."""

    def __init__(self, poison: set[int] = frozenset(), n: int = 50) -> None:
        self.poison, self.n = poison, n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for k in range(self.n):
            batch = torch.randint(4, 260, (4, 17), generator=g)
            yield torch.full_like(batch, POISON) if k in self.poison else batch


class Planner(Callback):
    """Hands the module ``plans[step]`` before each step (nothing when the step has no plan)."""

    def __init__(self, plans: dict[int, ReplayPlan]) -> None:
        self.plans = plans
        self.stats: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.plans:
            pl_module.plan_step(self.plans[trainer.global_step])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stats[trainer.global_step - 1] = pl_module.replay_stats()


def lm(**kwargs) -> ByteLM:
    L.seed_everything(0)
    return ByteLM(**{"dim": 32, "n_layers": 1, "heads": 2, "block_size": 16, "warmup_steps": 1,
                     "episodic": EpisodicConfig(capacity=6), **kwargs})


def fit(model, plans, steps, poison=frozenset(), tmp_path=None, save=None):
    planner = Planner(plans)
    t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, callbacks=[planner], deterministic=True,
                  default_root_dir=tmp_path)
    t.fit(model, DataLoader(Batches(set(poison)), batch_size=None))
    if save is not None:
        t.save_checkpoint(save)
    return planner, t


WAKE = ReplayPlan()


def test_without_a_plan_nothing_is_stored():
    model = lm()
    fit(model, {}, 2)
    assert len(model.episodic) == 0 and model.replay_stats() == {}


def test_a_sleep_step_trains_on_stored_windows_and_never_reads_the_batch():
    model = lm()
    sleep = ReplayPlan(sleep=True, replay=5)
    planner, _ = fit(model, {0: WAKE, 1: WAKE}, 2)
    assert len(model.episodic) == 6 and planner.stats[1]["written"] >= 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planner, _ = fit(model, {0: sleep, 1: sleep}, 2, poison={0, 1})  # a new Trainer: steps count from 0 again
    assert planner.stats[0]["replayed"] == planner.stats[1]["replayed"] == 5
    assert planner.stats[1]["written"] == 0 and len(model.episodic) == 6
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert int(model.episodic.replays.sum()) == 10
    with pytest.raises(IndexError):  # the poison batch would have failed in any wake step
        fit(lm(), {}, 1, poison={0})


def test_wake_replay_appends_stored_windows_to_the_batch():
    model = lm(episodic=EpisodicConfig(capacity=64))  # room for every window: nothing replayed is evicted
    planner, _ = fit(model, {0: WAKE, 1: ReplayPlan(replay=3), 2: ReplayPlan(replay=2)}, 3)
    assert planner.stats[0]["replayed"] == 0 and planner.stats[0]["replay_loss"] != planner.stats[0]["replay_loss"]
    assert (planner.stats[1]["replayed"], planner.stats[2]["replayed"]) == (3, 2)
    assert int(model.episodic.replays.sum()) == 5


def test_the_rate_scales_the_learning_rate_of_its_step_only():
    deltas, lrs = [], []
    for rate in (1.0, 0.5):
        model = lm(weight_decay=0.1)
        fit(model, {0: WAKE, 1: WAKE}, 2)
        before = {k: v.clone() for k, v in model.named_parameters()}
        _, t = fit(model, {0: ReplayPlan(sleep=True, replay=4, rate=rate)}, 1)  # a new Trainer, fresh AdamW
        deltas.append({k: v.detach() - before[k] for k, v in model.named_parameters()})
        lrs.append([g["lr"] for g in t.optimizers[0].param_groups])
    for k in deltas[0]:
        assert torch.allclose(deltas[1][k], 0.5 * deltas[0][k], rtol=1e-4, atol=1e-8), k
    assert lrs[0] == lrs[1]  # restored after the step: the schedule continues untouched


def test_distillation_teacher_is_the_pre_sleep_model_and_is_checkpointed(tmp_path):
    model = lm()
    fit(model, {0: WAKE, 1: WAKE}, 2)
    pre = {k: v.detach().clone() for k, v in model.named_parameters()}
    plans = {0: ReplayPlan(sleep=True, replay=4, distill_weight=1.0, phase_step=0),
             1: ReplayPlan(sleep=True, replay=4, distill_weight=1.0, phase_step=1)}
    planner, _ = fit(model, plans, 2, save=tmp_path / "mid.ckpt")
    assert planner.stats[0]["distill_loss"] == pytest.approx(0.0, abs=1e-6)  # the student is the teacher at first
    assert planner.stats[1]["distill_loss"] > 0
    assert all(torch.equal(model._teacher[k], pre[k]) for k in pre)  # taken at phase step 0, kept at 1
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert set(ckpt[TEACHER_KEY]) == set(pre) and ckpt[EPISODIC_KEY]["world_size"] == 1
    loaded = ByteLM.load_from_checkpoint(tmp_path / "mid.ckpt")
    assert all(torch.equal(loaded._teacher[k], pre[k]) for k in pre)
    for k, v in model.episodic.state_dict().items():
        assert torch.equal(loaded.episodic.state_dict()[k], v), k
    model.plan_step(WAKE)  # awake: the teacher is done
    assert model._teacher is None


def test_neat_model_stores_by_titans_surprise_and_adds_the_memory_term(monkeypatch):
    L.seed_everything(0)
    model = NeatModel(dim=32, n_layers=1, heads=2, block_size=16, window=8, svf=False, warmup_steps=1,
                      titans_config=TitansConfig(dim_memory=8, chunk_size=4, persistent_tokens=2, memory_size=32,
                                                 surprise_threshold=0.0),
                      episodic=EpisodicConfig(capacity=6, surprise="titans"))
    offered = []
    write = model.episodic.write
    monkeypatch.setattr(model.episodic, "write",
                        lambda rows, surprise, step, generator=None, loss=None: offered.append((surprise, loss))
                        or write(rows, surprise, step, generator, loss))
    planner, _ = fit(model, {0: WAKE, 1: ReplayPlan(sleep=True, replay=3, memory_weight=1.0)}, 2)
    surprise, loss = offered[0]
    assert surprise.shape == loss.shape == (4,) and not torch.allclose(surprise, loss)
    assert planner.stats[1]["memory_loss"] > 0 and planner.stats[1]["replayed"] == 3


def test_bad_plans_and_configs_are_refused():
    with pytest.raises(TypeError, match=r"ByteLM.plan_step expects a ReplayPlan, got dict"):
        lm().plan_step({"sleep": True})
    with pytest.raises(ValueError, match=r"ReplayPlan.replay=0 must be >= 1 for a sleep step"):
        ReplayPlan(sleep=True, replay=0)
    with pytest.raises(ValueError, match=r"ReplayPlan.rate=0 must be > 0"):
        ReplayPlan(rate=0)
    with pytest.raises(ValueError, match=r"episodic.surprise='titans': ByteLM has no Titans memory"):
        lm(episodic={"surprise": "titans"})
    with pytest.raises(ValueError, match=r"episodic.surprise='titans' needs the Titans memory"):
        NeatModel(dim=32, n_layers=1, heads=2, titans=False, svf=False, active_components=[],
                  episodic=EpisodicConfig(surprise="titans"))
    model = lm()
    with pytest.raises(RuntimeError, match=r"a sleep step was planned but the episodic buffer is empty"):
        fit(model, {0: ReplayPlan(sleep=True, replay=2)}, 1)
