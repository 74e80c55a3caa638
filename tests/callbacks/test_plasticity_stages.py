import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from neat_lightning.callbacks.plasticity_stages import DEFAULT_STAGES, PlasticityStages, Stage, batch_size_of
from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.lattice_faces import FaceTextConfig
from neat_lightning.components.plasticity import PROFILES
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.lattice import LatticeNetwork

TINY = dict(lattice=LatticeConfig(depth=2, height=4, width=6, channels=4, hidden=8, steps=2),
            text=FaceTextConfig(encoder_dim=16, decoder_dim=16, heads=2, decoder_layers=1, max_question_bytes=24,
                                max_answer_bytes=20),
            clustering=ClusteringConfig(n_clusters=3))
STAGES = [Stage(0, "discovery"), Stage(2, "learning", clustering=True), Stage(3, "consolidation", True, 0.2),
          Stage(4, "freeze", True, 0.7)]


class Recorder(L.Callback):
    """Records the module's profile / clustering / sparsity at each training step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((pl_module.profile.name, pl_module.clustering_enabled, round(pl_module.sparsity, 2)))


def trainer(tmp_path, steps, callbacks):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     max_steps=steps, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0,
                     deterministic=True)


def data(batch_size=4):
    return QADataModule(max_operand=5, max_factor=3, max_question_bytes=24, max_answer_bytes=20,
                        batch_size=batch_size, batches_per_epoch=50)


def test_default_table_is_the_six_stage_developmental_schedule():
    assert [s.profile for s in DEFAULT_STAGES] == ["discovery", "learning", "learning", "consolidation",
                                                   "consolidation", "freeze"]
    assert [s.clustering for s in DEFAULT_STAGES] == [False, False, True, True, True, True]
    assert [s.sparsity for s in DEFAULT_STAGES] == [0, 0, 0, 0.2, 0.3, 0.7]


def test_stages_switch_by_step(tmp_path):
    torch.manual_seed(0)
    rec = Recorder()
    trainer(tmp_path, 5, [PlasticityStages(STAGES), rec]).fit(LatticeNetwork(**TINY), data())
    assert rec.seen == [("discovery", False, 0.0), ("discovery", False, 0.0), ("learning", True, 0.0),
                        ("consolidation", True, 0.2), ("freeze", True, 0.7)]


def test_stages_switch_by_samples(tmp_path):
    torch.manual_seed(0)
    rec = Recorder()
    stages = [Stage(0, "discovery"), Stage(8, "learning")]  # 4 samples per batch: stage 2 from the third batch
    cb = PlasticityStages(stages, unit="samples")
    trainer(tmp_path, 3, [cb, rec]).fit(LatticeNetwork(**TINY), data(batch_size=4))
    assert [p for p, _, _ in rec.seen] == ["discovery", "discovery", "learning"]
    assert cb.samples_seen == 12


def test_state_survives_mid_run_resume(tmp_path):
    def run(root, ckpt=None):
        L.seed_everything(3)
        cb = PlasticityStages(STAGES)
        every = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
        m = LatticeNetwork(**TINY)
        trainer(tmp_path / root, 5, [cb, every] if ckpt is None else [cb]).fit(m, data(), ckpt_path=ckpt)
        return m, cb

    full, cb_full = run("full")
    mid = next((tmp_path / "ck").glob("*step=3*.ckpt"))
    state = torch.load(mid, weights_only=True)["callbacks"]
    assert {"stage": 1, "samples_seen": 12} in state.values()  # batches 0-2 ran; batch 2 in stage 2
    resumed, cb_res = run("resumed", ckpt=str(mid))
    assert cb_res.state_dict() == cb_full.state_dict()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.profile == PROFILES["freeze"] and resumed.sparsity == pytest.approx(0.7, abs=1e-3)


def test_requires_plastic_module(tmp_path):
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="PlasticityStages needs a module implementing the Plastic protocol, but "
                                        "Plain lacks `set_plasticity_profile`"):
        PlasticityStages().setup(None, Plain(), "fit")

    class OnlyPlastic(L.LightningModule):
        def set_plasticity_profile(self, profile):
            pass

    with pytest.raises(TypeError, match="PlasticityStages needs a module implementing the StagedLattice protocol, but "
                                        "OnlyPlastic lacks `prune_connections`, `set_clustering_enabled`"):
        PlasticityStages().setup(None, OnlyPlastic(), "fit")
    cb = PlasticityStages([Stage(0, "learning")])
    cb.setup(None, OnlyPlastic(), "fit")  # no clustering/pruning: fine
    assert not cb.staged
    cb.apply(OnlyPlastic(), 0)  # and a stage only switches its profile


@pytest.mark.parametrize("stages, match", [
    ([], "stages=\\[\\]"),
    ([Stage(5)], "stages\\[0\\].start=5 must be 0"),
    ([Stage(0), Stage(0)], "stages\\[1\\].start=0 must be > stages\\[0\\].start=0"),
    ([Stage(0, "nap")], "stages\\[0\\].profile='nap' is unknown"),
    ([Stage(0, sparsity=1.0)], "stages\\[0\\].sparsity=1.0"),
])
def test_table_validation(stages, match):
    with pytest.raises(ValueError, match=match):
        PlasticityStages(stages)


def test_batch_size_of():
    assert batch_size_of({"question": torch.zeros(5, 3)}) == 5
    assert batch_size_of((torch.zeros(2), torch.zeros(3))) == 2


def test_stage_thresholds_override_the_profile(tmp_path):
    """0.01, 0.02, 0.03, 0.05 and 0.1 set per stage, on the module's profile in force at each step."""
    torch.manual_seed(0)
    thresholds = [0.01, 0.02, 0.03, 0.05, 0.1]
    stages = [Stage(i, "balanced" if i % 2 else "learning", activity_threshold=t) for i, t in enumerate(thresholds)]
    seen = []

    class Thresholds(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.profile.name, pl_module.profile.activity_threshold))

    trainer(tmp_path, 5, [PlasticityStages(stages), Thresholds()]).fit(LatticeNetwork(**TINY), data())
    assert seen == [("learning", 0.01), ("balanced", 0.02), ("learning", 0.03), ("balanced", 0.05),
                    ("learning", 0.1)]
    with pytest.raises(ValueError, match=r"stages\[0\].activity_threshold=1.5 must be in \[0, 1\)"):
        PlasticityStages([Stage(0, activity_threshold=1.5)])
    assert PlasticityStages([Stage(0, "balanced")]).stages[0].activity_threshold is None
