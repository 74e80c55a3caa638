"""EpisodicBuffer: the training windows a model keeps for replay during sleep, and the distillation loss of sleep.

During wake a module offers every training window with its *surprise*: the window's loss (or the Titans memory's
surprise) divided by a running mean of the batch losses, so a window scores by how unexpected it was for the model
of its time, not by how untrained that model was. The buffer keeps ``capacity`` windows ranked by a *keep score*
that combines importance (the surprise when stored), usage (times replayed) and age (optimizer steps since stored):

    log w = log importance − usage_weight · log(1 + replays) − age_weight · age

With ``policy="greedy"`` the keep score is ``log w``: the buffer holds the highest-weight windows ever seen. With
``policy="reservoir"`` (the default) each window draws ``u ~ U(0, 1)`` when offered and its key is ``log(u) / w``
(Efraimidis and Spirakis' weighted reservoir, A-Res): the buffer is a sample of the *whole* stream in which a
window's chance to be kept grows with its weight, so an early task is not pushed out by whichever task is newest.
Pruning empties the lowest keys first.

Sleep draws entries with probability proportional to ``priority ** priority_exponent`` (prioritised replay,
Schaul et al. 2016): the priority starts at the importance and becomes the entry's relative loss each time it is
replayed, so what the model has forgotten is replayed more.

Everything random takes a ``torch.Generator`` from the caller (derived from seed, step and rank, so a resumed run
draws the same). The buffer is plain tensors, not registered buffers: under DDP each rank keeps its own (DDP would
otherwise broadcast rank 0's buffers at every forward), and :meth:`state_dict` / :meth:`load_state_dict` carry it
in checkpoints. Plain ``torch``, no Lightning.

Shapes: ``C`` capacity, ``B`` offered windows, ``L`` window length, ``M`` filled entries, ``T`` positions,
``V`` vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from neat_lightning.choices import check_choice

Policy = Literal["reservoir", "greedy"]
Surprise = Literal["loss", "titans"]


@dataclass(frozen=True)
class EpisodicConfig:
    """The episodic buffer of training windows that sleep replays (:class:`EpisodicBuffer`)."""

    capacity: int = 256  # windows kept (per rank); the ids cost capacity × (block_size + 1) × 8 bytes
    policy: Policy = "reservoir"  # what stays when the buffer is full (module docstring)
    writes_per_step: int | None = None  # offer only the most surprising windows of each batch; None: all of them
    surprise: Surprise = "loss"  # per-window loss, or the Titans memory's surprise (NeatModel)
    surprise_momentum: float = 0.9  # running mean of the batch surprise that a window's surprise is divided by
    usage_weight: float = 0.0  # keep weight falls as (1 + replays) ** -usage_weight: well-rehearsed windows go first
    age_weight: float = 0.0  # keep weight falls as exp(-age_weight · age), age in optimizer steps
    priority_exponent: float = 1.0  # replay draws ∝ priority ** exponent; 0 draws uniformly
    seed: int = 0  # seed of the buffer's random draws (with the step and the rank)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"EpisodicConfig.capacity={self.capacity} must be >= 1")
        check_choice("EpisodicConfig.policy", self.policy, Policy)
        check_choice("EpisodicConfig.surprise", self.surprise, Surprise)
        if self.writes_per_step is not None and self.writes_per_step < 1:
            raise ValueError(f"EpisodicConfig.writes_per_step={self.writes_per_step} must be >= 1 or None")
        if not 0.0 <= self.surprise_momentum < 1.0:
            raise ValueError(f"EpisodicConfig.surprise_momentum={self.surprise_momentum} must be in [0, 1)")
        for name in ("usage_weight", "age_weight", "priority_exponent"):
            if getattr(self, name) < 0:
                raise ValueError(f"EpisodicConfig.{name}={getattr(self, name)} must be >= 0")


BOOKKEEPING = ("importance", "priority", "written", "replays", "u", "filled")
RUNNING = ("mean_surprise", "mean_loss", "observed")


class EpisodicBuffer:
    """``capacity`` stored windows (any named per-row tensors, e.g. ``ids`` (L,), ``answer_ids`` (L,), ``task`` ())
    with their importance, priority, step written, replay count and reservoir draw.

    The row tensors are allocated at the first :meth:`write`, with the shapes and dtypes of the rows offered; later
    rows must match them.
    """

    def __init__(self, config: EpisodicConfig) -> None:
        self.config = config
        self.rows: dict[str, torch.Tensor] = {}  # name -> (C, ...) stored rows
        self.importance = torch.zeros(config.capacity)  # surprise when stored (relative, ~1), 0 when empty
        self.priority = torch.zeros(config.capacity)  # replay priority
        self.written = torch.zeros(config.capacity, dtype=torch.long)  # optimizer step when stored
        self.replays = torch.zeros(config.capacity, dtype=torch.long)
        self.u = torch.ones(config.capacity)  # reservoir draw in (0, 1)
        self.filled = torch.zeros(config.capacity, dtype=torch.bool)
        self.mean_surprise = torch.zeros(())  # running mean of the batches' raw surprise
        self.mean_loss = torch.zeros(())  # running mean of the batches' loss (the unit of replay priorities)
        self.observed = torch.zeros((), dtype=torch.long)  # batches offered so far

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def device(self) -> torch.device:
        return self.importance.device

    def to(self, device: torch.device | str) -> EpisodicBuffer:
        """Move every tensor to ``device`` (in place); returns self."""
        for name in (*BOOKKEEPING, *RUNNING):
            setattr(self, name, getattr(self, name).to(device))
        self.rows = {k: v.to(device) for k, v in self.rows.items()}
        return self

    def log_weight(self, step: int) -> torch.Tensor:
        """(C,) ``log w`` of every slot at optimizer step ``step`` (-inf on empty slots)."""
        c = self.config
        age = (step - self.written).clamp_min(0).float()
        logw = self.importance.clamp_min(1e-12).log() - c.usage_weight * torch.log1p(self.replays.float())
        logw = logw - c.age_weight * age
        return logw.masked_fill(~self.filled, -math.inf)

    def keys(self, step: int) -> torch.Tensor:
        """(C,) keep keys (higher stays; -inf on empty slots): ``log w`` (greedy) or ``log(u) / w`` (reservoir)."""
        logw = self.log_weight(step)
        if self.config.policy == "greedy":
            return logw
        return (self.u.log() / logw.exp().clamp_min(1e-30)).masked_fill(~self.filled, -math.inf)

    def snapshot(self, step: int) -> dict[str, torch.Tensor]:
        """Filled entries' ``slot``, ``importance``, ``priority``, ``age`` and ``replays`` (each (M,), copies)."""
        slot = self.filled.nonzero().squeeze(1)
        return {"slot": slot, "importance": self.importance[slot].clone(), "priority": self.priority[slot].clone(),
                "age": (step - self.written[slot]).clamp_min(0), "replays": self.replays[slot].clone()}

    # -- write --------------------------------------------------------------------------------------------------

    @staticmethod
    def relative(value: torch.Tensor, running: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Raw values (B,) divided by their running mean (by the batch's own mean before the first batch)."""
        base = running if int(observed) > 0 else value.mean()
        return value / base.clamp_min(1e-12)

    @torch.no_grad()
    def write(self, rows: dict[str, torch.Tensor], surprise: torch.Tensor, step: int,
              generator: torch.Generator | None = None, loss: torch.Tensor | None = None) -> int:
        """Offer ``B`` windows; returns how many were stored.

        Args:
            rows: per-row tensors, each (B, ...), the same names, trailing shapes and dtypes at every call.
            surprise: (B,) raw surprise (loss in nats, or the Titans surprise) of each window, >= 0.
            step: the optimizer step (the windows' age counts from it).
            generator: CPU generator of the reservoir draws (policy ``reservoir``).
            loss: (B,) the windows' loss in nats when ``surprise`` is not the loss (replay priorities are losses
                relative to the running mean loss).
        """
        c = self.config
        surprise = surprise.detach().float()
        b = surprise.shape[0]
        for name, value in rows.items():
            if value.shape[0] != b:
                raise ValueError(f"EpisodicBuffer.write: rows[{name!r}] has {value.shape[0]} rows, surprise has {b}")
        if not self.rows:
            self.to(surprise.device)
            self.rows = {k: torch.zeros((c.capacity, *v.shape[1:]), dtype=v.dtype, device=surprise.device)
                         for k, v in rows.items()}
        elif self.device != surprise.device:
            self.to(surprise.device)
        self.check_rows(rows)
        loss = surprise if loss is None else loss.detach().float()
        importance = self.relative(surprise, self.mean_surprise, self.observed).clamp_min(1e-6)  # (B,)
        m, first = float(c.surprise_momentum), int(self.observed) == 0
        self.mean_surprise = surprise.mean() if first else m * self.mean_surprise + (1 - m) * surprise.mean()
        self.mean_loss = loss.mean() if first else m * self.mean_loss + (1 - m) * loss.mean()
        self.observed = self.observed + 1
        offered = torch.arange(b, device=surprise.device)
        if c.writes_per_step is not None and b > c.writes_per_step:
            offered = torch.topk(importance, c.writes_per_step).indices.sort().values
        u = torch.rand(len(offered), generator=generator).clamp_min(1e-12).to(surprise.device)  # (n,)
        new_logw = importance[offered].log()
        new_keys = new_logw if c.policy == "greedy" else u.log() / new_logw.exp()
        keep = torch.topk(torch.cat([self.keys(step), new_keys]), c.capacity).indices  # over C slots + n offers
        winners = (keep[keep >= c.capacity] - c.capacity).sort().values  # offers that made it, in order, (k,)
        if len(winners) == 0:
            return 0
        kept_slot = torch.zeros(c.capacity, dtype=torch.bool, device=surprise.device)
        kept_slot[keep[keep < c.capacity]] = True
        slots = (~kept_slot).nonzero().squeeze(1)[: len(winners)]  # free or evicted slots, lowest index first
        src = offered[winners]
        for name, value in rows.items():
            self.rows[name][slots] = value[src].to(self.rows[name].dtype)
        self.importance[slots] = importance[src]
        self.priority[slots] = importance[src]
        self.written[slots] = step
        self.replays[slots] = 0
        self.u[slots] = u[winners]
        self.filled[slots] = True
        return len(winners)

    def check_rows(self, rows: dict[str, torch.Tensor]) -> None:
        if set(rows) != set(self.rows):
            raise ValueError(f"EpisodicBuffer.write: rows have fields {sorted(rows)}, the buffer stores "
                             f"{sorted(self.rows)}")
        for name, value in rows.items():
            if tuple(value.shape[1:]) != tuple(self.rows[name].shape[1:]):
                raise ValueError(
                    f"EpisodicBuffer.write: rows[{name!r}] are {tuple(value.shape[1:])} per row, the buffer stores "
                    f"{tuple(self.rows[name].shape[1:])}: every training batch must have the same window length"
                )

    # -- replay -------------------------------------------------------------------------------------------------

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) slots drawn ∝ priority ** priority_exponent, without replacement while ``n`` <= filled entries
        (with replacement beyond); empty (0,) when nothing is stored."""
        slot = self.filled.nonzero().squeeze(1)
        if len(slot) == 0 or n < 1:
            return torch.empty(0, dtype=torch.long, device=self.device)
        weight = self.priority[slot].float().clamp_min(1e-12).cpu() ** self.config.priority_exponent
        picked = torch.multinomial(weight, n, replacement=n > len(slot), generator=generator)
        return slot[picked.to(self.device)]

    def gather(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored rows of ``slots`` (n,), each (n, ...)."""
        return {k: v[slots] for k, v in self.rows.items()}

    @torch.no_grad()
    def replayed(self, slots: torch.Tensor, loss: torch.Tensor) -> None:
        """Count a replay of ``slots`` (n,) and set their priority to their loss (n,) measured now, relative to the
        running mean loss of the wake batches."""
        self.replays.index_add_(0, slots, torch.ones_like(slots))
        loss = loss.detach().float().to(self.device)
        self.priority[slots] = self.relative(loss, self.mean_loss, self.observed).clamp_min(1e-6)

    # -- pruning ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prune(self, fraction: float, step: int) -> int:
        """Empty the lowest-key ``fraction`` of the filled entries (rounded down); returns how many."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"prune fraction={fraction} must be in [0, 1]")
        k = int(len(self) * fraction)
        if k == 0:
            return 0
        gone = torch.topk(self.keys(step).masked_fill(~self.filled, math.inf), k, largest=False).indices
        self.filled[gone] = False
        self.importance[gone] = 0.0
        self.priority[gone] = 0.0
        return k

    def clear(self) -> None:
        """Forget every entry (the running mean of the surprise stays)."""
        self.filled.zero_()
        self.importance.zero_()
        self.priority.zero_()

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (loadable with ``weights_only``): the rows as ``rows.<name>`` and the bookkeeping."""
        state = {f"rows.{k}": v.clone() for k, v in self.rows.items()}
        for name in (*BOOKKEEPING, *RUNNING):
            state[name] = getattr(self, name).clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output; a different capacity fails naming both."""
        capacity = int(state["importance"].shape[0])
        if capacity != self.config.capacity:
            raise ValueError(f"the checkpoint's episodic buffer holds {capacity} windows, this model's "
                             f"episodic.capacity is {self.config.capacity}")
        device = self.device
        self.rows = {k[len("rows."):]: v.clone().to(device) for k, v in state.items() if k.startswith("rows.")}
        for name in (*BOOKKEEPING, *RUNNING):
            setattr(self, name, state[name].clone().to(device))


# ----------------------------------------------------------------------------------------------------------------------
# sleep's distillation term


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Learning-without-forgetting KL term (Li and Hoiem 2016; Hinton et al. 2015):
    ``τ² · mean over masked positions of KL(softmax(teacher / τ) ‖ softmax(student / τ))``.

    Args:
        student: (B, T, V) logits being trained.
        teacher: (B, T, V) logits of the frozen pre-sleep model (no gradient).
        mask: (B, T) bool, positions that count (non-PAD targets).
        temperature: τ > 0.

    Returns:
        () the scaled mean KL divergence in nats (0 when no position counts).
    """
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.detach().float() / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)  # (B, T)
    m = mask.float()
    return t * t * (kl * m).sum() / m.sum().clamp_min(1.0)
