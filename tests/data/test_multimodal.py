"""MultimodalDataModule: row layout (text actions, whole images of the tokenizer's codes), pure batches, held-out
val, the ImageTokenizer it is handed."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, decode
from neat_lightning.data.generators.grids import generate_episode, render
from neat_lightning.data.multimodal import MultimodalDataModule, episode_for, next_state_examples
from neat_lightning.modules.vqvae import VQVAE, VQVAETokenizer, save_vqvae_checkpoint
from neat_lightning.protocols import ImageTokenizer


@pytest.fixture(scope="module")
def vqvae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(channels=8, n_res_blocks=0, downsample=4, stem="patch", codebook_size=16, embed_dim=4,
                 kmeans_init=False).eval()


def data(vqvae, **kw) -> MultimodalDataModule:
    args = dict(families=["maze", "frozenlake"], block_size=240, batch_size=3, batches_per_epoch=4, val_rows=4)
    dm = MultimodalDataModule(**{**args, **kw}, tokenizer=VQVAETokenizer.from_vqvae(vqvae))
    dm.setup("fit")
    return dm


def test_rows_interleave_action_text_and_next_state_images(vqvae):
    dm = data(vqvae)
    vocab = dm.vocab
    ds = dm.train_dataloader().dataset
    batch = ds.batch(0)["ids"]
    assert batch.shape == (3, 241) and batch.dtype == torch.long
    for i, row in enumerate(batch):
        ep, start = episode_for(dm.families, 8, "mm-train", dm.seed, 0, 0, i)
        assert row[0] == BOS_ID
        pieces = vocab.segments(row[1:])
        images = [p for kind, p in pieces if kind == "image"]
        texts = [decode(p) for kind, p in pieces if kind == "text"]
        assert not any(kind == "broken" for kind, _ in pieces)
        n = len(images) - 1
        assert n >= 1 and texts[0] == f"{ep.family}\n"
        assert [t.strip() for t in texts[1 : n + 1]] == list(ep.actions[start : start + n])
        expected = vqvae.encode(render(ep.states[start : start + n + 1], 32))
        assert torch.equal(torch.stack(images), expected)  # the VQ-VAE's codes of the true states
        ends = start + n == len(ep.actions)
        tail = row[(row != PAD_ID).nonzero().max()]
        assert (tail == EOS_ID) == ends or not ends


def test_batches_are_pure_functions_of_seed_step_and_rank(vqvae):
    dm = data(vqvae)
    ds = dm.train_dataloader().dataset
    first = [b["ids"] for b in ds]
    assert len(first) == 4
    ds.start_batch = 2
    assert all(torch.equal(a["ids"], b) for a, b in zip(ds, first[2:]))  # resume mid-epoch
    ds.start_batch, ds.rank = 0, 1
    assert not torch.equal(next(iter(ds))["ids"], first[0])
    again = data(vqvae).train_dataloader().dataset
    assert torch.equal(again.batch(3)["ids"], first[3])
    val = torch.cat([b["ids"] for b in dm.val_dataloader()])
    assert val.shape == (4, 241) and torch.equal(val, data(vqvae).val_set)
    assert not any(torch.equal(v, t) for v in val for b in first for t in b)


def test_next_state_examples_end_with_boi_and_match_the_rows(vqvae):
    dm = data(vqvae, families=["maze"])
    ex = next_state_examples(dm.episode_tokenizer, 3, dm.val_seed, ["maze"])
    vocab = dm.vocab
    for i, prompt in enumerate(ex.prompts):
        assert prompt[-1] == vocab.boi and prompt[0] == BOS_ID
        ep, start = episode_for(["maze"], 8, "mm-val", dm.val_seed, i)
        assert torch.equal(ex.target_states[i], ep.states[start + 1])
        row = dm.val_set[i]
        assert torch.equal(row[: len(prompt)], prompt)  # the held-out row begins with the prompt
        hw = vocab.tokens_per_image
        assert torch.equal(row[len(prompt) : len(prompt) + hw] - vocab.offset, ex.target_codes[i].flatten())


def test_bad_settings_are_named(vqvae, tmp_path):
    with pytest.raises(ValueError, match=r"families: 'chess' is not one of"):
        MultimodalDataModule(families=["chess"])
    with pytest.raises(ValueError, match=r"image_size=30 must be a multiple of grid_size=8"):
        MultimodalDataModule(image_size=30)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*nope.ckpt': no such file"):
        MultimodalDataModule(tokenizer=VQVAETokenizer(str(tmp_path / "nope.ckpt")))
    with pytest.raises(TypeError, match=r"tokenizer: str does not implement the ImageTokenizer protocol"):
        MultimodalDataModule(tokenizer="vqvae.ckpt")  # a path where the tokenizer goes
    with pytest.raises(ValueError, match=r"block_size=100 is too short for one step of a maze episode: it needs"):
        data(vqvae, block_size=100)
    with pytest.raises(ValueError, match=r"MultimodalDataModule needs a VQ-VAE"):
        MultimodalDataModule().setup("fit")
    path = save_vqvae_checkpoint(vqvae, tmp_path / "vq.ckpt")
    dm = MultimodalDataModule(tokenizer=VQVAETokenizer(str(path)), block_size=200, val_rows=2)
    dm.setup("fit")
    assert dm.vocab.codebook_size == 16
    assert generate_episode("maze", 1).actions  # episodes always have a step to predict


class GridTokenizer:
    """An ImageTokenizer that is no VQ-VAE: one code per 8x8 patch, its mean brightness in 4 levels."""

    codebook_size = 4

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        return image_size // 8, image_size // 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)[:, 0]  # (B, H/8, W/8)
        return (patches * 4).long().clamp(0, 3)


def test_any_image_tokenizer_will_do():
    """The DataModule needs only the ImageTokenizer protocol: rows carry the given tokenizer's codes."""
    tokenizer = GridTokenizer()
    assert isinstance(tokenizer, ImageTokenizer)
    dm = MultimodalDataModule(families=["maze"], block_size=100, batch_size=2, val_rows=2, tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.vocab.codebook_size == 4 and dm.vocab.grid == (4, 4)
    row = dm.train_dataloader().dataset.batch(0)["ids"][0]
    ep, start = episode_for(["maze"], 8, "mm-train", dm.seed, 0, 0, 0)
    images = [p for kind, p in dm.vocab.segments(row[1:]) if kind == "image"]
    assert torch.equal(images[0], tokenizer.encode(render(ep.states[start : start + 1], 32))[0])
