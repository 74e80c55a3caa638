"""``modules/base.py``: checkpoint checks, the frozen loader, format upgrades, structural restore, RNG states."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from neat_lightning.data import ByteTextDataModule
from neat_lightning.modules import VQVAE, ByteLM
from neat_lightning.modules.base import (
    FORMAT,
    FORMAT_KEY,
    RNG_KEY,
    STRUCTURE_KEY,
    ResumableModule,
    check_checkpoint_file,
    load_frozen,
    rng_states,
    set_rng_states,
    upgrade_checkpoint,
)


def tiny(**kw) -> ByteLM:
    return ByteLM(**{"dim": 16, "n_layers": 1, "heads": 2, "block_size": 16, "warmup_steps": 1, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A ByteLM checkpoint written by a real Trainer after one step."""
    path = tmp_path_factory.mktemp("base") / "lm.ckpt"
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(tiny(), ByteTextDataModule(block_size=16, batch_size=2, batches_per_epoch=1))
    trainer.save_checkpoint(path)
    return path


# -- check_checkpoint_file ---------------------------------------------------------------------------------------


def test_check_checkpoint_file_accepts_a_checkpoint(ckpt):
    check_checkpoint_file(ckpt)


@pytest.mark.parametrize("make, exc, match", [
    (lambda d: d / "none.ckpt", FileNotFoundError, r"^--x: no such file: '.*none.ckpt'$"),
    (lambda d: d, IsADirectoryError, r"^--x: '.*' is a directory, not a checkpoint file$"),
    (lambda d: (d / "t.ckpt").write_text("not a zip") and d / "t.ckpt", ValueError,
     r"^--x: '.*t.ckpt' is not a complete checkpoint \(9 bytes; truncated, corrupt, or not written by torch.save\)"),
])
def test_check_checkpoint_file_names_the_option_and_the_path(make, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        check_checkpoint_file(make(tmp_path), "--x")


def test_a_truncated_checkpoint_is_named(ckpt, tmp_path):
    half = tmp_path / "half.ckpt"
    half.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"'.*half.ckpt' is not a complete checkpoint \(\d+ bytes; truncated"):
        ByteLM.load_from_checkpoint(half)


# -- load_frozen -------------------------------------------------------------------------------------------------


def test_load_frozen_returns_an_eval_mode_module_without_gradients(ckpt):
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    model = load_frozen(ByteLM, ckpt, "entropy_model_ckpt")
    assert torch.equal(torch.rand(1), before)  # loading did not shift the caller's random stream
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.device == torch.device("cpu")


@pytest.mark.parametrize("path, exc, match", [
    (None, ValueError, r"^entropy_model_ckpt=None must be the path of a ByteLM checkpoint; train one first$"),
    ("", ValueError, r"^entropy_model_ckpt='' must be the path of a ByteLM checkpoint; train one first$"),
    ("{missing}", FileNotFoundError, r"^entropy_model_ckpt: no such file: '.*missing.ckpt'; train one first$"),
    ("{folder}", IsADirectoryError, r"^entropy_model_ckpt: '.*' is a directory, not a checkpoint file; train one"),
    ("{text}", ValueError, r"^entropy_model_ckpt: '.*text.ckpt' is not a complete checkpoint .*; train one first$"),
])
def test_load_frozen_errors_start_with_the_field(path, exc, match, tmp_path):
    (tmp_path / "text.ckpt").write_text("hello")
    paths = {"missing": tmp_path / "missing.ckpt", "folder": tmp_path, "text": tmp_path / "text.ckpt"}
    with pytest.raises(exc, match=match):
        load_frozen(ByteLM, path.format(**paths) if isinstance(path, str) else path, "entropy_model_ckpt",
                    "train one first")


def test_load_frozen_names_a_checkpoint_of_another_class(ckpt):
    with pytest.raises(ValueError, match=r"^vqvae_ckpt='.*lm.ckpt' does not hold a loadable VQVAE checkpoint "
                                         r"\((TypeError|KeyError|RuntimeError|ValueError): .*\); see docs$"):
        load_frozen(VQVAE, ckpt, "vqvae_ckpt", "see docs")


