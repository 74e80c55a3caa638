"""SceneDataModule: train/val split by scene id, the switch from a pretraining DataModule, replay."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.codec import EOS_ID, decode, encode
from neat_lightning.data.bytes import ByteTextDataModule, RandomWindowBatches
from neat_lightning.data.scenes import SceneDataModule


def test_datamodule_split_and_batches():
    dm = SceneDataModule(block_size=32, batch_size=3, batches_per_epoch=5)
    dm.setup("fit")
    train_ids = {d.name for d in dm.train_docs}
    val_ids = {d.name for d in dm.val_docs}
    assert train_ids and val_ids and not train_ids & val_ids
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(b.shape == (3, 33) and b.dtype == torch.int64 for b in batches)
    windows = torch.cat(list(dm.val_dataloader()))  # (N, 33), consecutive windows overlap by one id
    ids = torch.cat([windows[0, :1], windows[:, 1:].reshape(-1)])
    text = decode(torch.where(ids == EOS_ID, encode("\n")[0], ids))  # decode stops at EOS
    assert text.count("SCENE ") == len(val_ids)  # every held-out scene is covered, once


def test_val_scenes_are_held_out_by_id_and_unknown_ids_fail():
    dm = SceneDataModule(val_scenes=["market-haggle", "vet-bad-news"], block_size=16, batch_size=2)
    dm.setup("fit")
    assert sorted(d.name for d in dm.val_docs) == ["market-haggle", "vet-bad-news"]
    with pytest.raises(ValueError, match=r"val_scenes: unknown scene ids \['nope'\]"):
        SceneDataModule(val_scenes=["nope"]).setup("fit")


def test_switch_from_pretrain_happens_at_the_scheduled_batch_mid_epoch():
    pretrain = ByteTextDataModule(block_size=16, batch_size=2, batches_per_epoch=6)
    dm = SceneDataModule(block_size=16, batch_size=2, pretrain=pretrain)
    dm.setup("fit")
    dm.schedule_switch(step=4)
    got = list(dm.train_dataloader())
    want_pretrain = list(pretrain.train_dataloader())
    scenes = RandomWindowBatches(dm.train_stream, 16, 2, 6, dm.seed)
    assert len(got) == 6
    assert all(torch.equal(got[k], want_pretrain[k]) for k in range(4))
    assert all(torch.equal(got[k], scenes.batch(k)) for k in range(4, 6))
    dm.schedule_switch(epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(dm.train_dataloader(), want_pretrain))  # epoch 0: pretrain only


def test_replay_mixes_pretraining_rows_into_scene_batches():
    pretrain = ByteTextDataModule(block_size=16, batch_size=4, batches_per_epoch=6)
    dm = SceneDataModule(block_size=16, batch_size=4, pretrain=pretrain, replay=0.5)
    dm.setup("fit")
    dm.schedule_switch(step=3)
    got, want_pretrain = list(dm.train_dataloader()), list(pretrain.train_dataloader())
    scenes = RandomWindowBatches(dm.train_stream, 16, 4, 6, dm.seed)
    assert all(torch.equal(got[k], want_pretrain[k]) for k in range(3))
    assert all(torch.equal(got[k][:2], want_pretrain[k][:2]) and torch.equal(got[k][2:], scenes.batch(k)[2:])
               for k in range(3, 6))
    mismatched = SceneDataModule(block_size=8, batch_size=4, replay=0.5,
                                 pretrain=ByteTextDataModule(block_size=16, batch_size=4, batches_per_epoch=6))
    mismatched.setup("fit")
    mismatched.schedule_switch(step=0)
    with pytest.raises(ValueError, match=r"pretraining windows have shape \(17,\) and scene windows \(9,\)"):
        next(iter(mismatched.train_dataloader()))


def test_datamodule_errors_name_the_field():
    with pytest.raises(ValueError, match=r"replay=0.3 needs a pretrain DataModule"):
        SceneDataModule(replay=0.3)
    with pytest.raises(ValueError, match=r"val_source='pretrain' needs a pretrain DataModule"):
        SceneDataModule(val_source="pretrain")
    with pytest.raises(ValueError, match=r"batch_size=0 must be >= 1"):
        SceneDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"give exactly one of step=None and epoch=None"):
        SceneDataModule().schedule_switch()
    with pytest.raises(ValueError, match=r"fewer than one window of block_size \+ 1 = 100001"):
        SceneDataModule(block_size=100_000).setup("fit")
