import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from neat_lightning.callbacks.progressive_scaling import ProgressiveScaling, SizeStage, resample_optimizer_state
from neat_lightning.components.clustering import ClusteringConfig
from neat_lightning.components.lattice import LatticeConfig
from neat_lightning.components.lattice_faces import FaceTextConfig
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.lattice import LatticeNetwork, LatticeOptimConfig
from neat_lightning.protocols import GrownParameter

TINY = dict(lattice=LatticeConfig(depth=3, height=4, width=6, channels=4, hidden=8, steps=3, fire_rate=0.5),
            text=FaceTextConfig(encoder_dim=16, decoder_dim=16, heads=2, decoder_layers=1, max_question_bytes=24,
                                max_answer_bytes=20),
            clustering=ClusteringConfig(n_clusters=3), optim=LatticeOptimConfig(warmup_steps=1), metrics_every=1)
SCHEDULE = [SizeStage(0, (3, 4, 6)), SizeStage(1, (4, 5, 6)), SizeStage(3, (5, 6, 7))]


def tiny_data():
    return QADataModule(max_operand=5, max_factor=3, max_question_bytes=24, max_answer_bytes=20, batch_size=4,
                        batches_per_epoch=100, val_batch_size=8, max_val_pairs=8)


def trainer(root, max_steps, callbacks):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     max_steps=max_steps, default_root_dir=root, callbacks=callbacks, deterministic=True,
                     limit_val_batches=0)


def test_growth_checkpoint_resume_is_exact(tmp_path):
    """Grow at step 1 and 3 of 4; a checkpoint at step 2 (after the first growth) loads alone at the grown size,
    and resuming from it reproduces the uninterrupted run's weights, buffers and size exactly."""

    def run(root, ckpt=None):
        L.seed_everything(3)
        m = LatticeNetwork(**TINY)
        every = ModelCheckpoint(dirpath=tmp_path / root, every_n_train_steps=2, save_top_k=-1)
        trainer(tmp_path / root, 4, [ProgressiveScaling(SCHEDULE), every]).fit(m, tiny_data(), ckpt_path=ckpt)
        return m

    full = run("full")
    assert full.config.size == (5, 6, 7) and full.config.steps == 3 + 1 + 1
    mid = next(p for p in (tmp_path / "full").glob("*.ckpt") if "step=2" in p.name)
    loaded = LatticeNetwork.load_from_checkpoint(mid)
    assert loaded.config.size == (4, 5, 6) and loaded.cells.connections.shape == (4, 5, 6, 26)
    assert loaded.encoder.cell_bias.shape == (30, 4)
    resumed = run("resumed", ckpt=str(mid))
    assert resumed.config.size == full.config.size
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_grow_transfers_weights_and_optimizer_state():
    torch.manual_seed(0)
    m = LatticeNetwork(**TINY)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    q, a = torch.randint(4, 100, (2, 24)), torch.randint(4, 100, (2, 6))
    m.loss({"question": q, "answer": a}, stochastic=True)[0].backward()
    opt.step()
    rule_before = {k: v.clone() for k, v in m.rule.state_dict().items()}
    conn = m.cells.connections.clone()
    bias = m.encoder.cell_bias
    cb = ProgressiveScaling([SizeStage(0, (5, 7, 11))])

    class T:  # the two trainer attributes grow() reads
        optimizers = [opt]

    cb.grow(T(), m, (5, 7, 11))
    assert m.encoder.cell_bias is bias and bias.shape == (77, 4)  # same Parameter object, new shape
    assert opt.state[bias]["exp_avg"].shape == (77, 4) and (opt.state[bias]["exp_avg_sq"] >= 0).all()
    # corners are kept exactly by align_corners resampling
    assert torch.allclose(m.cells.connections[0, 0, 0], conn[0, 0, 0])
    assert torch.allclose(m.cells.connections[-1, -1, -1], conn[-1, -1, -1])
    assert all(torch.equal(v, m.rule.state_dict()[k]) for k, v in rule_before.items() if "msg" not in k)
    m.loss({"question": q, "answer": a}, stochastic=True)[0].backward()
    opt.step()  # the optimizer continues with resampled moments
    assert torch.isfinite(bias).all()


