"""Interleaved text + image-token sequences of grid-world episodes (MVoT's MAZE / FROZENLAKE style) and
:class:`MultimodalDataModule`.

A row shows an episode from some step on: the family name, the state as an image, then per step the action as text
and the image of the next state (MVoT: "text action -> next-state image")::

    BOS "maze\\n" BOI s_0 EOI "\\nright\\n" BOI s_1 EOI "\\nup\\n" BOI s_2 EOI ... [EOS at the episode's end] PAD ...

Images are the codes of the :class:`~neat_lightning.protocols.ImageTokenizer` the DataModule is given (a frozen
VQ-VAE: ``neat_lightning.modules.vqvae.VQVAETokenizer``) in the visual id range of
:class:`~neat_lightning.codec.VisualVocab` (BOI = 260, EOI = 261, code c = 262 + c). Every row holds whole images
only: as many steps as fit in ``block_size + 1`` ids (at most ``max_steps_per_row``), the rest padded with PAD.

Episodes come from :mod:`neat_lightning.data.generators.grids`; images are rendered and tokenised on the fly, all
images of a batch in one tokenizer call. Training batch ``k`` is a pure function of ``(seed, k, rank)`` (episode
seeds and start steps are derived from it) and the loader starts at the trainer's global step, so a resumed run sees
exactly the batches of the uninterrupted one. Validation is a fixed set of episodes from ``val_seed`` (another seed
space), tokenised once and cached.

Batches are dicts: ``ids`` (B, T + 1) int64 — the :class:`~neat_lightning.modules.NeatModel` batch format.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from neat_lightning.codec import BOS_ID, EOS_ID, PAD_ID, VisualVocab, encode
from neat_lightning.data.generators.grids import FAMILIES, Family, generate_episode, render, seed_from
from neat_lightning.data.loading import PlacedLoader, ShardedSequentialBatches, StepAlignedBatches, check_positive
from neat_lightning.protocols import ImageTokenizer

TOKENIZER_HINT = (
    "give tokenizer (in YAML: class_path: neat_lightning.modules.vqvae.VQVAETokenizer, init_args: {ckpt_path: ...}) "
    "or call set_tokenizer()"
)


def check_image_tokenizer(tokenizer: object, field: str = "tokenizer") -> None:
    """Raise ``TypeError`` naming the class unless ``tokenizer`` implements :class:`ImageTokenizer`."""
    if not isinstance(tokenizer, ImageTokenizer):
        raise TypeError(
            f"{field}: {type(tokenizer).__name__} does not implement the ImageTokenizer protocol "
            "(codebook_size, grid_shape(image_size), encode(images))"
        )


def header_text(family: str) -> str:
    return f"{family}\n"


def action_text(action: str) -> str:
    return f"\n{action}\n"


@dataclass(frozen=True)
class Window:
    """Steps ``start .. start + n`` of an episode (``n`` transitions) and whether the row ends with the episode."""

    start: int
    n: int
    ends: bool


def row_length(vocab: VisualVocab, family: str, actions: Sequence[str]) -> int:
    """Ids of a row with the first image and one step per action (BOS, header, images, action texts; no EOS)."""
    text = len(header_text(family).encode()) + sum(len(action_text(a).encode()) for a in actions)
    return 1 + text + (len(actions) + 1) * vocab.image_length


def fit_window(vocab: VisualVocab, family: str, actions: Sequence[str], start: int, length: int,
               max_steps: int | None) -> Window:
    """The longest window of steps from ``start`` that fits in ``length`` ids (EOS included when it ends)."""
    n = 0
    last = len(actions) if max_steps is None else min(len(actions), start + max_steps)
    while start + n < last and row_length(vocab, family, actions[start : start + n + 1]) <= length:
        n += 1  # a loop over the steps of one episode (a handful), not over tokens
    ends = start + n == len(actions) and row_length(vocab, family, actions[start : start + n]) + 1 <= length
    return Window(start, n, ends)


def assemble_row(vocab: VisualVocab, family: str, actions: Sequence[str], image_ids: torch.Tensor, window: Window,
                 length: int) -> torch.Tensor:
    """One row (length,) int64: BOS, header, image of step ``start``, then action text + next image per step.

    Args:
        image_ids: (n + 1, h w + 2) the window's images as ids (BOI, codes, EOI).
    """
    parts = [torch.tensor([BOS_ID]), encode(header_text(family)), image_ids[0]]
    for i in range(window.n):
        parts += [encode(action_text(actions[window.start + i])), image_ids[i + 1]]
    if window.ends:
        parts.append(torch.tensor([EOS_ID]))
    row = torch.cat(parts)
    assert len(row) <= length, f"row of {len(row)} ids exceeds {length}"
    return torch.cat([row, torch.full((length - len(row),), PAD_ID, dtype=torch.long)])


class EpisodeTokenizer:
    """Renders grid-world states and turns them into image ids with an image tokenizer (one call per batch)."""

    def __init__(self, tokenizer: ImageTokenizer, image_size: int, grid_size: int) -> None:
        check_image_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.image_size, self.grid_size = image_size, grid_size
        self.vocab = VisualVocab(int(tokenizer.codebook_size), tuple(tokenizer.grid_shape(image_size)))

    @torch.no_grad()
    def image_ids(self, states: torch.Tensor) -> torch.Tensor:
        """(N, n, n) cell classes -> (N, h w + 2) ids."""
        return self.vocab.image_ids(self.tokenizer.encode(render(states, self.image_size)).cpu())

    def rows(self, episodes: Sequence[Any], starts: Sequence[int], length: int,
             max_steps: int | None) -> torch.Tensor:
        """Rows (B, length) of episodes from the given start steps; all images tokenised in one call."""
        windows = [fit_window(self.vocab, ep.family, ep.actions, s, length, max_steps)
                   for ep, s in zip(episodes, starts)]
        for ep, w in zip(episodes, windows):
            if w.n == 0:
                need = row_length(self.vocab, ep.family, ep.actions[w.start : w.start + 1])
                raise ValueError(
                    f"block_size={length - 1} is too short for one step of a {ep.family} episode: it needs "
                    f"{need} ids (two images of {self.vocab.image_length} ids); raise block_size"
                )
        states = torch.cat([ep.states[w.start : w.start + w.n + 1] for ep, w in zip(episodes, windows)])
        ids = self.image_ids(states)  # (sum(n + 1), h w + 2)
        chunks = ids.split([w.n + 1 for w in windows])
        return torch.stack([assemble_row(self.vocab, ep.family, ep.actions, c, w, length)
                            for ep, c, w in zip(episodes, chunks, windows)])


def episode_for(families: Sequence[str], grid_size: int, *keys: Any):
    """The episode (and a start step) for a key tuple: family ``families[hash % len]`` and a uniform start step."""
    s = seed_from(*keys)
    family = families[s % len(families)]
    ep = generate_episode(family, s, grid_size)
    start = random.Random(s).randrange(len(ep.actions))  # at least one transition after it
    return ep, start


class EpisodeBatches(StepAlignedBatches):
    """Training stream: batch ``k`` on ``rank`` holds ``batch_size`` rows of episodes keyed by (seed, k, rank, i)."""

    def __init__(self, tokenizer: EpisodeTokenizer, families: Sequence[str], grid_size: int, block_size: int,
                 batch_size: int, batches_per_epoch: int, seed: int, max_steps: int | None) -> None:
        super().__init__(batches_per_epoch)
        self.tokenizer, self.families, self.grid_size = tokenizer, tuple(families), grid_size
        self.block_size, self.batch_size, self.seed, self.max_steps = block_size, batch_size, seed, max_steps

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        picks = [episode_for(self.families, self.grid_size, "mm-train", self.seed, k, self.rank, i)
                 for i in range(self.batch_size)]
        ids = self.tokenizer.rows([p[0] for p in picks], [p[1] for p in picks], self.block_size + 1, self.max_steps)
        return {"ids": ids}


class FixedRows(ShardedSequentialBatches):
    def convert(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ids": batch}


class MultimodalDataModule(L.LightningDataModule):
    """Interleaved "text action -> next-state image" rows of grid-world episodes for NeatModel's MVoT path.

    Images are tokenised by ``tokenizer``, an :class:`~neat_lightning.protocols.ImageTokenizer` (a frozen VQ-VAE:
    ``neat_lightning.modules.vqvae.VQVAETokenizer(ckpt_path)``, or ``VQVAETokenizer.from_vqvae(vqvae)`` in scripts).
    It must give the image tokens the model reads (the same codebook size and code grid as the model's
    ``vqvae_ckpt`` at its ``image_size``); :attr:`vocab` is what the model checks. :meth:`set_tokenizer` sets or
    replaces it after construction.

    Args:
        families: episode families to draw from (``maze``, ``frozenlake``, ``minibehavior``).
        grid_size: cells per side of the worlds.
        image_size: image side in pixels (a multiple of ``grid_size`` and of the VQ-VAE's ``downsample``).
        block_size: context length; rows are ``block_size + 1`` ids and hold whole images only.
        max_steps_per_row: at most this many transitions per row (``None``: as many as fit).
        batch_size: rows per batch (per device).
        batches_per_epoch: training batches per epoch and rank.
        val_rows: rows of the held-out validation set.
        seed: seed of the training stream.
        val_seed: seed of the validation episodes (another seed space: held-out episodes).
        tokenizer: the image tokenizer; ``None`` until :meth:`set_tokenizer` (``setup`` raises without one). Not a
            saved hyperparameter (it holds a model).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        families: list[Family] = ["maze"],
        grid_size: int = 8,
        image_size: int = 32,
        block_size: int = 256,
        max_steps_per_row: int | None = None,
        batch_size: int = 16,
        batches_per_epoch: int = 500,
        val_rows: int = 64,
        seed: int = 1234,
        val_seed: int = 999_983,
        tokenizer: ImageTokenizer | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not families:
            raise ValueError(f"families=[] must name at least one of {list(FAMILIES)}")
        for f in families:
            if f not in FAMILIES:
                raise ValueError(f"families: {f!r} is not one of {list(FAMILIES)}")
        if grid_size < 5:
            raise ValueError(f"grid_size={grid_size} must be >= 5")
        if image_size % grid_size:
            raise ValueError(f"image_size={image_size} must be a multiple of grid_size={grid_size}")
        check_positive(block_size=block_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                       val_rows=val_rows)
        if max_steps_per_row is not None and max_steps_per_row < 1:
            raise ValueError(f"max_steps_per_row={max_steps_per_row} must be >= 1 or None")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.families, self.grid_size, self.image_size = list(families), grid_size, image_size
        self.block_size, self.max_steps = block_size, max_steps_per_row
        self.batch_size, self.batches_per_epoch, self.val_rows = batch_size, batches_per_epoch, val_rows
        self.seed, self.val_seed, self.num_workers = seed, val_seed, num_workers
        self.tokenizer: ImageTokenizer | None = None
        self.episode_tokenizer: EpisodeTokenizer | None = None
        self.val_set: torch.Tensor | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: ImageTokenizer) -> None:
        """Tokenise images with ``tokenizer`` from now on; drops a cached validation set."""
        self.episode_tokenizer = EpisodeTokenizer(tokenizer, self.image_size, self.grid_size)
        self.tokenizer = tokenizer
        self.val_set = None

    def _episodes(self) -> EpisodeTokenizer:
        if self.episode_tokenizer is None:
            raise ValueError(f"MultimodalDataModule needs a VQ-VAE tokenizer (an ImageTokenizer): {TOKENIZER_HINT}")
        return self.episode_tokenizer

    @property
    def vocab(self) -> VisualVocab:
        """The image-token layout of the rows (codebook size, code grid); the model checks it against its own."""
        return self._episodes().vocab

    def setup(self, stage: str | None = None) -> None:
        self._episodes()
        if self.val_set is None:
            self.val_set = self.rows("mm-val", self.val_seed, self.val_rows)

    def rows(self, split: str, seed: int, n: int) -> torch.Tensor:
        """``n`` rows of the fixed set of (split, seed): (n, block_size + 1) int64."""
        picks = [episode_for(self.families, self.grid_size, split, seed, i) for i in range(n)]
        return self._episodes().rows([p[0] for p in picks], [p[1] for p in picks], self.block_size + 1,
                                     self.max_steps)

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _place(self, ds, train: bool) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if train:
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def _loader(self, ds, train: bool) -> DataLoader:
        self._place(ds, train)
        return PlacedLoader(ds, functools.partial(self._place, train=train), num_workers=self.num_workers,
                            persistent_workers=False, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        ds = EpisodeBatches(self._episodes(), self.families, self.grid_size, self.block_size, self.batch_size,
                            self.batches_per_epoch, self.seed, self.max_steps)
        return self._loader(ds, True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(FixedRows(self.val_set, self.batch_size), False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ----------------------------------------------------------------------------------------------------------------------
# next-state prediction examples (evaluation)


@dataclass(frozen=True)
class NextStateExamples:
    """Held-out next-state predictions: prompt ids end with the BOI of the image to predict.

    Attributes:
        prompts: list of (T_i,) int64 prompts (BOS, header, image of s_t, action text, BOI).
        target_codes: (N, h, w) the VQ-VAE codes of the true next state.
        target_states: (N, n, n) the true next state's cell classes (the grids module's symbolic state).
        previous_codes: (N, h, w) the codes of the current state (the "copy the last image" baseline).
    """

    prompts: list[torch.Tensor]
    target_codes: torch.Tensor
    target_states: torch.Tensor
    previous_codes: torch.Tensor


def next_state_examples(tokenizer: EpisodeTokenizer, n: int, seed: int, families: Sequence[str] = ("maze",),
                        split: str = "mm-val") -> NextStateExamples:
    """``n`` one-step next-state predictions from the episodes of (split, seed), the same episodes and start
    steps as the rows of :meth:`MultimodalDataModule.rows` with that split and seed."""
    vocab = tokenizer.vocab
    picks = [episode_for(families, tokenizer.grid_size, split, seed, i) for i in range(n)]
    states = torch.stack([torch.stack([ep.states[s], ep.states[s + 1]]) for ep, s in picks])  # (N, 2, n, n)
    ids = tokenizer.image_ids(states.flatten(0, 1)).view(n, 2, -1)  # (N, 2, h w + 2)
    prompts = [
        torch.cat([torch.tensor([BOS_ID]), encode(header_text(ep.family)), ids[i, 0],
                   encode(action_text(ep.actions[s])), torch.tensor([vocab.boi])])
        for i, (ep, s) in enumerate(picks)
    ]
    codes = vocab.codes_from_ids(ids[:, :, 1:-1].flatten(0, 1)).view(n, 2, *vocab.grid)
    return NextStateExamples(prompts, codes[:, 1], states[:, 1], codes[:, 0])
