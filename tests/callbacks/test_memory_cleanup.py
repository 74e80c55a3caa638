import lightning as L
import pytest
import torch

from neat_lightning.callbacks.memory_cleanup import MemoryCleanup, releasables, rss_bytes
from neat_lightning.data.qa import QADataModule
from neat_lightning.modules.lattice import LatticeNetwork

TINY = dict(lattice=dict(depth=3, height=4, width=6, channels=4, hidden=8, steps=3),
            text=dict(encoder_dim=16, decoder_dim=16, heads=2, decoder_layers=1, max_question_bytes=24,
                      max_answer_bytes=20),
            metrics_every=1, optim=dict(warmup_steps=1))


class Cache(torch.nn.Module):
    """A submodule with a cache, implementing Releasable."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: torch.Tensor | None = None
        self.calls = 0

    def release_memory(self) -> int:
        self.calls += 1
        freed = self.cache.numel() * self.cache.element_size() if self.cache is not None else 0
        self.cache = None
        return freed


def test_cleanup_calls_release_memory_and_logs_rss(tmp_path):
    L.seed_everything(0)
    m = LatticeNetwork(**TINY)
    m.extra = Cache()
    m.extra.cache = torch.zeros(1000)
    assert releasables(m) == [m, m.extra]
    cb = MemoryCleanup(every_n_steps=1)
    data = QADataModule(max_operand=5, max_factor=3, max_question_bytes=24, max_answer_bytes=20, batch_size=4,
                        batches_per_epoch=100, val_batch_size=8, max_val_pairs=8)
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  max_steps=3, limit_val_batches=0, enable_checkpointing=False, callbacks=[cb])
    t.fit(m, data)
    assert cb.cleanups == 2 and m.extra.calls == 2  # before steps 1 and 2 (none before the first step)
    # the lattice's cached activity of the previous step and the extra cache were released
    assert cb.released_bytes >= 4000 + 2 * m.config.steps * 3 * 4 * 6 * 4
    rss = float(t.callback_metrics["memory/rss_mib"])
    assert rss > 50 and abs(rss - rss_bytes() / 2**20) < 0.5 * rss
    assert cb.state_dict() == {"cleanups": 2, "released_bytes": cb.released_bytes}


def test_state_round_trip_and_bad_arguments():
    cb = MemoryCleanup()
    cb.load_state_dict({"cleanups": 7, "released_bytes": 9})
    assert (cb.cleanups, cb.released_bytes, cb.every_n_steps) == (7, 9, 10)
    cb.load_state_dict({})  # older checkpoints without the keys
    assert cb.cleanups == 0
    with pytest.raises(ValueError, match="every_n_steps=0 must be >= 1"):
        MemoryCleanup(every_n_steps=0)
    with pytest.raises(ValueError, match="cuda_reserved_threshold_gb=-1 must be >= 0"):
        MemoryCleanup(cuda_reserved_threshold_gb=-1)
