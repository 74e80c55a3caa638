"""Duck-typed interfaces that callbacks rely on.

A callback never imports a concrete module class: it checks the module against one of these protocols in ``setup``
with :func:`require` and raises a ``TypeError`` naming the callback, the module class and the missing method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TextGenerator(Protocol):
    """Produces text continuations; used by the BLEU monitor."""

    def generate_text(self, prompts: list[str], max_new_bytes: int) -> list[str]: ...


@runtime_checkable
class MemoryConsolidator(Protocol):
    """Exposes a long-term memory that sleep phases can replay, consolidate and reset (SleepWakeConsolidation)."""

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        """The stored items, each tensor with a leading dim M: at least ``importance`` (M,) >= 0 (replay priority)
        besides the module's own keys (e.g. ``keys``, ``values`` (M, d), ``layer`` (M,))."""
        ...

    def consolidate(
        self, steps: int, lr: float, max_items: int | None, items: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Replay stored items into the slow weights: ``steps`` gradient steps of learning rate ``lr``.

        Args:
            steps: gradient steps of the consolidation loss.
            lr: their learning rate.
            max_items: without ``items``, replay at most this many items (the module's choice, e.g. the most
                important); None for all.
            items: a replay set drawn by the caller from :meth:`memory_snapshot` (same keys, a subset of the rows);
                None lets the module choose.

        Returns:
            at least ``consolidation_loss`` and ``consolidation_loss_after`` (before / after the replay).
        """
        ...

    def reset_short_term(self) -> None:
        """Forget the short-term (episodic) store."""
        ...


@dataclass(frozen=True)
class PlasticityProfile:
    """Learning-rate multipliers per plasticity rule and the activity threshold of one stage."""

    name: str
    stdp: float = 1.0
    bcm: float = 1.0
    competitive: float = 1.0
    activity_threshold: float = 0.01


@runtime_checkable
class Plastic(Protocol):
    """Switches its plasticity rules' learning-rate multipliers and spike threshold (PlasticityStages)."""

    def set_plasticity_profile(self, profile: PlasticityProfile) -> None: ...


@runtime_checkable
class ComponentSwitchable(Protocol):
    """Has named components that can be switched on and off during training (ComponentSchedule)."""

    def component_names(self) -> tuple[str, ...]:
        """The names ``set_component_active`` accepts."""
        ...

    def set_component_active(self, name: str, active: bool) -> None:
        """Switch component ``name`` on (``active=True``) or off."""
        ...


@runtime_checkable
class Releasable(Protocol):
    """Holds caches it can drop between steps (MemoryCleanup)."""

    def release_memory(self) -> int:
        """Drop caches; returns the bytes (or items) freed."""
        ...


@runtime_checkable
class MemoryPrunable(Protocol):
    """Prunes its own memory store (SleepWakeConsolidation, after each sleep step)."""

    def prune_memory(self, fraction: float) -> int:
        """Empty the lowest-importance ``fraction`` (in [0, 1)) of the filled slots; returns how many were emptied."""
        ...


@runtime_checkable
class StagedLattice(Protocol):
    """What clustering and pruning stages need besides ``Plastic`` (PlasticityStages)."""

    def set_clustering_enabled(self, enabled: bool) -> None:
        """Turn the functional clustering of the cells on or off."""
        ...

    def prune_connections(self, sparsity: float) -> float:
        """Prune the connections to the fraction ``sparsity`` (never regrowing); returns the sparsity reached."""
        ...


@dataclass(frozen=True)
class GrownParameter:
    """A parameter that a growth resized in place (the same object, so optimizers keep it), and how its values were
    carried over: ``resample`` maps any tensor of ``old_shape`` (e.g. an optimizer moment) to the new shape the
    same way."""

    parameter: torch.nn.Parameter
    old_shape: tuple[int, ...]
    resample: Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Growable(Protocol):
    """A module whose lattice grows during training, carrying over what it learnt (ProgressiveScaling)."""

    def current_size(self) -> tuple[int, int, int]:
        """The lattice size (D, H, W) now."""
        ...

    def estimate_memory(self, size: tuple[int, int, int], batch: int = 1, precision: str = "32-true") -> int:
        """Estimated peak bytes of one training step at ``size`` (batch ``batch``, Lightning ``precision``), with
        the lattice steps :meth:`grow` would give that size."""
        ...

    def grow(self, size: tuple[int, int, int], steps: int | None = None) -> dict[str, GrownParameter]:
        """Resize to ``size`` (and ``steps`` lattice steps; None: the current steps plus the depth added),
        resampling every per-cell value; returns the parameters whose shape changed, by name."""
        ...


# ----------------------------------------------------------------------------------------------------------------------
# what a DataModule is handed


@runtime_checkable
class ImageTokenizer(Protocol):
    """Turns images into grids of discrete codes: what ``data.multimodal.MultimodalDataModule`` needs from a
    VQ-VAE (``modules.vqvae.VQVAETokenizer`` loads one from a checkpoint, given in YAML by ``class_path``).

    ``codebook_size`` is a value, not a method, so check an object with ``isinstance(obj, ImageTokenizer)`` (which
    looks for all three members) rather than :func:`require`.
    """

    @property
    def codebook_size(self) -> int:
        """K: codes are ``0 .. K - 1``."""
        ...

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        """The code grid (h, w) of a square image of ``image_size`` pixels."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1] -> (B, h, w) int64 codes; changes no state."""
        ...


# ----------------------------------------------------------------------------------------------------------------------
# what the BLEU monitor and the LoRA stage need


@runtime_checkable
class StructureRecorder(Protocol):
    """Carries structural changes in its checkpoints (``modules.base.ResumableModule``): ``LoRAFinalStage`` records
    the adapters it injects, so ``load_from_checkpoint`` alone rebuilds them."""

    def record_structure(self, name: str, state: Any) -> None:
        """Record ``state`` (plain, picklable values) under ``name``; ``state=None`` forgets it."""
        ...


@runtime_checkable
class PromptSource(Protocol):
    """A DataModule with fixed validation prompts and their references (``QADataModule``, ``ByteTextDataModule``):
    where ``DecoderBLEUMonitor`` takes its prompts when it is given none."""

    def validation_pairs(self, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` ``(prompt, reference)`` pairs, the same on every call."""
        ...


@runtime_checkable
class DataSwitchable(Protocol):
    """A DataModule that switches its training stream at a given optimizer step or epoch (``SceneDataModule``):
    what ``LoRAFinalStage(switch_data=...)`` calls."""

    def schedule_switch(self, step: int | None = None, epoch: int | None = None) -> None: ...


def missing_methods(obj: object, protocol: type) -> list[str]:
    """Names of the protocol's methods that ``obj`` lacks (empty when it conforms)."""
    wanted = [n for n in getattr(protocol, "__protocol_attrs__", ()) if not n.startswith("_")]
    if not wanted:  # Python < 3.12 has no __protocol_attrs__
        wanted = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return [n for n in sorted(wanted) if not callable(getattr(obj, n, None))]


def require(obj: object, protocol: type, user: object) -> None:
    """Raise ``TypeError`` unless ``obj`` implements ``protocol``; the message names ``user`` (a callback)."""
    missing = missing_methods(obj, protocol)
    if missing:
        raise TypeError(
            f"{type(user).__name__} needs a module implementing the {protocol.__name__} protocol, but "
            f"{type(obj).__name__} lacks {', '.join(f'`{m}`' for m in missing)}."
        )
