"""Energy flow through the lattice: carriers with a position, a small recurrent state and an energy move through a
``D × H × W`` lattice of cells, reading and writing the cells they pass.

One step, for every live carrier at once (no loop over carriers or cells):

1. the carrier's cell is the *nearest* lattice cell by arithmetic rounding of its position (no distance search):
   ``i = round((p + 1) / 2 · (n − 1))`` per axis, positions normalised to ``[-1, 1]³``;
2. it reads the cell's state ``(C,)`` and updates its recurrent state (a GRU cell) from the read, its memory of the
   last ``memory`` positions and its energy;
3. it writes ``energy · write(h)`` into the cell (``index_add`` over all carriers, so carriers sharing a cell add);
4. it moves: the displacement ``max_step · tanh(move(h))`` plus a drift of one cell per step towards the output face
   is **clamped to ±max_step·(1 + drift) before** it is applied, and the new position is **clamped to [-1, 1] after**;
5. energy decays by ``energy_decay``; a carrier stops when it reaches the output face (depth coordinate 1) or its
   energy falls below ``min_energy``.

Carriers start on the input face (depth coordinate −1) at uniformly random ``(h, w)`` positions drawn in one
vectorised call; the input face's cells hold the encoded question. The output face (the last ``H·W`` cells) is what
the decoder reads. The lattice's size, channels and steps come from its
:class:`~neat_lightning.components.lattice.LatticeConfig`; :class:`EnergyFlowConfig` holds the carriers' own
settings.

Axis legend: ``b`` batch, ``p`` carriers, ``c`` cell channels, ``s`` carrier state, ``m`` remembered positions,
``n`` cells (``d·h·w``), ``x`` the three position axes (d, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import nn

from neat_lightning.components.lattice import LatticeConfig


@dataclass(frozen=True)
class EnergyFlowConfig:
    """The carriers: how many, their state, how far and how long they move."""

    carriers: int = 1024  # P: carriers per sample
    carrier_dim: int = 8  # S: recurrent state per carrier
    max_step: float = 0.1  # largest learned displacement per axis and step, in normalised units
    energy_decay: float = 0.98  # energy multiplier per step
    min_energy: float = 1e-3  # carriers below this energy stop
    memory: int = 5  # remembered past positions

    def __post_init__(self) -> None:
        for name in ("carriers", "carrier_dim", "memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.max_step > 0:
            raise ValueError(f"max_step={self.max_step} must be > 0")
        if not 0.0 < self.energy_decay <= 1.0:
            raise ValueError(f"energy_decay={self.energy_decay} must be in (0, 1]")


def drift_per_step(depth: int) -> float:
    """Displacement along depth per step that crosses a lattice of ``depth`` planes in ``depth - 1`` steps (one cell
    per step), in normalised units."""
    return 2.0 / max(depth - 1, 1)


@dataclass
class Carriers:
    """The carriers of a batch (every field has leading dims (B, P))."""

    position: torch.Tensor  # (B, P, 3) in [-1, 1], axes (d, h, w)
    hidden: torch.Tensor  # (B, P, S)
    energy: torch.Tensor  # (B, P)
    memory: torch.Tensor  # (B, P, M, 3) last M positions, oldest first
    alive: torch.Tensor  # (B, P) bool

    def numel(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def nearest_cell(position: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest cell by arithmetic rounding (no distance search). position (..., 3) in [-1, 1] -> (...) int64 cell
    index ``(d·H + h)·W + w``."""
    dims = torch.tensor(size, device=position.device, dtype=position.dtype)
    idx = torch.round((position.detach() + 1) / 2 * (dims - 1))
    idx = torch.minimum(idx.clamp_min(0), dims - 1).long()  # (..., 3)
    D, H, W = size
    return (idx[..., 0] * H + idx[..., 1]) * W + idx[..., 2]


def spawn_carriers(config: EnergyFlowConfig, batch: int, device=None, dtype=torch.float32,
                   generator: torch.Generator | None = None) -> Carriers:
    """``batch × carriers`` carriers on the input face at uniformly random (h, w), created in one vectorised call."""
    B, P = batch, config.carriers
    hw = torch.rand(B, P, 2, device=device, dtype=dtype, generator=generator) * 2 - 1
    position = torch.cat([torch.full((B, P, 1), -1.0, device=device, dtype=dtype), hw], dim=-1)
    return Carriers(
        position=position,
        hidden=torch.zeros(B, P, config.carrier_dim, device=device, dtype=dtype),
        energy=torch.ones(B, P, device=device, dtype=dtype),
        memory=repeat(position, "b p x -> b p m x", m=config.memory).clone(),
        alive=torch.ones(B, P, dtype=torch.bool, device=device),
    )


