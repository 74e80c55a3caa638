import dataclasses

import lightning as L
import pytest
import torch

from neat_lightning.callbacks.plasticity_stages import PlasticityStages, Stage
from neat_lightning.callbacks.progressive_scaling import ProgressiveScaling, SizeStage
from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.energy_flow import EnergyFlowConfig
from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.lattice_faces import FaceTextConfig
from neat_lightning.components.plasticity import PROFILES
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.base import FORMAT_KEY
from neat_lightning.modules.lattice import FLAT_FIELDS, GROUPS, LatticeNetwork, LatticeOptimConfig
from neat_lightning.protocols import Growable, Plastic, StagedLattice, TextGenerator
from tests.conftest import assert_lattice_resume_is_exact

TINY = dict(
    lattice=LatticeConfig(depth=3, height=4, width=6, channels=4, hidden=8, steps=3, fire_rate=0.5),
    text=FaceTextConfig(encoder_dim=16, decoder_dim=16, heads=2, decoder_layers=1, max_question_bytes=24,
                        max_answer_bytes=20),
    clustering=ClusteringConfig(n_clusters=3), optim=LatticeOptimConfig(warmup_steps=1), metrics_every=1,
)


def tiny(**changes) -> dict:
    """TINY's arguments with changes: a dict for a group changes those fields (``lattice={"depth": 4}``), any other
    value replaces the argument."""
    out = dict(TINY)
    for name, value in changes.items():
        if isinstance(value, dict):
            value = dataclasses.replace(out.get(name, GROUPS[name]()), **value)
        out[name] = value
    return out


def tiny_data(**kw):
    return QADataModule(**{**dict(max_operand=5, max_factor=3, max_question_bytes=24, max_answer_bytes=20,
                                  batch_size=4, batches_per_epoch=100, val_batch_size=8, max_val_pairs=8), **kw})


def trainer(tmp_path, max_steps, callbacks=(), **kw):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
        default_root_dir=tmp_path, callbacks=list(callbacks), deterministic=True, limit_val_batches=1,
        val_check_interval=max_steps, check_val_every_n_epoch=None, **kw,
    )


def test_protocols_and_generation():
    torch.manual_seed(0)
    m = LatticeNetwork(**TINY)
    assert all(isinstance(m, p) for p in (TextGenerator, Plastic, StagedLattice, Growable))
    out = m.generate_text(["What is 1 plus 2?", ""], max_new_bytes=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert m.training  # generation restores the mode


def test_loss_decreases_and_logs_lattice_metrics(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**TINY)
    t = trainer(tmp_path, 6, enable_checkpointing=False)
    w0 = m.cells.connections.clone()
    t.fit(m, tiny_data())
    for key in ("train/loss", "lattice/activity", "lattice/emergence", "lattice/clusters", "val/exact_match"):
        assert key in t.callback_metrics, key
    assert 0.0 <= float(t.callback_metrics["lattice/activity"]) <= 1.0
    assert not torch.equal(m.cells.connections, w0)  # plasticity ran


def test_baseline_has_no_lattice_and_same_rule_size():
    lat = LatticeNetwork(**TINY)
    base = LatticeNetwork(**tiny(use_lattice=False))
    n_rule = sum(p.numel() for p in lat.rule.parameters())
    n_adapter = sum(p.numel() for p in base.adapter.parameters())
    assert abs(n_rule - n_adapter) <= 2 * TINY["lattice"].channels + 1
    assert not hasattr(base, "rule")
    logits = base(torch.randint(4, 100, (2, 24)), torch.randint(4, 100, (2, 5)))
    assert logits.shape == (2, 5, 260)


def test_resize_refuses_a_face_too_small_for_the_question():
    with pytest.raises(ValueError, match=r"a 2x3 face cannot hold the encoder's 24 bytes"):
        LatticeNetwork(**TINY).resize_lattice((3, 2, 3))


def test_steps_must_reach_output_face():
    with pytest.raises(ValueError, match=r"steps=2 must be >= depth - 1 = 3"):
        LatticeNetwork(**tiny(lattice={"depth": 4, "steps": 2}))


def test_profile_prune_and_clusters_restore_from_checkpoint(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**TINY)
    stages = [Stage(0, "discovery"), Stage(2, "consolidation", clustering=True, sparsity=0.3)]
    t = trainer(tmp_path, 4, callbacks=[PlasticityStages(stages)])
    t.fit(m, tiny_data())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    assert m.profile == PROFILES["consolidation"] and m.clustering_enabled
    assert m.sparsity == pytest.approx(0.3, abs=0.01)
    loaded = LatticeNetwork.load_from_checkpoint(path)
    assert loaded.profile == m.profile and loaded.clustering_enabled
    assert torch.equal(loaded.cells.connection_mask, m.cells.connection_mask)
    assert torch.equal(loaded.cells.cluster_ids, m.cells.cluster_ids)
    assert torch.equal(loaded.cells.connections, m.cells.connections)


def test_grown_lattice_size_is_rebuilt_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = LatticeNetwork(**TINY)
    m.resize_lattice((3, 5, 6))  # what a growth callback would do
    assert m.cells.connections.shape == (3, 5, 6, 26) and m.structure["lattice"]["size"] == [3, 5, 6]
    with torch.no_grad():
        m.cells.connections.uniform_(0.5, 1.5)
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "pytorch-lightning_version": L.__version__}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "grown.ckpt")
    loaded = LatticeNetwork.load_from_checkpoint(tmp_path / "grown.ckpt")
    assert loaded.config.size == (3, 5, 6) and loaded.current_size() == (3, 5, 6)
    assert torch.equal(loaded.cells.connections, m.cells.connections)
    q = torch.randint(4, 100, (1, 24))
    a = torch.randint(4, 100, (1, 5))
    m.eval(), loaded.eval()
    assert torch.allclose(m(q, a), loaded(q, a))


