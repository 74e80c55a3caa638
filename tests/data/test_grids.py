"""ImageDataModule: generated and image-folder sources, held-out validation, exact mid-epoch resume."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from neat_lightning.data.generators.grids import cells_from_images, sample_images
from neat_lightning.data.grids import ImageDataModule


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="families: 'sokoban'"):
        ImageDataModule(families=["sokoban"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of grid_size=8"):
        ImageDataModule(image_size=30)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        ImageDataModule(batch_size=0)


def _fit_batches(dm: ImageDataModule, steps: int, ckpt: str | None = None, tmp_path=None):
    """Record the batches a real Trainer feeds a model for ``steps`` global steps."""
    from neat_lightning.modules.vqvae import VQVAE

    seen: list[torch.Tensor] = []

    class Recorder(VQVAE):
        def training_step(self, batch, batch_idx):
            seen.append(batch.clone())
            return super().training_step(batch, batch_idx)

    model = Recorder(channels=4, n_res_blocks=0, codebook_size=8, embed_dim=4, log_images=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=steps,
        limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(model, dm, ckpt_path=ckpt)
    return seen, trainer


def test_train_batches_resume_mid_epoch(tmp_path) -> None:
    full, _ = _fit_batches(ImageDataModule(batch_size=2, batches_per_epoch=4, val_images=2), 6, tmp_path=tmp_path)
    first, trainer = _fit_batches(ImageDataModule(batch_size=2, batches_per_epoch=4, val_images=2), 3,
                                  tmp_path=tmp_path)
    path = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(path)
    rest, _ = _fit_batches(ImageDataModule(batch_size=2, batches_per_epoch=4, val_images=2), 6, ckpt=path,
                           tmp_path=tmp_path)
    assert len(full) == 6 and len(first) + len(rest) == 6
    for a, b in zip(full, first + rest):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[1])


def test_val_set_is_fixed_and_held_out() -> None:
    dm = ImageDataModule(batch_size=4, val_images=10)
    dm.setup("fit")
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (10, 3, 32, 32) and val.dtype == torch.float32
    assert torch.equal(cells_from_images(val, 8), dm.val_states)
    dm2 = ImageDataModule(batch_size=4, val_images=10)
    dm2.setup("fit")
    assert torch.equal(val, torch.cat(list(dm2.val_dataloader())))
    train = next(iter(dm.train_dataloader()))
    assert train.shape == (4, 3, 32, 32)
    assert not any(torch.equal(t, v) for t in train for v in val[:4])


def test_image_folder_without_pillow_names_the_extra(monkeypatch, tmp_path) -> None:
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL...` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'neat-lightning\[images\]'"):
        ImageDataModule(image_folder=str(tmp_path))


@pytest.mark.slow  # the `datasets` imagefolder builder takes ~5 s to start
def test_image_folder_source(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    images, _ = sample_images(6, seed=1, image_size=32)
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / f"img_{i}.png")
    dm = ImageDataModule(image_folder=str(tmp_path), image_size=32, batch_size=2, val_images=2)
    dm.setup("fit")
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (2, 3, 32, 32)
    train = next(iter(dm.train_dataloader()))
    assert train.shape == (2, 3, 32, 32)
    # every served image is one of the files, pixel for pixel
    for x in torch.cat([val, train]):
        assert any(torch.equal(x, y) for y in images)
    with pytest.raises(FileNotFoundError, match="image_folder: no such directory"):
        ImageDataModule(image_folder=str(tmp_path / "missing")).setup("fit")
