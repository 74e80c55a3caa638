"""NeatModel with the BLT front end: byte path untouched, entropy model checkpoint, resume exactness (adaptive
threshold included), checkpoint rebuild, logged patch size, Titans + SVF over patches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch

from neat_lightning.components.blt import BLTConfig, default_patcher
from neat_lightning.components.titans import TitansConfig
from neat_lightning.data.bytes import ByteTextDataModule
from neat_lightning.modules.byte_lm import ByteLM
from neat_lightning.modules.neat import NeatModel
from neat_lightning.modules.neat_config import MVoTConfig, SVFConfig

TINY_TITANS = TitansConfig(dim_memory=8, chunk_size=4, persistent_tokens=2, memory_size=16, surprise_threshold=0.5)
TINY_BLT = BLTConfig(dim_local=16, heads_local=2, cross_heads=2, hash_vocab=31, window_local=16,
                     patcher=replace(default_patcher(), threshold=3.0))


def patched(mode: str) -> BLTConfig:
    """TINY_BLT with another patching mode."""
    return replace(TINY_BLT, patcher=replace(TINY_BLT.patcher, mode=mode))


def trainer(tmp_path: Path, steps: int, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path, deterministic=True)
    return L.Trainer(**{**args, **kw})


def data() -> ByteTextDataModule:
    return ByteTextDataModule(block_size=48, batch_size=2, batches_per_epoch=20)


@pytest.fixture(scope="module")
def entropy_ckpt(tmp_path_factory) -> str:
    """A tiny ByteLM trained for 2 steps: the frozen entropy model of these tests (and of the config test)."""
    path = tmp_path_factory.mktemp("entropy") / "entropy.ckpt"
    L.seed_everything(0)
    lm = ByteLM(dim=16, n_layers=1, heads=2, block_size=32, warmup_steps=1)
    t = trainer(path.parent, 2)
    t.fit(lm, ByteTextDataModule(block_size=32, batch_size=2, batches_per_epoch=4))
    t.save_checkpoint(path)
    return str(path)


def tiny(seed: int = 0, **kw) -> NeatModel:
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, heads=2, block_size=48, window=8, titans_config=TINY_TITANS, svf=False,
                warmup_steps=2, active_components=[])
    return NeatModel(**{**args, **kw})


def test_byte_frontend_is_bit_identical_and_builds_nothing_of_blt():
    plain, with_args = tiny(), tiny(frontend="bytes", blt_config=TINY_BLT, entropy_model_ckpt="nowhere.ckpt")
    assert with_args.blt is None
    a, b = plain.state_dict(), with_args.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("blt.") for k in b)
    ids = torch.randint(4, 260, (2, 40))
    assert torch.equal(plain(ids), with_args(ids))


def test_missing_entropy_model_checkpoint_names_the_field_and_the_command(tmp_path):
    with pytest.raises(ValueError, match=r"needs entropy_model_ckpt.*neat fit --config configs/blt_entropy_model.yaml"):
        tiny(frontend="blt", blt_config=TINY_BLT)
    missing = tmp_path / "none.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"entropy_model_ckpt: no such file: '{missing}'.*blt_entropy_model"):
        tiny(frontend="blt", blt_config=TINY_BLT, entropy_model_ckpt=str(missing))
    with pytest.raises(ValueError, match=r"frontend='tokens' must be 'bytes' or 'blt'"):
        tiny(frontend="tokens")


def test_static_and_space_patching_need_no_entropy_model_and_run_titans_and_svf_over_patches():
    for patching in ("static", "space"):
        model = tiny(frontend="blt", blt_config=patched(patching), svf=True,
                     svf_config=SVFConfig(rank=2, dispatch_prefix=8), active_components=["titans", "svf"])
        assert model.model.embed is None and model.model.head is None  # no unused byte embedding in the latent
        ids = torch.randint(4, 260, (2, 41))
        terms = model.loss_terms({"ids": ids, "task": torch.tensor([0, 1])})
        assert terms.logits.shape == (2, 40, 260) and torch.isfinite(terms.loss)
        assert terms.backbone.hidden.shape == (2, 40, 32)  # latent states brought back to bytes
        assert terms.backbone.stats  # the memory ran over the patches
        assert torch.equal(terms.patch_lengths, model.patch_lengths(ids[:, :-1]))  # patched once, passed along
        assert len(model.generate(ids[0, :10], 3, stop_at_eos=False)) == 3


def test_resume_is_exact_including_the_adaptive_threshold(tmp_path, entropy_ckpt):
    def fit(steps: int, ckpt_path=None, save: Path | None = None) -> NeatModel:
        L.seed_everything(3)
        model = tiny(frontend="blt", blt_config=TINY_BLT, entropy_model_ckpt=entropy_ckpt)
        t = trainer(tmp_path, steps)
        t.fit(model, data(), ckpt_path=ckpt_path)
        if save is not None:
            t.save_checkpoint(save)
        return model, t

    full, t_full = fit(4)
    assert "patch/mean_size" in t_full.callback_metrics and "patch/threshold" in t_full.callback_metrics
    assert full.blt.controller.steps == 4 and full.blt.threshold != TINY_BLT.patcher.threshold
    half_path = tmp_path / "half.ckpt"
    fit(2, save=half_path)
    resumed, _ = fit(4, ckpt_path=half_path)
    assert resumed.blt.controller.state_dict() == full.blt.controller.state_dict()
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))
    # load_from_checkpoint alone rebuilds the BLT model (entropy model reloaded from its path, threshold restored)
    end_path = tmp_path / "end.ckpt"
    t_full.save_checkpoint(end_path)
    loaded = NeatModel.load_from_checkpoint(end_path)
    assert loaded.hparams.frontend == "blt" and loaded.blt.threshold == full.blt.threshold
    ids = torch.randint(4, 260, (2, 30))
    full.eval(), loaded.eval()
    assert torch.equal(full(ids), loaded(ids))


def test_blt_front_end_carries_mvot_visual_tokens(tmp_path):
    from neat_lightning.modules.vqvae import VQVAE, save_vqvae_checkpoint

    vq = save_vqvae_checkpoint(VQVAE(channels=8, n_res_blocks=0, stem="patch", codebook_size=128, embed_dim=4,
                                     kmeans_init=False), tmp_path / "vqvae.ckpt")
    model = tiny(frontend="blt", blt_config=patched("space"), mvot=True, mvot_config=MVoTConfig(vqvae_ckpt=str(vq)),
                 active_components=["titans", "mvot"])
    ids = torch.randint(4, 260, (2, 49))
    ids[:, 10], ids[:, 27] = 260, 261  # BOI, EOI around 16 visual codes
    ids[:, 11:27] = torch.randint(262, 262 + 128, (2, 16))
    lengths = model.patch_lengths(ids[:, :-1])
    assert (lengths == 1).sum() >= 2 * 18  # every marker and code is a patch of its own
    terms = model.loss_terms(ids)
    assert terms.logits.shape == (2, 48, 262 + 128) and terms.mvot.visual_total == 2 * 16
    terms.loss.backward()
    assert model.blt.embed.embed.weight.grad[262:].abs().sum() > 0  # visual rows of the BLT embedding learn
