"""NeatBackbone: a byte transformer whose chosen blocks carry Titans long-term memory, and that memory's replay.

:meth:`NeatBackbone.forward_hidden` runs over any (B, T, C) embeddings (byte embeddings, or patch embeddings when
the BLT processor plugs in) and returns the hidden states plus the memory state, so segments can be streamed. The
memory side of sleep-wake consolidation lives here too: the episodic items of every memory block
(:meth:`~NeatBackbone.memory_snapshot`), their replay into the slow memory weights (:meth:`~NeatBackbone.consolidate`)
and pruning (:meth:`~NeatBackbone.prune_memory`). Plain ``torch``, no Lightning.

Shapes: ``B`` batch, ``T`` positions, ``C`` width, ``M`` episodic items, ``d`` memory width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from neat_lightning.components.titans import MemoryBlock, MemoryState, MemoryStats, TitansConfig
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig, rope_angles


class BackboneOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) after the final norm
    states: list[MemoryState | None]  # one per memory block
    stats: list[MemoryStats]  # one per active memory block


class NeatBackbone(ByteTransformer):
    """A :class:`ByteTransformer` whose ``memory_layers`` blocks are :class:`MemoryBlock` s.

    The base weights are initialised exactly as ``ByteTransformer(config)`` (the memory blocks are built afterwards
    and take over the plain blocks' weights), so with the same seed a model with and without memory share them.
    """

    def __init__(self, config: TransformerConfig, titans: TitansConfig | None, memory_layers: Sequence[int]) -> None:
        super().__init__(config)
        self.memory_layers = tuple(memory_layers) if titans is not None else ()
        for i in self.memory_layers:
            block = MemoryBlock(config, titans)
            block.load_state_dict(self.blocks[i].state_dict(), strict=False)
            self.blocks[i] = block

    def memory_blocks(self) -> list[MemoryBlock]:
        return [b for b in self.blocks if isinstance(b, MemoryBlock)]

    def forward_hidden(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        states: Sequence[MemoryState | None] | None = None,
        record: bool = False,
    ) -> BackboneOutput:
        """Embeddings x (B, T, C) -> normalised hidden states (B, T, C), next memory states, surprise stats.

        ``states`` (one per memory block, from a previous segment) continue the long-term memory across calls.
        """
        positions = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        cos, sin = rope_angles(positions, self.config.dim_head, self.config.rope_base)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mem_blocks = self.memory_blocks()
        states = list(states) if states is not None else [None] * len(mem_blocks)
        if len(states) != len(mem_blocks):
            raise ValueError(f"states has {len(states)} entries but the backbone has {len(mem_blocks)} memory blocks")
        new_states: list[MemoryState | None] = []
        stats: list[MemoryStats] = []
        j = 0
        for block in self.blocks:
            if isinstance(block, MemoryBlock):
                x, state, stat = block.forward_memory(x, cos, sin, positions, states[j], record=record)
                new_states.append(state)
                if stat is not None:
                    stats.append(stat)
                j += 1
            else:
                x = block(x, cos, sin, positions)
        return BackboneOutput(self.norm(x), new_states, stats)

    # -- the episodic memory: snapshot, replay, pruning --------------------------------------------------------------

    def memory_snapshot(self) -> dict[str, torch.Tensor]:
        """High-surprise items of every memory block: ``keys`` (M, d), ``values`` (M, d), ``importance`` (M,),
        ``layer`` (M,) int64 (which memory block holds the item)."""
        snaps = [b.memory.snapshot() for b in self.memory_blocks()]
        if not snaps:
            return {"keys": torch.empty(0, 0), "values": torch.empty(0, 0), "importance": torch.empty(0),
                    "layer": torch.empty(0, dtype=torch.long)}
        layer = torch.cat([torch.full((len(s["importance"]),), j, dtype=torch.long) for j, s in enumerate(snaps)])
        return {
            "keys": torch.cat([s["keys"] for s in snaps]),
            "values": torch.cat([s["values"] for s in snaps]),
            "importance": torch.cat([s["importance"] for s in snaps]),
            "layer": layer.to(snaps[0]["importance"].device),
        }

    def consolidation_loss(
        self, max_items: int | None = None, items: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """Importance-weighted associative loss of episodic items under the slow memory weights, averaged over the
        memory blocks that have items (differentiable; ``None`` when there are none).

        Args:
            max_items: without ``items``, each block replays its ``max_items`` most important items (None: all).
            items: a replay set in :meth:`memory_snapshot`'s layout (``keys``, ``values``, ``importance``,
                ``layer``), e.g. an importance-weighted draw; each block replays the items of its ``layer``.
        """
        losses = []
        for j, block in enumerate(self.memory_blocks()):
            if items is None:
                loss = block.memory.consolidation_loss(max_items)
            else:
                mine = items["layer"] == j  # (M,)
                loss = (block.memory.replay_loss(items["keys"][mine], items["values"][mine],
                                                 items["importance"][mine]) if bool(mine.any()) else None)
            if loss is not None:
                losses.append(loss)
        return torch.stack(losses).mean() if losses else None

    def consolidate(
        self, steps: int = 1, lr: float = 1e-2, max_items: int | None = 512,
        items: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Replay episodic items into the slow memory weights: ``steps`` SGD steps of :meth:`consolidation_loss` on
        the memories' initial weights only. Returns the loss before and after and the number of items replayed."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        params = [w for b in self.memory_blocks() for w in b.memory.weights]
        if items is None:
            count = float(sum(int((b.memory.episodic_importance > 0).sum()) for b in self.memory_blocks()))
        else:
            count = float(len(items["importance"]))
        with torch.enable_grad():
            first = None
            for _ in range(steps):
                loss = self.consolidation_loss(max_items, items)
                if loss is None:
                    return {"consolidation_loss": 0.0, "consolidation_loss_after": 0.0, "items": 0.0}
                first = float(loss.detach()) if first is None else first
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
            with torch.no_grad():
                after = self.consolidation_loss(max_items, items)
        return {"consolidation_loss": first, "consolidation_loss_after": float(after), "items": count}

    def prune_memory(self, fraction: float) -> int:
        """Empty the lowest-importance ``fraction`` of every memory block's filled episodic slots; returns how many."""
        return sum(block.memory.prune(fraction) for block in self.memory_blocks())

    def reset_short_term(self) -> None:
        """Forget the episodic (short-term) buffers; fast weights are per call and never outlive it."""
        for block in self.memory_blocks():
            block.memory.clear_episodic()
