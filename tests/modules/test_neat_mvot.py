"""NeatModel's MVoT path: frozen VQ-VAE from a checkpoint, exact byte path when off, L_D on visual positions only,
interleaved generation, checkpoint rebuild and exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from neat_lightning.codec import VOCAB_SIZE
from neat_lightning.components.mvot import token_discrepancy_loss
from neat_lightning.data.multimodal import MultimodalDataModule, next_state_examples
from neat_lightning.modules.neat import NeatModel
from neat_lightning.modules.neat_config import MVoTConfig
from neat_lightning.modules.vqvae import VQVAE, VQVAETokenizer, save_vqvae_checkpoint
from neat_lightning.protocols import ComponentSwitchable


def tiny_vqvae(codebook_size: int = 16) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(channels=8, n_res_blocks=0, downsample=4, stem="patch", codebook_size=codebook_size, embed_dim=4,
                 kmeans_init=False)


@pytest.fixture(scope="module")
def vqvae_ckpt(tmp_path_factory) -> str:
    return str(save_vqvae_checkpoint(tiny_vqvae(), tmp_path_factory.mktemp("vq") / "vqvae.ckpt"))


def tiny(vqvae_ckpt: str | None, seed: int = 0, mvot_kw: dict | None = None, **kw) -> NeatModel:
    torch.manual_seed(seed)
    mvot_config = MVoTConfig(**{"vqvae_ckpt": vqvae_ckpt, "visual_vocab_size": 16, **(mvot_kw or {})})
    args = dict(dim=16, n_layers=1, heads=2, block_size=160, window=None, titans=False, svf=False,
                active_components=["mvot"] if kw.get("mvot", True) else [], mvot=True, mvot_config=mvot_config,
                warmup_steps=2)
    return NeatModel(**{**args, **kw})


def tiny_data(tokenizer: VQVAETokenizer, **kw) -> MultimodalDataModule:
    args = dict(block_size=160, batch_size=2, batches_per_epoch=20, val_rows=2)
    return MultimodalDataModule(**{**args, **kw}, tokenizer=tokenizer)


def test_mvot_off_is_the_byte_path(vqvae_ckpt):
    plain = tiny(None, mvot=False, titans=True, svf=True)
    ignored = tiny(vqvae_ckpt, mvot=False, titans=True, svf=True, mvot_kw=dict(visual_vocab_size=999))
    assert plain.config.vocab_size == VOCAB_SIZE and plain.mvot is None and plain.components == ("titans", "svf")
    assert plain.state_dict().keys() == ignored.state_dict().keys()
    assert all(torch.equal(v, ignored.state_dict()[k]) for k, v in plain.state_dict().items())
    ids = torch.randint(0, VOCAB_SIZE, (2, 12))
    assert torch.equal(plain(ids), ignored(ids))
    with_path = tiny(vqvae_ckpt, titans=True, svf=True)
    assert with_path.config.vocab_size == VOCAB_SIZE + 2 + 16
    assert isinstance(with_path, ComponentSwitchable) and with_path.components == ("titans", "svf", "mvot")


def test_vqvae_checkpoint_errors_name_the_field_and_both_shapes(vqvae_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"mvot=True needs mvot_config.vqvae_ckpt"):
        tiny(None)
    with pytest.raises(ValueError, match=r"discrepancy_weight=-0.1 and decision_weight=1.0 must be >= 0"):
        tiny(vqvae_ckpt, mvot_kw=dict(discrepancy_weight=-0.1))
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match=r"vqvae_ckpt='.*missing.ckpt': no such file"):
        tiny(missing)
    with pytest.raises(ValueError, match=r"codebook has shape \(codebook_size, embed_dim\) = \(16, 4\), but this "
                                         r"NeatModel is configured for mvot_config.visual_vocab_size=32, i.e. a "
                                         r"codebook of shape \(32, 4\)"):
        tiny(vqvae_ckpt, mvot_kw=dict(visual_vocab_size=32))


def test_ld_is_added_on_visual_positions_and_the_vqvae_stays_frozen(vqvae_ckpt, tmp_path):
    model = tiny(vqvae_ckpt, mvot_kw=dict(discrepancy_weight=0.5, decision_weight=0.0))
    data = tiny_data(VQVAETokenizer.from_vqvae(model.mvot.vqvae))
    data.setup("fit")
    batch = data.train_dataloader().dataset.batch(0)
    terms = model.loss_terms(batch)
    ids = batch["ids"]
    logits = model(ids[:, :-1])
    ld = token_discrepancy_loss(logits, ids[:, 1:], model.mvot.distances, model.mvot.vocab)
    ce = (terms.nats * terms.valid).sum() / terms.valid.sum()
    assert torch.allclose(terms.loss, ce + 0.5 * ld, atol=1e-5)
    assert torch.allclose(model.mvot.distances, tiny_vqvae().codebook_distances())
    model.set_component_active("mvot", False)
    assert torch.allclose(model.loss_terms(batch).loss, ce, atol=1e-6)
    model.set_component_active("mvot", True)
    before = {k: v.clone() for k, v in model.mvot.vqvae.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                        val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(model, tiny_data(VQVAETokenizer(vqvae_ckpt)))  # the data tokenises with the model's checkpoint
    assert all(torch.equal(v, model.mvot.vqvae.state_dict()[k]) for k, v in before.items())
    assert not model.mvot.vqvae.training
    for name in ("train/loss_d", "train/decision_loss", "val/visual_acc", "val/loss_d", "val/decision_acc"):
        assert name in trainer.callback_metrics, name



def test_data_with_other_image_tokens_is_refused_before_training(vqvae_ckpt, tmp_path):
    """The data's tokenizer must write the image ids the model reads: another codebook size stops fit at setup."""
    model = tiny(vqvae_ckpt)
    other = tiny_data(VQVAETokenizer.from_vqvae(tiny_vqvae(codebook_size=32)))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"the data's image tokens VisualVocab\(codebook_size=32.* do not match the "
                                         r"model's VisualVocab\(codebook_size=16"):
        trainer.fit(model, other)
    assert trainer.global_step == 0

