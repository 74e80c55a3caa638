"""Duck-typed interfaces that callbacks rely on.

A callback never imports a concrete module class: it checks the module against one of these protocols in ``setup``
with :func:`require` and raises a ``TypeError`` naming the callback, the module class and the missing method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TextGenerator(Protocol):
    """Produces text continuations; used by the BLEU monitor."""

    def generate_text(self, prompts: list[str], max_new_bytes: int) -> list[str]: ...


@runtime_checkable
class MemoryConsolidator(Protocol):
    """Exposes a long-term memory that sleep phases can replay, consolidate and reset."""

    def memory_snapshot(self) -> dict[str, torch.Tensor]: ...

    def consolidate(self, *args: Any, **kwargs: Any) -> dict[str, float]: ...

    def reset_short_term(self) -> None: ...


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
    def set_plasticity_profile(self, profile: PlasticityProfile) -> None: ...


@runtime_checkable
class ComponentSwitchable(Protocol):
    def set_component_active(self, name: str, active: bool) -> None: ...


@runtime_checkable
class Releasable(Protocol):
    def release_memory(self) -> int: ...


@runtime_checkable
class MemoryPrunable(Protocol):
    """Optional: a module that prunes its own memory (else :func:`prune_low_importance` prunes episodic buffers)."""

    def prune_memory(self, fraction: float) -> int: ...

@runtime_checkable
class StagedLattice(Protocol):
    """What clustering and pruning stages need besides ``Plastic``."""

    def set_clustering_enabled(self, enabled: bool) -> None: ...

    def prune_connections(self, sparsity: float) -> float: ...

@runtime_checkable
class Growable(Protocol):
    def grow(self, size: tuple[int, int, int], steps: int | None = None) -> dict[str, torch.nn.Parameter]: ...


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