def test_memory_budget_stops_growth(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**TINY)
    cb = ProgressiveScaling([SizeStage(0, (3, 4, 6)), SizeStage(1, (96, 128, 128))], memory_budget_gb=2.0)
    trainer(tmp_path, 2, [cb]).fit(m, tiny_data())
    assert m.config.size == (3, 4, 6) and cb.stopped_at == (96, 128, 128)
    assert ProgressiveScaling().schedule[-1].size == (96, 128, 128)  # the default schedule ends at 128x128x96 (WxHxD)


def test_never_shrinks():
    m = LatticeNetwork(**TINY)
    cb = ProgressiveScaling([SizeStage(0, (2, 4, 6)), SizeStage(1, (5, 3, 9))])

    class T:
        global_step = 0
        optimizers = []

    for step in (0, 1):
        T.global_step = step
        cb.on_train_batch_start(T(), m, None, 0)
        assert m.config.size == (3, 4, 6)


def test_bad_schedule_and_module():
    with pytest.raises(ValueError, match=r"schedule\[0\].start=5 must be 0"):
        ProgressiveScaling([SizeStage(5, (4, 4, 4))])
    with pytest.raises(ValueError, match=r"schedule\[1\].start=0 must be > schedule\[0\].start=0"):
        ProgressiveScaling([SizeStage(0, (4, 4, 4)), SizeStage(0, (5, 5, 5))])
    with pytest.raises(ValueError, match=r"schedule\[0\].size=\[0, 4, 4\] must be three positive ints"):
        ProgressiveScaling([SizeStage(0, (0, 4, 4))])
    with pytest.raises(ValueError, match="memory_budget_gb=0 must be > 0"):
        ProgressiveScaling(memory_budget_gb=0)
    with pytest.raises(TypeError, match="ProgressiveScaling needs a module implementing the Growable protocol"):
        ProgressiveScaling().setup(None, L.LightningModule(), "fit")


def test_the_callback_reads_the_module_only_through_growable():
    """A plain module implementing the three Growable methods grows, and its optimizer state is resampled by each
    parameter's own resampling; nothing else of the module is read."""

    class Cube(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.size = (2, 2, 2)
            self.w = torch.nn.Parameter(torch.ones(2))

        def current_size(self):
            return self.size

        def estimate_memory(self, size, batch=1, precision="32-true"):
            return size[0] * 2**30

        def grow(self, size, steps=None):
            old = tuple(self.w.shape)
            self.w.data = torch.ones(size[0])
            self.size = tuple(size)
            return {"w": GrownParameter(self.w, old, lambda t: t.new_full((size[0],), float(t.sum())))}

    m = Cube()
    opt = torch.optim.SGD([m.w], lr=0.1, momentum=0.9)
    opt.state[m.w]["momentum_buffer"] = torch.ones(2)

    class T:
        global_step, optimizers, precision = 1, [opt], "32-true"

    cb = ProgressiveScaling([SizeStage(0, (2, 2, 2)), SizeStage(1, (3, 2, 2))], memory_budget_gb=3.5)
    cb.setup(None, m, "fit")
    cb.on_train_batch_start(T(), m, torch.zeros(4, 1), 0)
    assert m.size == (3, 2, 2) and torch.equal(opt.state[m.w]["momentum_buffer"], torch.full((3,), 2.0))
    cb = ProgressiveScaling([SizeStage(0, (3, 2, 2)), SizeStage(1, (4, 2, 2))], memory_budget_gb=3.5)
    cb.on_train_batch_start(T(), m, torch.zeros(4, 1), 0)  # 4 GiB > 3.5: refused
    assert m.size == (3, 2, 2) and cb.stopped_at == (4, 2, 2)
    assert resample_optimizer_state(opt, {}) == 0