def test_load_frozen_names_a_configuration_that_does_not_fit(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["dim"] = 32  # tensors of dim 16, hyperparameters of dim 32
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"^f='.*bad.ckpt' does not hold a loadable ByteLM checkpoint \(ValueError: "
                                         r"the checkpoint does not match this ByteLM's configuration"):
        load_frozen(ByteLM, tmp_path / "bad.ckpt", "f")


# -- format upgrades ---------------------------------------------------------------------------------------------


class Renamed(ResumableModule):
    """Format 1 called ``size`` ``width`` and stored the layer under ``old.``."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(size, size)

    @classmethod
    def upgrade_format(cls, checkpoint: dict[str, Any], found: int) -> list[str]:
        hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
        hparams["size"] = hparams.pop("width")
        for key in [k for k in state if k.startswith("old.")]:
            state[key.replace("old.", "layer.", 1)] = state.pop(key)
        return ["width -> size", "old.* -> layer.*"]


def test_upgrade_checkpoint_rewrites_an_older_format_in_place():
    checkpoint = {"hyper_parameters": {"width": 3}, "state_dict": {"old.weight": torch.ones(3, 3)}}
    assert upgrade_checkpoint(checkpoint, Renamed) == ["width -> size", "old.* -> layer.*"]
    assert checkpoint["hyper_parameters"] == {"size": 3} and list(checkpoint["state_dict"]) == ["layer.weight"]
    assert checkpoint[FORMAT_KEY] == FORMAT
    assert upgrade_checkpoint(checkpoint, Renamed) == []  # current: nothing to do


def test_upgrade_checkpoint_refuses_a_newer_format():
    with pytest.raises(ValueError, match=rf"^x.ckpt: checkpoint format {FORMAT + 1} was written by a newer "
                                         rf"neat_lightning; this version reads formats up to {FORMAT}\."):
        upgrade_checkpoint({FORMAT_KEY: FORMAT + 1}, ByteLM, "x.ckpt")


def test_load_from_checkpoint_upgrades_an_older_file(tmp_path):
    model = Renamed(size=3)
    checkpoint = {"hyper_parameters": {"width": 3}, "pytorch-lightning_version": L.__version__,
                  "state_dict": {f"old.{k.split('.', 1)[1]}": v for k, v in model.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = Renamed.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams.size == 3 and torch.equal(loaded.layer.weight, model.layer.weight)


# -- structural restore ------------------------------------------------------------------------------------------


def test_restore_structure_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"^the checkpoint records structural change 'wings' that ByteLM cannot "
                                         r"rebuild$"):
        tiny().restore_structure("wings", {"span": 2})


def test_a_checkpoint_recording_an_unknown_change_fails_to_load(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint[STRUCTURE_KEY] = {"wings": {"span": 2}}
    torch.save(checkpoint, tmp_path / "wings.ckpt")
    with pytest.raises(ValueError, match=r"structural change 'wings' that ByteLM cannot rebuild"):
        ByteLM.load_from_checkpoint(tmp_path / "wings.ckpt")


def test_record_structure_records_and_forgets():
    model = tiny()
    model.record_structure("lora", {"r": 2})
    assert model.structure == {"lora": {"r": 2}}
    model.record_structure("lora", None)
    assert model.structure == {}


# -- random states -----------------------------------------------------------------------------------------------


def test_rng_states_round_trip():
    torch.manual_seed(5)
    random.seed(5)
    states = rng_states()
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_states(states)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_checkpoints_carry_the_format_and_the_random_states(ckpt):
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint[FORMAT_KEY] == FORMAT
    assert set(checkpoint[RNG_KEY]) == {"torch", "cuda", "python"}


def test_non_finite_loss_stops_before_the_step():
    model = tiny()
    with pytest.raises(FloatingPointError, match=r"ByteLM: the training loss is nan at global step \?"):
        model.on_before_backward(torch.tensor(float("nan")))
