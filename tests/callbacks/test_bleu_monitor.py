import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from neat_lightning.callbacks.bleu_monitor import DecoderBLEUMonitor, corpus_bleu, exact_match
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.byte_lm import ByteLM
from neat_lightning.modules.lattice import LatticeNetwork

TINY_LATTICE = dict(lattice=dict(depth=2, height=4, width=6, channels=4, hidden=8, steps=2),
                    text=dict(encoder_dim=16, decoder_dim=16, heads=2, decoder_layers=1, max_question_bytes=24,
                              max_answer_bytes=20))


def trainer(tmp_path, steps, callbacks, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     max_steps=steps, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0,
                     enable_checkpointing=kw.pop("enable_checkpointing", False), **kw)


def qa_data():
    return QADataModule(max_operand=5, max_factor=3, max_question_bytes=24, max_answer_bytes=20, batch_size=4,
                        batches_per_epoch=50, max_val_pairs=8)


def test_corpus_bleu_and_exact_match():
    refs = ["the cat sat on the mat", "12 plus 7 is 19."]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["dog", "nothing"], refs) < 5
    assert exact_match([" 12 plus 7 is 19. ", "x"], refs[::-1]) == 0.5
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(refs, refs[:1])


def test_works_with_bytelm_and_fixed_prompts(tmp_path, caplog):
    torch.manual_seed(0)
    model = ByteLM(dim=32, n_layers=1, heads=2, block_size=32, warmup_steps=1)
    data = ByteTextDataModule(block_size=32, batch_size=2, batches_per_epoch=10)
    monitor = DecoderBLEUMonitor(every_n_steps=2, prompts=["def ", "The "], references=["foo()", "end"],
                                 max_new_bytes=4)
    t = trainer(tmp_path, 4, [monitor])
    t.fit(model, data)
    assert [s for s, _ in monitor.history] == [2, 4]
    assert all(0.0 <= b <= 100.0 for _, b in monitor.history)
    assert "val/bleu" in t.callback_metrics and "bleu/overhead" in t.callback_metrics
    assert 0.0 < float(t.callback_metrics["bleu/overhead"]) < 1.0


def test_prompts_from_datamodule_and_overhead_is_measured(tmp_path):
    torch.manual_seed(0)
    monitor = DecoderBLEUMonitor(every_n_steps=3, n_prompts=4, max_new_bytes=8)
    t = trainer(tmp_path, 3, [monitor])
    t.fit(LatticeNetwork(**TINY_LATTICE), qa_data())
    assert len(monitor.prompts) == 4 and len(monitor.references) == 4
    assert len(monitor.history) == 1
    assert monitor.monitor_seconds > 0
    assert monitor.overhead() == pytest.approx(monitor.monitor_seconds / monitor.training_seconds(), rel=0.05)


class Scripted(L.LightningModule):
    """Generates the reference for the first ``good_calls`` calls, garbage afterwards."""

    def __init__(self, good_calls: int = 1):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.good_calls = 0, good_calls

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(100, 1), batch_size=1)

    def generate_text(self, prompts, max_new_bytes):
        self.calls += 1
        return ["a b c d e"] * len(prompts) if self.calls <= self.good_calls else ["zzz"] * len(prompts)


def test_stop_above_stops_and_alert_below_warns(tmp_path):
    mon = DecoderBLEUMonitor(every_n_steps=1, prompts=["q"], references=["a b c d e"], alert_below=50.0,
                             on_end=False)
    with pytest.warns(UserWarning, match=r"BLEU fell to 0.00, under alert_below=50.0"):
        trainer(tmp_path, 2, [mon]).fit(Scripted())
    stop = DecoderBLEUMonitor(every_n_steps=1, prompts=["q"], references=["a b c d e"], stop_above=99.0,
                              on_end=False)
    t = trainer(tmp_path, 10, [stop])
    t.fit(Scripted())
    assert t.global_step == 1 and stop.history == [(1, pytest.approx(100.0))]


def test_stop_decision_is_reduced_over_ranks_like_early_stopping(tmp_path, monkeypatch):
    """Every rank takes the strategy's reduced decision (any rank at the target stops all), as EarlyStopping does."""
    stop = DecoderBLEUMonitor(every_n_steps=1, prompts=["q"], references=["a b c d e"], stop_above=99.0,
                              on_end=False)
    t = trainer(tmp_path, 10, [stop])
    calls = []

    def another_rank_reached_it(decision, all=True):
        calls.append((bool(decision), all))
        return True

    monkeypatch.setattr(t.strategy, "reduce_boolean_decision", another_rank_reached_it)
    t.fit(Scripted(good_calls=0))  # this rank scores 0 BLEU, yet stops with the others
    assert calls == [(False, False)] and t.global_step == 1 and stop.history == [(1, pytest.approx(0.0))]


def test_history_survives_resume(tmp_path):
    torch.manual_seed(0)
    monitor = DecoderBLEUMonitor(every_n_steps=2, n_prompts=2, max_new_bytes=4, on_end=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    t = trainer(tmp_path, 2, [monitor, ckpt], enable_checkpointing=True)
    t.fit(LatticeNetwork(**TINY_LATTICE), qa_data())
    path = next(tmp_path.glob("*step=2*.ckpt"))
    resumed = DecoderBLEUMonitor(every_n_steps=2, n_prompts=2, max_new_bytes=4, on_end=False)
    t2 = trainer(tmp_path / "r", 4, [resumed])
    t2.fit(LatticeNetwork(**TINY_LATTICE), qa_data(), ckpt_path=str(path))
    assert [s for s, _ in resumed.history] == [2, 4]
    assert resumed.history[0] == monitor.history[0]
    assert resumed.monitor_seconds > monitor.monitor_seconds


def test_setup_errors(tmp_path):
    class Mute(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="DecoderBLEUMonitor needs a module implementing the TextGenerator protocol, "
                                        "but Mute lacks `generate_text`"):
        DecoderBLEUMonitor().setup(trainer(tmp_path, 1, []), Mute(), "fit")
    t = trainer(tmp_path, 1, [])
    t.datamodule = None
    with pytest.raises(ValueError, match="has no `validation_pairs"):
        DecoderBLEUMonitor().setup(t, LatticeNetwork(**TINY_LATTICE), "fit")


@pytest.mark.parametrize("kw, match", [
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"prompts": ["a"]}, "give both prompts and references"),
    ({"prompts": ["a", "b"], "references": ["x"]}, "prompts has 2 entries but references has 1"),
])
def test_argument_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DecoderBLEUMonitor(**kw)