def test_set_plasticity_profile_type_error():
    with pytest.raises(TypeError, match="profile must be a PlasticityProfile, got str"):
        LatticeNetwork(**TINY).set_plasticity_profile("learning")


@pytest.mark.parametrize("use_lattice", [True, False])
def test_resume_is_exact(tmp_path, use_lattice):
    """Full run of 4 steps (checkpointing at step 2) vs a resume from that mid-run checkpoint: identical weights,
    buffers (connections, pruning mask, cluster ids, traces) and profile. The stage table switches profile,
    clustering and pruning on both sides of the checkpoint."""

    def run(root, checkpoint, ckpt):
        L.seed_everything(7)
        m = LatticeNetwork(**tiny(use_lattice=use_lattice, clustering={"enabled": True, "coordination": 0.1}))
        stages = [Stage(0, "discovery"), Stage(2, "learning", clustering=True), Stage(3, "freeze", True, 0.5)]
        trainer(root, 4, callbacks=[PlasticityStages(stages), checkpoint]).fit(m, tiny_data(), ckpt_path=ckpt)
        return m

    assert_lattice_resume_is_exact(tmp_path, run)


def test_transport_lattice_answers_depend_on_the_question_at_init():
    """The quickstart's rule init and rotary decoder: at initialisation the output face already differs between
    questions (the default init makes it ~1e-8 apart at depth 15), and a checkpoint restores the same model."""
    torch.manual_seed(0)
    kw = tiny(lattice={"depth": 5, "steps": 5, "fire_rate": 1.0, "depth_taps": True, "rule_init": "transport"},
              text={"decoder_cell_rope": True})
    m = LatticeNetwork(**kw).eval()
    q = torch.randint(4, 260, (2, 24))
    memory, state, _ = m.encode_questions(q)
    face = m.encoder(q, 3)
    assert torch.allclose(state[-24:].transpose(0, 1), face, atol=1e-5)  # the input face, 4 planes on
    assert (memory[0] - memory[1]).abs().mean() > 0.1
    m2 = LatticeNetwork(**kw)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.eval()(q, q[:, :5]), m(q, q[:, :5]))


# -- scale: stencils without index buffers, activation checkpointing, energy-flow mode -------------------------------


