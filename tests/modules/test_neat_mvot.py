"""NeatModel's MVoT path: frozen VQ-VAE from a checkpoint, exact byte path when off, L_D on visual positions only,
interleaved generation, checkpoint rebuild and exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from neat_lightning.components.mvot import token_discrepancy_loss
from neat_lightning.codec import VOCAB_SIZE
from neat_lightning.data.multimodal import MultimodalDataModule, next_state_examples, save_vqvae_checkpoint
from neat_lightning.modules.neat import NeatModel
from neat_lightning.modules.vqvae import VQVAE
from neat_lightning.protocols import ComponentSwitchable


def tiny_vqvae(codebook_size: int = 16) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(channels=8, n_res_blocks=0, downsample=4, stem="patch", codebook_size=codebook_size, embed_dim=4,
                 kmeans_init=False)


@pytest.fixture(scope="module")
def vqvae_ckpt(tmp_path_factory) -> str:
    return str(save_vqvae_checkpoint(tiny_vqvae(), tmp_path_factory.mktemp("vq") / "vqvae.ckpt"))


def tiny(vqvae_ckpt: str | None, seed: int = 0, **kw) -> NeatModel:
    torch.manual_seed(seed)
    args = dict(dim=16, n_layers=1, heads=2, block_size=160, window=None, titans=False, svf=False,
                active_components=["mvot"] if kw.get("mvot", True) else [], mvot=True, vqvae_ckpt=vqvae_ckpt,
                visual_vocab_size=16, warmup_steps=2)
    return NeatModel(**{**args, **kw})


def tiny_data(**kw) -> MultimodalDataModule:
    args = dict(block_size=160, batch_size=2, batches_per_epoch=20, val_rows=2)
    return MultimodalDataModule(**{**args, **kw})


def test_mvot_off_is_the_byte_path(vqvae_ckpt):
    plain = tiny(None, mvot=False, titans=True, svf=True)
    ignored = tiny(vqvae_ckpt, mvot=False, titans=True, svf=True, visual_vocab_size=999)
    assert plain.config.vocab_size == VOCAB_SIZE and plain.mvot is None and plain.components == ("titans", "svf")
    assert plain.state_dict().keys() == ignored.state_dict().keys()
    assert all(torch.equal(v, ignored.state_dict()[k]) for k, v in plain.state_dict().items())
    ids = torch.randint(0, VOCAB_SIZE, (2, 12))
    assert torch.equal(plain(ids), ignored(ids))
    with_path = tiny(vqvae_ckpt, titans=True, svf=True)
    assert with_path.config.vocab_size == VOCAB_SIZE + 2 + 16
    assert isinstance(with_path, ComponentSwitchable) and with_path.components == ("titans", "svf", "mvot")


def test_vqvae_checkpoint_errors_name_the_field_and_both_shapes(vqvae_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"mvot=True needs vqvae_ckpt"):
        tiny(None)
    with pytest.raises(ValueError, match=r"mvot_lambda=-0.1 and decision_weight=1.0 must be >= 0"):
        tiny(vqvae_ckpt, mvot_lambda=-0.1)
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match=r"vqvae_ckpt='.*missing.ckpt': no such file"):
        tiny(missing)
    with pytest.raises(ValueError, match=r"codebook has shape \(codebook_size, embed_dim\) = \(16, 4\), but this "
                                         r"NeatModel is configured for visual_vocab_size=32, i.e. a codebook of "
                                         r"shape \(32, 4\)"):
        tiny(vqvae_ckpt, visual_vocab_size=32)


def test_ld_is_added_on_visual_positions_and_the_vqvae_stays_frozen(vqvae_ckpt, tmp_path):
    model = tiny(vqvae_ckpt, mvot_lambda=0.5, decision_weight=0.0)
    data = tiny_data()
    data.set_vqvae(model.mvot.vqvae)
    data.setup("fit")
    batch = data.train_dataloader().dataset.batch(0)
    terms = model.loss_terms(batch)
    ids = batch["ids"]
    logits = model(ids[:, :-1])
    ld = token_discrepancy_loss(logits, ids[:, 1:], model.mvot.distances, model.mvot.vocab)
    ce = (terms["nats"] * terms["valid"]).sum() / terms["valid"].sum()
    assert torch.allclose(terms["loss"], ce + 0.5 * ld, atol=1e-5)
    assert torch.allclose(model.mvot.distances, tiny_vqvae().codebook_distances())
    model.set_component_active("mvot", False)
    assert torch.allclose(model.loss_terms(batch)["loss"], ce, atol=1e-6)
    model.set_component_active("mvot", True)
    before = {k: v.clone() for k, v in model.mvot.vqvae.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                        val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(model, tiny_data())  # the data takes the model's VQ-VAE
    assert all(torch.equal(v, model.mvot.vqvae.state_dict()[k]) for k, v in before.items())
    assert not model.mvot.vqvae.training
    for name in ("train/loss_d", "train/decision_loss", "val/visual_acc", "val/loss_d", "val/decision_acc"):
        assert name in trainer.callback_metrics, name


def test_generation_writes_whole_images_and_decodes_them(vqvae_ckpt):
    model = tiny(vqvae_ckpt)
    data = tiny_data()
    data.set_vqvae(model.mvot.vqvae)
    vocab = model.mvot.vocab
    ex = next_state_examples(data.tokenizer, 2, seed=3)
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
    trainer.fit(model, tiny_data(), ckpt_path=resume)
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
    ids = tiny_data(val_rows=1)
    ids.set_vqvae(loaded.mvot.vqvae)
    ids.setup("validate")
    half = fit(tmp_path, vqvae_ckpt, 2).eval()
    loaded.eval()
    assert torch.equal(half(ids.val_set[:, :-1]), loaded(ids.val_set[:, :-1]))
    with pytest.raises(ValueError, match=r"model.embed.weight \(278, 16\) in checkpoint vs \(260, 16\) here"):
        NeatModel.load_from_checkpoint(tmp_path / "half.ckpt", mvot=False, active_components=[])
