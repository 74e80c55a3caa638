"""RGB images for the VQ-VAE: :class:`ImageDataModule` over generated grid worlds or a local image folder.

The grid worlds, their rendering and the read-back of cell classes are plain Python/torch in
:mod:`neat_lightning.data.generators.grids`; this file adds the image-folder source, the step-aligned datasets and
the DataModule.

:class:`ImageDataModule` serves generated images by default, or the images of a local folder through Hugging Face
``datasets``' ``imagefolder`` builder (Pillow, the ``[images]`` extra). Training batch ``k`` is a pure function of
``(seed, k, rank)`` and the loader starts at the trainer's global step, so a run resumed mid-epoch sees exactly the
batches the uninterrupted run would have seen (the same scheme as :mod:`neat_lightning.data.bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from einops import rearrange
from torch.utils.data import DataLoader, IterableDataset

from neat_lightning.data.generators.grids import FAMILIES, Family, cell_px, sample_images, seed_from
from neat_lightning.data.loading import PlacedLoader, ShardedSequentialBatches, StepAlignedBatches, check_positive

IMAGES_EXTRA_HINT = "pip install 'neat-lightning[images]'"


# ----------------------------------------------------------------------------------------------------------------------
# image folders (Pillow via the [images] extra)


def require_pillow() -> None:
    """Raise a clear ImportError naming the extra when Pillow is missing."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"reading an image folder needs Pillow, which is not installed; install the extra: {IMAGES_EXTRA_HINT}"
        ) from err


