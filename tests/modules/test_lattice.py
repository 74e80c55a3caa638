import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch

from neat_lightning.callbacks.plasticity_stages import PlasticityStages, Stage
from neat_lightning.components.plasticity import PROFILES
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.lattice import LatticeNetwork
from neat_lightning.protocols import Plastic, TextGenerator

TINY = dict(depth=3, height=4, width=6, channels=4, hidden=8, steps=3, fire_rate=0.5, encoder_dim=16, decoder_dim=16,
            heads=2, decoder_layers=1, max_question_bytes=24, max_answer_bytes=20, n_clusters=3, metrics_every=1,
            warmup_steps=1)


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
    assert isinstance(m, TextGenerator) and isinstance(m, Plastic)
    out = m.generate_text(["What is 1 plus 2?", ""], max_new_bytes=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert m.training  # generation restores the mode


def test_loss_decreases_and_logs_lattice_metrics(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**TINY)
    t = trainer(tmp_path, 6, enable_checkpointing=False)
    w0 = m.connections.clone()
    t.fit(m, tiny_data())
    for key in ("train/loss", "lattice/activity", "lattice/emergence", "lattice/clusters", "val/exact_match"):
        assert key in t.callback_metrics, key
    assert 0.0 <= float(t.callback_metrics["lattice/activity"]) <= 1.0
    assert not torch.equal(m.connections, w0)  # plasticity ran


def test_baseline_has_no_lattice_and_same_rule_size():
    lat = LatticeNetwork(**TINY)
    base = LatticeNetwork(**{**TINY, "use_lattice": False})
    n_rule = sum(p.numel() for p in lat.rule.parameters())
    n_adapter = sum(p.numel() for p in base.adapter.parameters())
    assert abs(n_rule - n_adapter) <= 2 * TINY["channels"] + 1
    assert not hasattr(base, "rule")
    logits = base(torch.randint(4, 100, (2, 24)), torch.randint(4, 100, (2, 5)))
    assert logits.shape == (2, 5, 260)


def test_resize_refuses_a_face_too_small_for_the_question():
    with pytest.raises(ValueError, match=r"a 2x3 face cannot hold the encoder's 24 bytes"):
        LatticeNetwork(**TINY).resize_lattice((3, 2, 3))


def test_steps_must_reach_output_face():
    with pytest.raises(ValueError, match=r"steps=2 must be >= depth - 1 = 3"):
        LatticeNetwork(**{**TINY, "depth": 4, "steps": 2})


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
    assert torch.equal(loaded.connection_mask, m.connection_mask)
    assert torch.equal(loaded.cluster_ids, m.cluster_ids)
    assert torch.equal(loaded.connections, m.connections)


def test_grown_lattice_size_is_rebuilt_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = LatticeNetwork(**TINY)
    m.resize_lattice((3, 5, 6))  # what a growth callback would do
    assert m.connections.shape == (3, 5, 6, 26) and m.structure["lattice"]["size"] == [3, 5, 6]
    with torch.no_grad():
        m.connections.uniform_(0.5, 1.5)
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "pytorch-lightning_version": L.__version__}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "grown.ckpt")
    loaded = LatticeNetwork.load_from_checkpoint(tmp_path / "grown.ckpt")
    assert loaded.config.size == (3, 5, 6)
    assert torch.equal(loaded.connections, m.connections)
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

    def run(root, ckpt=None):
        L.seed_everything(7)
        m = LatticeNetwork(**{**TINY, "use_lattice": use_lattice, "clustering": True, "cluster_coordination": 0.1})
        stages = [Stage(0, "discovery"), Stage(2, "learning", clustering=True), Stage(3, "freeze", True, 0.5)]
        every = ModelCheckpoint(dirpath=tmp_path / root, every_n_train_steps=2, save_top_k=-1)
        t = trainer(tmp_path / root, 4, callbacks=[PlasticityStages(stages), every])
        t.fit(m, tiny_data(), ckpt_path=ckpt)
        return m

    full = run("full")
    mid = next(p for p in (tmp_path / "full").glob("*.ckpt") if "step=2" in p.name)
    resumed = run("resumed", ckpt=str(mid))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.profile == full.profile and resumed.sparsity == full.sparsity
