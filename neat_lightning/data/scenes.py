"""Byte windows of rendered dialogue scenes for a Trainer: :class:`SceneDataModule`, optionally switching from a
pretraining DataModule mid-run.

The scene schema, its validator and the renderer are plain Python in :mod:`neat_lightning.data.generators.scenes`;
the built-in corpus is ``neat_lightning/data/scene_library/*.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from neat_lightning.choices import check_choice
from neat_lightning.data.bytes import (
    Document,
    RandomWindowBatches,
    SequentialWindowBatches,
    split_documents,
    stream_from_documents,
)
from neat_lightning.data.generators.scenes import Scene, SceneProblem, load_scenes, render_scene
from neat_lightning.data.loading import SwitchLoader, check_positive

log = logging.getLogger(__name__)

ValSource = Literal["scenes", "pretrain"]


def scene_documents(scenes: Sequence[Scene]) -> list[Document]:
    """Scenes -> byte documents keyed by ``scene_id`` (the key of the train/val split)."""
    return [Document(s.scene_id, render_scene(s).encode("utf-8")) for s in scenes]


# ----------------------------------------------------------------------------------------------------------------------
# the DataModule


class SceneDataModule(L.LightningDataModule):
    """Byte windows of rendered dialogue scenes, optionally after a pretraining DataModule.

    Alone, it serves random windows of the training scenes. With ``pretrain``, training batches come from that
    DataModule until the switch that :meth:`schedule_switch` sets (``LoRAFinalStage`` calls it in ``setup`` with its
    start step), then from the scenes; the switch is a function of the batch index, so it holds mid-epoch and on
    ``--ckpt_path`` resume (the pretraining loader must itself start at the trainer's global step, as
    ``ByteTextDataModule`` does). Epochs then have the pretraining loader's length.

    Args:
        scene_files: scene YAML files, globs or directories; ``None`` for the built-in corpus.
        strict: raise on any malformed file (listing all problems); ``False`` skips bad files with a warning.
        val_scenes: scene ids held out for validation; ``None`` splits by ``val_fraction`` (by id, deterministic).
        val_fraction: share of scenes held out when ``val_scenes`` is not given.
        block_size: context length; windows are ``block_size + 1`` ids.
        batch_size: windows per batch (per device).
        batches_per_epoch: training batches per epoch when there is no ``pretrain`` DataModule.
        seed: seed of the training windows.
        split_seed: seed of the train/val scene split.
        pretrain: the DataModule used before the switch (e.g. ``ByteTextDataModule``).
        val_source: validate on the held-out ``scenes`` or on the ``pretrain`` DataModule's validation set.
        replay: after the switch, the share of each batch's rows taken from the ``pretrain`` loader (rehearsal
            against forgetting the pretraining corpus); 0 trains on scenes only.
    """

    def __init__(
        self,
        scene_files: list[str] | None = None,
        strict: bool = True,
        val_scenes: list[str] | None = None,
        val_fraction: float = 0.15,
        block_size: int = 256,
        batch_size: int = 32,
        batches_per_epoch: int = 100,
        seed: int = 4321,
        split_seed: int = 0,
        pretrain: L.LightningDataModule | None = None,
        val_source: ValSource = "scenes",
        replay: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(block_size=block_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        check_choice("val_source", val_source, ValSource)
        if val_source == "pretrain" and pretrain is None:
            raise ValueError("val_source='pretrain' needs a pretrain DataModule")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay={replay} must be in [0, 1)")
        if replay and pretrain is None:
            raise ValueError(f"replay={replay} needs a pretrain DataModule to replay")
        self.save_hyperparameters(ignore=["pretrain"])
        self.scene_files, self.strict, self.val_scenes = scene_files, strict, val_scenes
        self.val_fraction, self.block_size, self.batch_size = val_fraction, block_size, batch_size
        self.batches_per_epoch, self.seed, self.split_seed = batches_per_epoch, seed, split_seed
        self.pretrain, self.val_source, self.replay = pretrain, val_source, replay
        self.scenes: list[Scene] = []
        self.problems: list[SceneProblem] = []
        self.train_docs: list[Document] = []
        self.val_docs: list[Document] = []
        self._switch: tuple[str, int] | None = None

    # -- the switch ------------------------------------------------------------------------------------------------

    def schedule_switch(self, step: int | None = None, epoch: int | None = None) -> None:
        """Serve scene batches from optimizer step ``step`` (or the first batch of ``epoch``) on."""
        if (step is None) == (epoch is None):
            raise ValueError(f"give exactly one of step={step} and epoch={epoch}")
        value = step if step is not None else epoch
        if value < 0:
            raise ValueError(f"{'step' if step is not None else 'epoch'}={value} must be >= 0")
        self._switch = ("step", step) if step is not None else ("epoch", epoch)

    def switch_batch(self, epoch_length: int) -> int | None:
        """Index of the first scene batch; ``None`` when no switch is scheduled (0 without ``pretrain``)."""
        if self.pretrain is None:
            return 0
        if self._switch is None:
            return None
        unit, value = self._switch
        if unit == "epoch":
            return value * epoch_length
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return value * accumulate

    # -- data ------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.pretrain is not None:
            self.pretrain.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain is not None:
            self.pretrain.trainer = self.trainer
            self.pretrain.setup(stage)
        if self.train_docs:
            return
        self.scenes, self.problems = load_scenes(self.scene_files, self.strict)
        if len(self.scenes) < 2:
            raise ValueError(f"scene_files={self.scene_files}: {len(self.scenes)} valid scene(s); need at least 2")
        docs = scene_documents(self.scenes)
        if self.val_scenes is not None:
            ids = {d.name for d in docs}
            unknown = sorted(set(self.val_scenes) - ids)
            if unknown:
                raise ValueError(f"val_scenes: unknown scene ids {unknown}")
            self.val_docs = [d for d in docs if d.name in self.val_scenes]
            self.train_docs = [d for d in docs if d.name not in self.val_scenes]
            if not self.train_docs:
                raise ValueError("val_scenes holds out every scene; none is left for training")
        else:
            self.train_docs, self.val_docs = split_documents(docs, self.val_fraction, self.split_seed)
        self.train_stream = stream_from_documents(self.train_docs)
        self.val_stream = stream_from_documents(self.val_docs)
        if len(self.train_stream) < self.block_size + 1:
            raise ValueError(
                f"the training scenes hold {len(self.train_stream)} ids, fewer than one window of "
                f"block_size + 1 = {self.block_size + 1}"
            )
        log.info("scenes: %d train / %d val (%d / %d bytes)", len(self.train_docs), len(self.val_docs),
                 len(self.train_stream), len(self.val_stream))

    def _place(self, ds: Any) -> None:
        trainer = self.trainer
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
            if isinstance(ds, RandomWindowBatches):
                ds.start_batch = trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> SwitchLoader:
        """Pretraining batches until the switch, then scene windows (batch ``k`` a pure function of
        ``(seed, k, rank)``), from the trainer's global step on."""
        scenes = RandomWindowBatches(self.train_stream, self.block_size, self.batch_size, self.batches_per_epoch,
                                     self.seed)
        self._place(scenes)
        pretrain = self.pretrain.train_dataloader() if self.pretrain is not None else None
        return SwitchLoader(scenes, pretrain, self._place, self.switch_batch, self.replay)

    def scene_val_dataloader(self) -> DataLoader:
        """Held-out scenes, covered once (every id after the first predicted exactly once)."""
        ds = SequentialWindowBatches(self.val_stream, self.block_size, self.batch_size)
        self._place(ds)
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> Any:
        if self.val_source == "pretrain":
            return self.pretrain.val_dataloader()
        return self.scene_val_dataloader()

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"pretrain": self.pretrain.state_dict()} if self.pretrain is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.pretrain is not None and "pretrain" in state_dict:
            self.pretrain.load_state_dict(state_dict["pretrain"])