def test_generation_writes_whole_images_and_decodes_them(vqvae_ckpt):
    model = tiny(vqvae_ckpt)
    data = tiny_data(VQVAETokenizer.from_vqvae(model.mvot.vqvae))
    vocab = model.mvot.vocab
    ex = next_state_examples(data.episode_tokenizer, 2, seed=3)
    prompts = ex.prompts[0][None]  # (1, T0), ends with BOI
    with torch.no_grad():
        model.mvot.decision.bias.fill_(-50.0)  # the head says "no image": text after the forced EOI
    new = model.generate_interleaved(prompts[:1], vocab.tokens_per_image + 4, stop_at_eos=False)
    assert vocab.is_visual(new[0, : vocab.tokens_per_image]).all() and new[0, vocab.tokens_per_image] == vocab.eoi
    assert (new[0, vocab.tokens_per_image + 1 :] < VOCAB_SIZE).all()
    # greedy generation agrees with the model's own argmax over the visual range
    logits = model(torch.cat([prompts[:1], new[:, :-1]], 1))[0, -new.shape[1] :]
    lo = vocab.offset
    assert torch.equal(logits[: vocab.tokens_per_image, lo:].argmax(-1) + lo, new[0, : vocab.tokens_per_image])
    with torch.no_grad():
        model.mvot.decision.bias.fill_(50.0)  # the head says "image now"
    text_prompt = prompts[:1, :5]
    new = model.generate_interleaved(text_prompt, 2 * vocab.image_length, stop_at_eos=False)[0]
    pieces = vocab.segments(new)
    assert [kind for kind, _ in pieces] == ["image", "image"]
    images = model.mvot.decode_images(torch.stack([p for _, p in pieces]))
    assert images.shape == (2, 3, 32, 32)
    model.set_component_active("mvot", False)  # off: text only
    assert (model.generate_interleaved(text_prompt, 8, stop_at_eos=False) < VOCAB_SIZE).all()


def fit(tmp_path, vqvae_ckpt, steps: int, resume=None, save: bool = False) -> NeatModel:
    L.seed_everything(0)
    model = tiny(vqvae_ckpt, titans=True, dropout=0.1)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        deterministic=True, default_root_dir=tmp_path)
    trainer.fit(model, tiny_data(VQVAETokenizer(vqvae_ckpt)), ckpt_path=resume)
    if save:
        trainer.save_checkpoint(tmp_path / "half.ckpt")
    return model