def test_shift_stencil_and_checkpointing_match_the_sparse_step():
    """stencil="shift" and checkpoint_every=2 give the same loss and gradients as the CSR path without
    checkpointing (same random firing masks)."""
    q, a = torch.randint(4, 100, (2, 24)), torch.randint(4, 100, (2, 6))
    grads = []
    for kw in ({}, {"stencil": "shift"}, {"stencil": "shift", "checkpoint_every": 2}, {"checkpoint_every": 5}):
        torch.manual_seed(0)
        m = LatticeNetwork(**tiny(lattice={"steps": 4, **kw}))
        loss, _ = m.loss({"question": q, "answer": a}, stochastic=True)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()], m._last_activity))
    for loss, g, act in grads[1:]:
        assert torch.allclose(loss, grads[0][0], atol=1e-6)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g, grads[0][1]))
        assert torch.allclose(act, grads[0][2], atol=1e-6)


def test_energy_flow_mode_trains_and_checks_its_config_on_load(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**tiny(mode="energy_flow", energy_flow={"carriers": 64}))
    assert not hasattr(m, "rule") and hasattr(m, "flow")
    before = [p.clone() for p in m.flow.parameters()]
    t = trainer(tmp_path, 3)
    t.fit(m, tiny_data())
    assert torch.isfinite(torch.tensor(float(t.callback_metrics["train/loss"])))
    assert any(not torch.equal(b, p) for b, p in zip(before, m.flow.parameters()))  # gradients reach the carriers
    t.save_checkpoint(tmp_path / "flow.ckpt")
    loaded = LatticeNetwork.load_from_checkpoint(tmp_path / "flow.ckpt")
    assert loaded.hparams.mode == "energy_flow"
    with pytest.raises(ValueError, match="written with mode='energy_flow' but this LatticeNetwork has mode='nca'"):
        LatticeNetwork.load_from_checkpoint(tmp_path / "flow.ckpt", mode="nca")
    with pytest.raises(ValueError, match="energy_flow.carriers=64 but this LatticeNetwork has energy_flow.carriers=32"):
        LatticeNetwork.load_from_checkpoint(tmp_path / "flow.ckpt", energy_flow=EnergyFlowConfig(carriers=32))


def test_release_memory_drops_the_cached_activity():
    m = LatticeNetwork(**TINY)
    m.loss({"question": torch.randint(4, 100, (2, 24)), "answer": torch.randint(4, 100, (2, 6))}, stochastic=True)
    assert m.release_memory() > 0 and m._last_activity is None and m.release_memory() == 0


def test_bad_scale_arguments():
    with pytest.raises(ValueError, match="mode='cellular' must be 'nca' or 'energy_flow'"):
        LatticeNetwork(**tiny(mode="cellular"))
    with pytest.raises(ValueError, match="checkpoint_every=-1 must be >= 0"):
        LatticeNetwork(**tiny(lattice={"checkpoint_every": -1}))
    with pytest.raises(ValueError, match="stencil='dense' must be 'sparse' or 'shift'"):
        LatticeNetwork(**tiny(lattice={"stencil": "dense"}))


def test_rule_learning_rate_scale(tmp_path):
    """``rule_lr_scale`` gives the lattice rule its own learning rate under the same warm-up/cosine schedule."""
    m = LatticeNetwork(**tiny(optim={"rule_lr_scale": 0.1}))
    t = trainer(tmp_path, 2, enable_checkpointing=False)
    t.fit(m, tiny_data())
    rule = {id(p) for p in m.rule.parameters()}
    groups = t.optimizers[0].param_groups
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    for g in groups:
        is_rule = {id(p) in rule for p in g["params"]}
        assert len(is_rule) == 1
        assert g["initial_lr"] == pytest.approx(TINY["optim"].learning_rate * (0.1 if is_rule.pop() else 1.0))
    with pytest.raises(ValueError, match="rule_lr_scale=-1.0 must be >= 0"):
        LatticeNetwork(**tiny(optim={"rule_lr_scale": -1.0}))
    # no rule to scale (energy flow, baseline): one learning rate
    for kw in (dict(mode="energy_flow"), dict(use_lattice=False)):
        opt = LatticeNetwork(**tiny(optim={"rule_lr_scale": 0.1}, **kw)).configure_optimizers()["optimizer"]
        assert {g["lr"] for g in opt.param_groups} == {TINY["optim"].learning_rate}


# -- typed argument groups and format-1 checkpoints ------------------------------------------------------------------