def folder_images(folder: str, image_size: int, field: str = "image_folder") -> torch.Tensor:
    """All images of a local folder (``datasets``' ``imagefolder`` builder), RGB, resized to a square.

    Returns:
        (N, 3, image_size, image_size) uint8.
    """
    require_pillow()
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{field}: no such directory: {folder!r}")
    import datasets
    import numpy as np
    from PIL import Image

    ds = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    if len(ds) == 0:
        raise ValueError(f"{field}={folder!r}: no images found")
    arrays = [
        np.asarray(img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
        for img in ds["image"]
    ]
    return rearrange(torch.from_numpy(np.stack(arrays)), "n h w c -> n c h w").contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# datasets


class RandomImageBatches(StepAlignedBatches):
    """Yields ``(batch_size, 3, S, S)`` float batches; batch ``k`` on ``rank`` is a pure function of
    ``(seed, k, rank)``. Generated images by default; with ``pool`` (N, 3, S, S) uint8, random images of the pool.

    One epoch is ``batches_per_epoch`` batches per rank; an iterator starts at ``start_batch`` and runs to the end
    of that batch's epoch. Workers take every ``n_workers``-th batch, so the order is the same for any worker count.
    """

    def __init__(
        self,
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        families: Sequence[str],
        image_size: int,
        grid_size: int,
        pool: torch.Tensor | None = None,
    ) -> None:
        super().__init__(batches_per_epoch)
        self.batch_size, self.seed = batch_size, seed
        self.families, self.image_size, self.grid_size = tuple(families), image_size, grid_size
        self.pool = pool

    def batch(self, k: int) -> torch.Tensor:
        if self.pool is not None:
            g = torch.Generator().manual_seed(seed_from("pool", self.seed, k, self.rank))
            idx = torch.randint(len(self.pool), (self.batch_size,), generator=g)
            return self.pool[idx].float() / 255.0
        images, _ = sample_images(
            self.batch_size, seed_from("train", self.seed, k, self.rank), self.families, self.image_size, self.grid_size
        )
        return images


class FixedImageBatches(ShardedSequentialBatches):
    """A fixed (N, 3, S, S) image set in order, dealt to ranks round-robin, as float batches in [0, 1]."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        super().__init__(images, batch_size)

    @property
    def images(self) -> torch.Tensor:
        return self.items

    def convert(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class ImageDataModule(L.LightningDataModule):
    """RGB images for the VQ-VAE: generated grid worlds (default) or a local image folder.

    Batches are ``(B, 3, image_size, image_size)`` float32 in [0, 1].

    Args:
        families: grid-world families to draw from (``maze``, ``frozenlake``, ``minibehavior``), in turn.
        image_size: image side in pixels (e.g. 32 or 64); a multiple of ``grid_size`` for generated images.
        grid_size: cells per side of the generated worlds.
        batch_size: images per batch (per device).
        batches_per_epoch: training batches per epoch and rank (images are sampled, so an epoch is a convention).
        val_images: size of the held-out validation set (generated from ``val_seed``; or split off the folder).
        seed: seed of the training images.
        val_seed: seed of the validation images; a different seed space from ``seed``, so held-out episodes are
            new episodes (a small world can still repeat a state by chance).
        image_folder: a local folder of images (read with ``datasets``' ``imagefolder`` builder; needs Pillow,
            the ``[images]`` extra). Replaces the generated images.
        val_folder: a separate validation folder; without it ``val_images`` images are split off ``image_folder``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        families: list[Family] | None = None,
        image_size: int = 32,
        grid_size: int = 8,
        batch_size: int = 64,
        batches_per_epoch: int = 500,
        val_images: int = 512,
        seed: int = 1234,
        val_seed: int = 999_999,
        image_folder: str | None = None,
        val_folder: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        families = list(FAMILIES) if families is None else list(families)
        if not families:
            raise ValueError("families=[] must name at least one of " f"{list(FAMILIES)}")
        for f in families:
            if f not in FAMILIES:
                raise ValueError(f"families: {f!r} is not one of {list(FAMILIES)}")
        check_positive(image_size=image_size)
        if image_folder is None:
            cell_px(image_size, grid_size)
            if grid_size < 5:
                raise ValueError(f"grid_size={grid_size} must be >= 5")
        check_positive(batch_size=batch_size, batches_per_epoch=batches_per_epoch, val_images=val_images)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if val_folder is not None and image_folder is None:
            raise ValueError("val_folder is given without image_folder")
        if image_folder is not None:
            require_pillow()  # fail at construction, not deep inside setup
        self.save_hyperparameters()
        self.families = families
        self.image_size, self.grid_size = image_size, grid_size
        self.batch_size, self.batches_per_epoch, self.val_images = batch_size, batches_per_epoch, val_images
        self.seed, self.val_seed = seed, val_seed
        self.image_folder, self.val_folder = image_folder, val_folder
        self.num_workers = num_workers
        self.train_pool: torch.Tensor | None = None
        self.val_set: torch.Tensor | None = None
        self.val_states: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        if self.image_folder is None:
            images, states = sample_images(
                self.val_images, seed_from("val", self.val_seed), self.families, self.image_size, self.grid_size
            )
            self.val_set, self.val_states = (images * 255).round().to(torch.uint8), states
            return
        pool = folder_images(self.image_folder, self.image_size)
        if self.val_folder is not None:
            self.train_pool, self.val_set = pool, folder_images(self.val_folder, self.image_size, "val_folder")
            return
        if len(pool) < 2:
            raise ValueError(f"image_folder={self.image_folder!r}: {len(pool)} image(s); need 2 or more to split")
        n_val = min(self.val_images, len(pool) // 2)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed_from("split", self.val_seed)))
        self.val_set, self.train_pool = pool[order[:n_val]], pool[order[n_val:]]

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _place(self, ds: IterableDataset) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomImageBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds: IterableDataset) -> DataLoader:
        self._place(ds)
        return PlacedLoader(ds, self._place, num_workers=self.num_workers, persistent_workers=False,
                             pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        ds = RandomImageBatches(self.batch_size, self.batches_per_epoch, self.seed, self.families, self.image_size,
                                self.grid_size, self.train_pool)
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(FixedImageBatches(self.val_set, self.batch_size))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