def test_resume_is_exact_and_load_from_checkpoint_rebuilds_the_path(tmp_path, vqvae_ckpt):
    full = fit(tmp_path, vqvae_ckpt, 4)
    fit(tmp_path, vqvae_ckpt, 2, save=True)
    resumed = fit(tmp_path, vqvae_ckpt, 4, resume=tmp_path / "half.ckpt")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = NeatModel.load_from_checkpoint(tmp_path / "half.ckpt")
    assert loaded.mvot is not None and loaded.active == {"mvot"} and loaded.config.vocab_size == VOCAB_SIZE + 18
    ids = tiny_data(VQVAETokenizer.from_vqvae(loaded.mvot.vqvae), val_rows=1)
    ids.setup("validate")
    half = fit(tmp_path, vqvae_ckpt, 2).eval()
    loaded.eval()
    assert torch.equal(half(ids.val_set[:, :-1]), loaded(ids.val_set[:, :-1]))
    with pytest.raises(ValueError, match=r"model.embed.weight \(278, 16\) in checkpoint vs \(260, 16\) here"):
        NeatModel.load_from_checkpoint(tmp_path / "half.ckpt", mvot=False, active_components=[])


def format_1_hparams(hparams: dict) -> dict:
    """NeatModel hyperparameters as checkpoint format 1 wrote them: flat svf_* / mvot_* arguments and a flat
    blt_config whose patching fields sat beside the local-model fields."""
    hp = dict(hparams)
    svf, mvot = hp.pop("svf_config"), hp.pop("mvot_config")
    hp.update(svf_tasks=list(svf["tasks"]), svf_rank=svf["rank"], svf_method=svf["method"],
              svf_targets=svf["targets"], svf_dispatch=svf["dispatch"], svf_freeze_base=svf["freeze_base"],
              svf_train_experts=svf["train_experts"], dispatch_prefix=svf["dispatch_prefix"])
    hp.update(vqvae_ckpt=mvot["vqvae_ckpt"], visual_vocab_size=mvot["visual_vocab_size"],
              image_size=mvot["image_size"], mvot_lambda=mvot["discrepancy_weight"],
              decision_weight=mvot["decision_weight"])
    blt = dict(hp["blt_config"])
    patcher = blt.pop("patcher")
    blt.update(patching=patcher["mode"], threshold=patcher["threshold"], max_patch_length=patcher["max_patch_length"],
               patch_size=patcher["patch_size"], entropy_batch_windows=patcher["batch_windows"])
    hp["blt_config"] = blt
    return hp


def test_a_format_1_checkpoint_loads_with_identical_weights_and_outputs(tmp_path, vqvae_ckpt):
    from dataclasses import replace

    from neat_lightning.components.blt import BLTConfig, default_patcher
    from neat_lightning.modules.base import FORMAT_KEY, upgrade_checkpoint
    from neat_lightning.modules.neat_config import SVFConfig

    blt = BLTConfig(dim_local=16, heads_local=2, cross_heads=2, hash_vocab=31, window_local=16,
                    patcher=replace(default_patcher(), mode="space", threshold=2.5))
    model = tiny(vqvae_ckpt, titans=True, svf=True, frontend="blt", blt_config=blt,
                 svf_config=SVFConfig(rank=2, dispatch_prefix=8, dispatch="mixture"),
                 mvot_kw=dict(discrepancy_weight=0.3, decision_weight=0.5), active_components=["titans", "mvot"])
    path = tmp_path / "format1.ckpt"
    L.Trainer(logger=False, enable_progress_bar=False, max_steps=0).strategy.connect(model)
    old = {"state_dict": model.state_dict(), "hyper_parameters": format_1_hparams(dict(model.hparams)),
           "pytorch-lightning_version": L.__version__, "neat_components": {"built": list(model.components),
                                                                            "active": sorted(model.active)}}
    assert FORMAT_KEY not in old and "svf_rank" in old["hyper_parameters"]
    torch.save(old, path)
    changes = upgrade_checkpoint(torch.load(path, weights_only=False), NeatModel)
    assert any("svf_config" in c for c in changes) and any("mvot_lambda" in c and "mvot_config" in c for c in changes)
    assert any("blt_config.patcher" in c for c in changes)
    loaded = NeatModel.load_from_checkpoint(path)
    assert loaded.hparams.svf_config == model.hparams.svf_config and loaded.mvot_config == model.mvot_config
    assert loaded.blt.config == blt and loaded.active == model.active
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    ids = torch.randint(4, 260, (2, 30))
    model.eval(), loaded.eval()
    assert torch.equal(model(ids), loaded(ids))