def test_groups_accept_their_dataclass_or_a_dict_and_refuse_anything_else():
    a = LatticeNetwork(**TINY)
    b = LatticeNetwork(**{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in TINY.items()})
    assert a.config == b.config and a.hparams == b.hparams
    assert a.hparams["lattice"]["depth"] == 3 and a.hparams["clustering"]["n_clusters"] == 3
    with pytest.raises(TypeError, match="text must be a FaceTextConfig, got int"):
        LatticeNetwork(**tiny(text=3))


def test_every_format_1_argument_has_a_place():
    """FLAT_FIELDS maps each old flat argument to an existing field of its group; only min_energy and the
    emergence-feedback options (added with format 2, off by default) are new."""
    for old, (group, field) in FLAT_FIELDS.items():
        assert field in {f.name for f in dataclasses.fields(GROUPS[group])}, (old, group, field)
    targets = set(FLAT_FIELDS.values())
    new = {(g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)} - targets
    assert new == {("energy_flow", "min_energy"), ("plasticity", "emergence_feedback"),
                   ("plasticity", "emergence_pruning"), ("plasticity", "emergence_strength"),
                   ("plasticity", "emergence_window")}
    assert len(FLAT_FIELDS) + 4 == 49  # the 49 flat arguments, 4 of which (use_lattice, mode, ...) kept their place


def format_1(path, out):
    """Rewrite a checkpoint written by this code into the format-1 layout: flat hyperparameters, per-cell buffers at
    the top of the state dict, flat field names in the structural record, no format number."""
    ckpt = torch.load(path, weights_only=False)
    back = {v: k for k, v in FLAT_FIELDS.items()}
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in GROUPS}
    for group in GROUPS:
        for field, value in ckpt["hyper_parameters"][group].items():
            if (group, field) in back:
                hp[back[group, field]] = value
    ckpt["hyper_parameters"] = hp
    ckpt["state_dict"] = {k.removeprefix("cells."): v for k, v in ckpt["state_dict"].items()}
    record = ckpt["neat_structure"]["lattice"]
    record["fields"] = {back.get(tuple(k.split(".")), k): v for k, v in record["fields"].items()}
    del ckpt[FORMAT_KEY]
    torch.save(ckpt, out)
    return out


def test_format_1_checkpoint_loads_and_resumes_identically(tmp_path):
    """A checkpoint in the format-1 layout (flat arguments, buffers outside ``cells``) loads with the same weights,
    buffers, size, profile and outputs, and a ``ckpt_path`` resume from it ends where the current format's does."""
    L.seed_everything(1)
    m = LatticeNetwork(**tiny(clustering={"coordination": 0.1}))
    stages = [Stage(0, "discovery"), Stage(1, "learning", clustering=True, sparsity=0.2)]

    def callbacks():
        return [PlasticityStages(stages), ProgressiveScaling([SizeStage(0, (3, 4, 6)), SizeStage(1, (4, 5, 6))])]

    t = trainer(tmp_path / "a", 2, callbacks=callbacks())
    t.fit(m, tiny_data())
    t.save_checkpoint(tmp_path / "new.ckpt")
    old = format_1(tmp_path / "new.ckpt", tmp_path / "old.ckpt")
    flat = torch.load(old, weights_only=True)  # plain values in both formats
    assert flat["hyper_parameters"]["depth"] == 3 and "connections" in flat["state_dict"]
    assert "lattice" not in flat["hyper_parameters"] and FORMAT_KEY not in flat

    loaded = LatticeNetwork.load_from_checkpoint(old)
    assert loaded.hparams == m.hparams and loaded.current_size() == (4, 5, 6)
    assert loaded.profile == m.profile and loaded.clustering_enabled and loaded.sparsity == m.sparsity
    own = m.state_dict()
    assert loaded.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    q, a = torch.randint(4, 100, (2, 24)), torch.randint(4, 100, (2, 5))
    m.eval(), loaded.eval()
    assert torch.equal(m(q, a), loaded(q, a))

    def resume(ckpt, root):
        L.seed_everything(2)
        r = LatticeNetwork(**tiny(clustering={"coordination": 0.1}))
        trainer(tmp_path / root, 4, callbacks=callbacks()).fit(r, tiny_data(), ckpt_path=str(ckpt))
        return r

    a, b = resume(tmp_path / "new.ckpt", "b"), resume(old, "c")
    assert a.current_size() == b.current_size() == (4, 5, 6)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
