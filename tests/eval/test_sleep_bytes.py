"""ByteLM two-domain protocol: held-out windows, bits per byte, one tiny run per arm."""

from __future__ import annotations

import math

import pytest
import torch

from neat_lightning.eval.sleep_bytes import ContinualConfig, DomainBatches, bits_per_byte, heldout, run_bytes_arm
from neat_lightning.eval.sleep_wake import SleepSettings
from neat_lightning.modules.byte_lm import ByteLM

TINY = ContinualConfig(domain_steps=4, batch_size=2, block_size=16, dim=16, n_layers=1, heads=2, eval_windows=4,
                       eval_every=2, sleep=SleepSettings(wake_steps=2, sleep_steps=1, replay_size=2, capacity=8))


def test_domains_give_pure_batches_and_heldout_windows():
    a = DomainBatches("pydoc_topics", 16, 3, seed=0, index=0)
    assert a.batch(5).shape == (3, 17) and torch.equal(a.batch(5), a.batch(5))
    assert not torch.equal(a.batch(5), DomainBatches("stdlib_code", 16, 3, seed=0, index=1).batch(5))
    held = heldout("stdlib_code", 16, 4)
    assert held.shape == (4, 17) and torch.equal(held, heldout("stdlib_code", 16, 4))


def test_bits_per_byte_is_the_mean_loss_in_bits():
    model = ByteLM(dim=16, n_layers=1, heads=2, block_size=16)
    windows = heldout("pydoc_topics", 16, 4)
    loss, _ = model.loss(windows)
    assert bits_per_byte(model, windows, batch_size=3) == pytest.approx(float(loss) / math.log(2), rel=1e-5)
    assert model.training  # mode restored


@pytest.mark.parametrize("arm", ["no_sleep", "replay", "sleep"])
def test_each_arm_runs_both_domains(arm):
    run = run_bytes_arm(TINY, 0, arm)
    assert run["wake_updates"] == 8 and run["steps"] == (12 if arm == "sleep" else 8)
    assert run["items_replayed"] == (0 if arm == "no_sleep" else 8)
    assert all(0 < run[k] < 10 for k in ("bpb_first", "bpb_second", "bpb_first_after_learning"))
    assert run["forgetting_bpb"] == pytest.approx(run["bpb_first"] - run["bpb_first_after_learning"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"ContinualConfig.first='wiki' must be one of"):
        ContinualConfig(first="wiki")
    with pytest.raises(ValueError, match=r"ContinualConfig.first and .second are both 'stdlib_code'"):
        ContinualConfig(first="stdlib_code")
