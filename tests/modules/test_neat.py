"""NeatModel: exact component bypasses, SVF z = 1, resume exactness, checkpoint rebuild, memory consolidation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from neat_lightning.callbacks.component_schedule import ComponentSchedule
from neat_lightning.components.svf import svf_layers
from neat_lightning.components.titans import TitansConfig
from neat_lightning.data.math import TASK_TYPES, MathDataModule
from neat_lightning.modules.neat import NeatModel
from neat_lightning.modules.neat_config import SVFConfig
from neat_lightning.modules.neat_output import NeatOutput, exact_match_counts
from neat_lightning.protocols import ComponentSwitchable, MemoryConsolidator, MemoryPrunable, TextGenerator

TINY_TITANS = TitansConfig(dim_memory=8, chunk_size=8, persistent_tokens=2, memory_size=16, surprise_threshold=0.5)


def tiny(seed: int = 0, svf_kw: dict | None = None, **kw) -> NeatModel:
    torch.manual_seed(seed)
    svf_config = SVFConfig(**{"rank": 4, "dispatch_prefix": 8, **(svf_kw or {})})
    args = dict(dim=16, n_layers=2, heads=2, block_size=112, window=8, titans_config=TINY_TITANS,
                svf_config=svf_config, warmup_steps=2, active_components=[])
    return NeatModel(**{**args, **kw})


def tiny_data(**kw) -> MathDataModule:
    args = dict(block_size=112, batch_size=2, batches_per_epoch=50, val_batches=1, gap_range=(0, 24), difficulties=[1])
    return MathDataModule(**{**args, **kw})


def trainer(tmp_path, steps: int, callbacks=(), **kw) -> L.Trainer:
    args = dict(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks))
    return L.Trainer(**{**args, **kw})


def batch_ids(n: int = 3) -> torch.Tensor:
    return tiny_data(batch_size=n).dataset("val").batch(0)["ids"][:, :-1]


def test_implements_the_protocols():
    model = tiny()
    for protocol in (ComponentSwitchable, MemoryConsolidator, MemoryPrunable, TextGenerator):
        assert isinstance(model, protocol)
    assert model.component_names() == ("titans", "svf")
    with pytest.raises(ValueError, match=r"unknown component 'blt'; this NeatModel has \['titans', 'svf'\]"):
        model.set_component_active("blt", True)
    with pytest.raises(ValueError, match=r"active_components: 'svf' is not a built component"):
        tiny(svf=False, active_components=["svf"])
    with pytest.raises(ValueError, match=r"memory_layers=\[5\]: layer 5 is not in \[0, n_layers=2\)"):
        tiny(memory_layers=[5])


def test_switched_off_titans_is_bit_identical_to_a_model_built_without_it():
    with_memory, without = tiny(svf=False), tiny(titans=False, svf=False)
    shared = without.state_dict()
    assert all(torch.equal(with_memory.state_dict()[k], v) for k, v in shared.items())
    ids = batch_ids()
    assert torch.equal(with_memory(ids), without(ids))
    with_memory.set_component_active("titans", True)
    assert not torch.allclose(with_memory(ids), without(ids))
    with_memory.set_component_active("titans", False)
    assert torch.equal(with_memory(ids), without(ids))


def test_switched_off_svf_is_bit_identical_and_z_one_reproduces_the_base():
    with_svf, without = tiny(titans=False), tiny(titans=False, svf=False)
    ids = batch_ids()
    base = without(ids)
    assert torch.equal(with_svf(ids), base)
    with_svf.set_component_active("svf", True)
    assert all(bool(layer.decomposed) for layer in svf_layers(with_svf.model))
    for mix in (None, torch.eye(8)[[0, 3, 7]], torch.full((3, 8), 1 / 8)):
        assert (with_svf(ids, mix=mix) - base).abs().max() <= 1e-5
    with torch.no_grad():
        for layer in svf_layers(with_svf.model):
            layer.z[3].mul_(1.5)
    assert (with_svf(ids, mix=torch.eye(8)[[3, 3, 3]]) - base).abs().max() > 1e-3
    assert torch.equal(with_svf(ids, mix=torch.eye(8)[[0, 0, 0]]), with_svf(ids, mix=None))


def test_svf_training_moves_only_z_and_the_dispatcher(tmp_path):
    model = tiny(active_components=["svf"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, 3).fit(model, tiny_data())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(".z") or k.startswith("dispatcher.") for k in changed), changed


def test_svf_train_experts_trains_only_the_chosen_expert(tmp_path):
    model = tiny(titans=False, active_components=["svf"], svf_kw=dict(train_experts=["arithmetic"]))
    before = [layer.z.detach().clone() for layer in svf_layers(model.model)]
    trainer(tmp_path, 3).fit(model, tiny_data(tasks=["arithmetic", "algebra"]))
    after = [layer.z.detach() for layer in svf_layers(model.model)]
    moved = {i for b, a in zip(before, after) for i in range(len(b)) if not torch.equal(b[i], a[i])}
    assert moved == {TASK_TYPES.index("arithmetic")}
    with pytest.raises(ValueError, match=r"SVFConfig.train_experts: 'poetry' is not an expert"):
        tiny(svf_kw=dict(train_experts=["poetry"]))


def fit(tmp_path, steps: int, resume=None, save_at: int | None = None) -> NeatModel:
    L.seed_everything(0)
    model = tiny()
    schedule = ComponentSchedule(activate={"titans": 1, "svf": 3})
    t = trainer(tmp_path, steps, [schedule], deterministic=True)
    t.fit(model, tiny_data(), ckpt_path=resume)
    if save_at is not None:
        t.save_checkpoint(tmp_path / "half.ckpt")
    return model


def test_resume_is_exact_and_the_checkpoint_alone_rebuilds_the_structure(tmp_path):
    full = fit(tmp_path, 5)
    fit(tmp_path, 2, save_at=2)
    resumed = fit(tmp_path, 5, resume=tmp_path / "half.ckpt")
    assert full.active == resumed.active == {"titans", "svf"}
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # load_from_checkpoint alone: components, decomposition and z come back
    path = tmp_path / "full.ckpt"
    L.Trainer(logger=False, enable_progress_bar=False, max_steps=0).strategy.connect(full)
    torch.save({"state_dict": full.state_dict(), "hyper_parameters": dict(full.hparams),
                "pytorch-lightning_version": L.__version__, "neat_components": {"built": ["titans", "svf"],
                                                                                  "active": ["svf", "titans"]}}, path)
    loaded = NeatModel.load_from_checkpoint(path)
    assert loaded.active == {"titans", "svf"}
    assert all(bool(layer.decomposed) for layer in svf_layers(loaded.model))
    ids = batch_ids()
    full.eval()
    loaded.eval()
    assert torch.equal(full(ids), loaded(ids))
    with pytest.raises(ValueError, match=r"checkpoint components \['titans', 'svf'\] do not match"):
        NeatModel.load_from_checkpoint(path, svf=False)


def test_trainer_checkpoint_round_trip(tmp_path):
    model = tiny(active_components=["titans", "svf"])
    t = trainer(tmp_path, 2)
    t.fit(model, tiny_data())
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = NeatModel.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    model.eval()
    loaded.eval()
    assert loaded.active == {"titans", "svf"} and torch.equal(model(batch_ids()), loaded(batch_ids()))


def test_validation_reports_exact_match_per_task_type(tmp_path):
    model = tiny(active_components=["titans", "svf"])
    metrics = trainer(tmp_path, 1, limit_val_batches=None).validate(model, tiny_data(batch_size=14), verbose=False)[0]
    assert {"val/loss", "val/bpb", "val/exact_match", "val/dispatch_acc"} <= set(metrics)
    assert any(k.startswith("val/exact_match/") for k in metrics)


def test_exact_match_counts_whole_completions():
    targets = torch.tensor([[5, 6, 7, 8, 9, 10]])
    seg = torch.tensor([[0, 1, 1, 0, 2, 2]])
    logits = torch.nn.functional.one_hot(targets, 12).float()
    correct, total = exact_match_counts(logits, targets, seg, torch.tensor([2]), len(TASK_TYPES))
    assert total[2] == 2 and correct[2] == 2 and total.sum() == 2
    logits[0, 4] = torch.nn.functional.one_hot(torch.tensor(0), 12).float()  # one wrong byte in completion 2
    logits[0, 0] = logits[0, 4]  # a wrong byte outside completions does not count
    correct, _ = exact_match_counts(logits, targets, seg, torch.tensor([2]), len(TASK_TYPES))
    assert correct[2] == 1


def test_memory_consolidation_writes_episodes_into_the_slow_weights(tmp_path):
    model = tiny(active_components=["titans"])
    trainer(tmp_path, 2).fit(model, tiny_data())
    snap = model.memory_items()
    n = len(snap["importance"])
    assert n > 0 and snap["keys"].shape == snap["values"].shape == (n, 8) and (snap["importance"] > 0.5).all()
    assert (snap["layer"] == 0).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.consolidate_memory(steps=5, lr=0.5)
    assert report["items"] == n and report["consolidation_loss_after"] < report["consolidation_loss"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.blocks.1.memory.weights.0", "model.blocks.1.memory.weights.1"}
    model.reset_short_term()
    assert len(model.memory_items()["importance"]) == 0 and model.consolidation_loss() is None


@pytest.mark.parametrize("active", [[], ["titans"], ["titans", "svf"]])
def test_generate_text_is_greedy_and_streams_long_prompts(active):
    model = tiny(active_components=active)
    long_prompt = "Remember: cat=3.\n" + "the sun rose over the quiet hill. " * 8 + "\nQ: cat?\n"
    assert len(long_prompt) > 2 * model.config.block_size
    out = model.generate_text(["Q: 1+1=?\n", long_prompt], max_new_bytes=6)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert out == model.generate_text(["Q: 1+1=?\n", long_prompt], max_new_bytes=6)
    assert model.training  # mode restored


def test_consolidation_replays_a_given_draw_and_pruning_empties_the_least_important_slots(tmp_path):
    model = tiny(active_components=["titans"])
    trainer(tmp_path, 2).fit(model, tiny_data())
    snap = model.memory_items()
    n = len(snap["importance"])
    draw = {k: v[: n // 2] for k, v in snap.items()}  # a replay set in the snapshot's layout
    report = model.consolidate_memory(steps=3, lr=0.5, max_items=None, items=draw)
    assert report["items"] == n // 2 and report["consolidation_loss_after"] < report["consolidation_loss"]
    assert model.consolidation_loss(items={k: v[:0] for k, v in snap.items()}) is None  # nothing to replay
    before = model.memory_items()["importance"].sort().values
    assert model.prune_memory(0.25) == n // 4
    assert torch.equal(model.memory_items()["importance"].sort().values, before[n // 4 :])  # the least went


def test_loss_terms_returns_a_typed_output(tmp_path):
    model = tiny(active_components=["titans", "svf"])
    batch = tiny_data(batch_size=2).dataset("val").batch(0)
    out = model.loss_terms(batch)
    assert isinstance(out, NeatOutput)
    assert out.logits.shape == (2, 112, 260) and out.nats.shape == out.valid.shape == out.seg.shape == (2, 112)
    assert out.patch_lengths is None and out.mvot is None and out.dispatch_acc is not None
    assert out.backbone.hidden.shape == (2, 112, 16)