def respawn(carriers: Carriers, config: EnergyFlowConfig, generator: torch.Generator | None = None) -> Carriers:
    """Replace stopped carriers by fresh ones on the input face (one vectorised draw for all), for long runs."""
    dead = ~carriers.alive  # (B, P)
    fresh = spawn_carriers(config, carriers.alive.shape[0], carriers.position.device, carriers.position.dtype,
                           generator)
    pick = lambda new, old: torch.where(dead.reshape(*dead.shape, *[1] * (old.dim() - 2)), new, old)  # noqa: E731
    return Carriers(*(pick(n, o) for n, o in zip(vars(fresh).values(), vars(carriers).values())))


class EnergyFlow(nn.Module):
    """Learned carrier dynamics: a GRU cell over (cell read, position memory, energy), a move head and a write head,
    shared by every carrier."""

    def __init__(self, config: EnergyFlowConfig, lattice: LatticeConfig) -> None:
        super().__init__()
        self.config, self.lattice = config, lattice
        n_in = lattice.channels + 3 * config.memory + 1
        self.cell = nn.GRUCell(n_in, config.carrier_dim)
        self.move = nn.Linear(config.carrier_dim, 3)
        self.write = nn.Linear(config.carrier_dim, lattice.channels)
        nn.init.zeros_(self.move.weight)  # start by drifting straight to the output face
        nn.init.zeros_(self.move.bias)

    @property
    def drift(self) -> float:
        """Displacement along depth per step (:func:`drift_per_step` of the lattice's depth)."""
        return drift_per_step(self.lattice.depth)

    def step(self, cells: torch.Tensor, carriers: Carriers) -> tuple[torch.Tensor, Carriers]:
        """One carrier step. cells (B, N, C) -> (next cells (B, N, C), next carriers)."""
        cfg = self.config
        B, N, C = cells.shape
        P = carriers.position.shape[1]
        idx = nearest_cell(carriers.position, self.lattice.size)  # (B, P)
        flat = rearrange(idx + N * torch.arange(B, device=idx.device)[:, None], "b p -> (b p)")
        read = rearrange(cells, "b n c -> (b n) c")[flat]  # (B·P, C)
        x = torch.cat([read, rearrange(carriers.memory, "b p m x -> (b p) (m x)"),
                       rearrange(carriers.energy, "b p -> (b p) 1")], dim=-1)
        alive = rearrange(carriers.alive, "b p -> (b p) 1")
        live = alive.to(cells.dtype)
        h_old = rearrange(carriers.hidden, "b p s -> (b p) s")
        h = torch.where(alive, self.cell(x, h_old), h_old)  # (B·P, S); stopped carriers keep their state
        deposit = self.write(h) * (rearrange(carriers.energy, "b p -> (b p) 1") * live)  # (B·P, C)
        # in place: the read above saved only the index, so autograd allows it (and it saves a copy of the lattice)
        cells = rearrange(rearrange(cells, "b n c -> (b n) c").index_add_(0, flat, deposit), "(b n) c -> b n c", b=B)
        # move: clamp the displacement before applying it, the position after
        limit = cfg.max_step * (1 + self.drift)
        drift = torch.tensor([self.drift, 0.0, 0.0], device=h.device, dtype=h.dtype)
        disp = (cfg.max_step * torch.tanh(self.move(h)) + drift).clamp(-limit, limit)
        position = (rearrange(carriers.position, "b p x -> (b p) x") + live * disp).clamp(-1.0, 1.0)
        position = rearrange(position, "(b p) x -> b p x", b=B)
        energy = carriers.energy * torch.where(carriers.alive, cfg.energy_decay, 1.0)
        alive = carriers.alive & (position[..., 0] < 1.0) & (energy >= cfg.min_energy)
        memory = torch.cat([carriers.memory[:, :, 1:], position[:, :, None]], dim=2)
        return cells, Carriers(position, rearrange(h, "(b p) s -> b p s", b=B, p=P), energy, memory, alive)

    def forward(
        self, input_face: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Carriers]:
        """Run the flow from a lattice whose input face holds ``input_face``.

        Args:
            input_face: (B, H·W, C) encoded input.
            steps: carrier steps (default the lattice's ``steps``).
            generator: for the carriers' starting positions.

        Returns:
            ``(cells (B, N, C), carriers after the last step)``.
        """
        lat = self.lattice
        B, n_face, C = input_face.shape
        N = lat.depth * lat.height * lat.width
        cells = torch.cat([input_face, input_face.new_zeros(B, N - n_face, C)], dim=1)  # a fresh tensor: written in place
        carriers = spawn_carriers(self.config, B, input_face.device, input_face.dtype, generator)
        for _ in range(lat.steps if steps is None else steps):  # over time steps, vectorised over carriers
            cells, carriers = self.step(cells, carriers)
        return cells, carriers
