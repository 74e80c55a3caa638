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


@dataclass(frozen=True)
class ReplayPlan:
    """What a :class:`MemoryConsolidator`'s next training step does (SleepWakeConsolidation sets one per step).

    A *wake* step (``sleep=False``) trains on the data's batch, with ``replay`` stored sequences appended to it
    (plain experience replay when > 0), and stores the batch's most surprising windows. A *sleep* step
    (``sleep=True``) does not touch the data's batch: it trains the whole model on ``replay`` stored sequences drawn
    by priority, plus the options below, as one ordinary optimizer step (under DDP its gradients are all-reduced
    like any other step's; each rank replays its own buffer).
    """

    sleep: bool = False
    replay: int = 0  # stored sequences replayed by this step (per rank, per micro-batch)
    distill_weight: float = 0.0  # weight of the KL divergence to the pre-sleep model's outputs (LwF); sleep steps
    temperature: float = 2.0  # softmax temperature of that distillation (the loss is scaled by temperature²)
    distill_correct_only: bool = False  # distil only positions the pre-sleep model predicted right (argmax = target)
    memory_weight: float = 0.0  # weight of the Titans slow-memory consolidation loss, where the module has one
    memory_items: int = 512  # most important memory items per memory block in that loss
    rate: float = 1.0  # consolidation rate: multiplies the optimizer's learning rate for this step (sleep steps)
    phase_step: int = 0  # sleep steps already done in this sleep phase (0: the first; the teacher is taken then)

    def __post_init__(self) -> None:
        if self.replay < 0:
            raise ValueError(f"ReplayPlan.replay={self.replay} must be >= 0")
        if self.sleep and self.replay < 1:
            raise ValueError(f"ReplayPlan.replay={self.replay} must be >= 1 for a sleep step")
        for name in ("distill_weight", "memory_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ReplayPlan.{name}={getattr(self, name)} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"ReplayPlan.temperature={self.temperature} must be > 0")
        if not self.rate > 0:
            raise ValueError(f"ReplayPlan.rate={self.rate} must be > 0")


@runtime_checkable
class MemoryConsolidator(Protocol):
    """Keeps an episodic buffer of training sequences that sleep phases replay through the whole model
    (SleepWakeConsolidation). ``NeatModel`` and ``ByteLM`` implement it."""

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        """The stored sequences' bookkeeping, each tensor (M,) over the M filled entries: ``importance`` (surprise
        when stored, >= 0), ``priority`` (replay priority), ``age`` (optimizer steps since stored) and ``replays``
        (times replayed)."""
        ...

    def plan_step(self, plan: ReplayPlan) -> None:
        """Set what the next training step does (called before it, e.g. in ``on_train_batch_start``). A step
        without a plan is an ordinary training step that stores nothing."""
        ...

    def replay_stats(self) -> dict[str, float]:
        """What the last planned step measured: at least ``replay_loss`` (mean loss of the replayed sequences
        before the update; NaN when none were replayed), ``replayed`` and ``stored`` (entries held); sleep steps
        add ``distill_loss`` / ``memory_loss`` when those terms are on."""
        ...

    def reset_short_term(self) -> None:
        """Forget the short-term state of a sleep phase (the distillation teacher; NeatModel: the Titans
        associative items). The buffer of sequences stays (it is pruned by ``MemoryPrunable.prune_memory``)."""
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
    """Prunes its own episodic store (SleepWakeConsolidation, after each sleep step)."""

    def prune_memory(self, fraction: float) -> int:
        """Empty the ``fraction`` (in [0, 1)) of the filled entries with the lowest keep score (importance, usage
        and age, weighted as the module is configured); returns how many were emptied."""
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
