"""Transformer² singular-value fine-tuning (SVF) and its task dispatcher (Sun et al. 2025, arXiv 2501.06252).

A chosen ``nn.Linear`` weight is decomposed once, ``W = U diag(σ) Vᵀ`` (cached as buffers; full SVD, or randomized
SVD of a given rank for large matrices), and each task ``k`` owns one vector ``z_k`` of ``r = rank`` scales:

    W_k = U diag(σ ⊙ z_k) Vᵀ                                     (eq. 1 of the paper; only z is trained)

We compute it as ``W + U diag(σ ⊙ (z_k − 1)) Vᵀ``, the same matrix up to the SVD's float round-off, so that
``z = 1`` gives *exactly* the base layer (bit-identical outputs) and a truncated SVD leaves the weight's residual
``W − U_r Σ_r V_rᵀ`` untouched. The delta is applied as two rank-``r`` products, never as a materialised matrix, so
each row of a batch can use its own mixture of experts:

    y = x Wᵀ + ((x V) ⊙ σ ⊙ (z̄_b − 1)) Uᵀ,     z̄_b = 1 + Σ_k mix_bk (z_k − 1)

(``mix`` one-hot picks an expert, a probability vector mixes them, all zeros is the base model).

The :class:`TaskDispatcher` is the paper's first inference pass: a linear classifier over the mean hidden state of
a prompt's first bytes, run on the base model, picks (``classify``) or mixes (``mixture``) the experts.

Axis legend: ``b`` batch, ``t`` tokens, ``r`` singular directions, ``k`` experts (tasks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neat_lightning.choices import check_choice

DispatchMode = Literal["classify", "mixture"]
SVDMethod = Literal["full", "randomized"]


class SVFLinear(nn.Linear):
    """``nn.Linear`` with per-task singular-value scales ``z`` (n_tasks, r).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        n_tasks: number of experts (one ``z`` vector each).
        rank: singular directions kept; ``None`` for all ``min(in, out)``.
        method: ``"full"`` (``torch.linalg.svd`` in float64) or ``"randomized"`` (``torch.svd_lowrank``, for large
            matrices; needs ``rank``).
        niter: subspace iterations of the randomized SVD.

    Attributes:
        svf_active: when False the layer is exactly ``nn.Linear``.
        mix: (B, n_tasks) expert weights for the next forward (set with :func:`svf_mixture`); ``None`` = base.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_tasks: int,
        rank: int | None = None,
        method: SVDMethod = "full",
        niter: int = 4,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        full = min(in_features, out_features)
        if n_tasks < 1:
            raise ValueError(f"n_tasks={n_tasks} must be >= 1")
        if rank is not None and not 1 <= rank <= full:
            raise ValueError(f"rank={rank} must be in [1, min(in, out) = {full}] or None")
        check_choice("method", method, SVDMethod)
        if method == "randomized" and rank is None:
            raise ValueError("method='randomized' needs a rank (randomized SVD approximates the top-rank directions)")
        r = full if rank is None else rank
        self.rank, self.method, self.niter = r, method, niter
        self.register_buffer("U", torch.zeros(out_features, r, device=device))
        self.register_buffer("S", torch.zeros(r, device=device))
        self.register_buffer("Vh", torch.zeros(r, in_features, device=device))
        self.register_buffer("decomposed", torch.tensor(False, device=device))
        self.z = nn.Parameter(torch.ones(n_tasks, r, device=device))
        self.svf_active = False
        self.mix: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, n_tasks: int, rank: int | None = None,
        method: SVDMethod = "full", niter: int = 4,
    ) -> "SVFLinear":
        """Wrap ``linear``, sharing its weight and bias *Parameters* (tying and optimizers keep working)."""
        new = cls(linear.in_features, linear.out_features, n_tasks, rank, method, niter, bias=linear.bias is not None,
                  device=linear.weight.device)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    @property
    def n_tasks(self) -> int:
        return self.z.shape[0]

    @torch.no_grad()
    def decompose(self) -> None:
        """Cache ``U, σ, Vᵀ`` of the current weight (float64 full SVD or randomized low-rank SVD)."""
        w = self.weight.detach().double()
        if self.method == "full":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, : self.rank], s[: self.rank], vh[: self.rank]
        else:
            u, s, v = torch.svd_lowrank(w, q=min(self.rank + 8, *w.shape), niter=self.niter)
            u, s, vh = u[:, : self.rank], s[: self.rank], v[:, : self.rank].T
        self.U.copy_(u.to(self.U.dtype))
        self.S.copy_(s.to(self.S.dtype))
        self.Vh.copy_(vh.to(self.Vh.dtype))
        self.decomposed.fill_(True)

    def effective_z(self, mix: torch.Tensor) -> torch.Tensor:
        """mix (B, n_tasks) -> per-row scales ``z̄`` (B, r) = 1 + Σ_k mix_k (z_k − 1)."""
        return 1.0 + mix.to(self.z.dtype) @ (self.z - 1.0)

    def svf_weight(self, task: int) -> torch.Tensor:
        """The adapted weight of expert ``task``, (out, in): ``W + U diag(σ (z_k − 1)) Vᵀ``."""
        return self.weight + (self.U * (self.S * (self.z[task] - 1.0))) @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ..., in) -> (B, ..., out). Exactly ``nn.Linear`` unless active with a mixture set."""
        y = F.linear(x, self.weight, self.bias)
        if not self.svf_active or self.mix is None:
            return y
        if not bool(self.decomposed):
            raise RuntimeError("SVFLinear is active but not decomposed; call decompose() (or activate the component)")
        if x.dim() < 2 or x.shape[0] != self.mix.shape[0]:
            raise ValueError(f"SVFLinear: input batch {tuple(x.shape)} does not match mix batch {tuple(self.mix.shape)}")
        scale = self.S * (self.effective_z(self.mix) - 1.0)  # (B, r)
        scale = scale.reshape(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1])  # (B, 1.., r)
        return y + ((x @ self.Vh.T) * scale) @ self.U.T


def inject_svf(
    module: nn.Module, targets: str, n_tasks: int, rank: int | None = None,
    method: SVDMethod = "full", niter: int = 4,
) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name fully matches the regex ``targets`` by an :class:`SVFLinear`
    sharing its parameters. Returns the replaced names; none matching raises ``ValueError``."""
    pattern = re.compile(targets)
    names = [n for n, m in module.named_modules() if type(m) is nn.Linear and pattern.fullmatch(n)]
    if not names:
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"svf targets={targets!r} match no nn.Linear; linear layers are {linears[:12]}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        rank_here = None if rank is None else min(rank, *getattr(parent, child).weight.shape)
        setattr(parent, child, SVFLinear.from_linear(getattr(parent, child), n_tasks, rank_here, method, niter))
    return names


def svf_layers(module: nn.Module) -> list[SVFLinear]:
    return [m for m in module.modules() if isinstance(m, SVFLinear)]


@contextmanager
def svf_mixture(layers: list[SVFLinear], mix: torch.Tensor | None) -> Iterator[None]:
    """Within the block every SVF layer uses expert weights ``mix`` (B, n_tasks); restored afterwards."""
    previous = [layer.mix for layer in layers]
    for layer in layers:
        layer.mix = mix
    try:
        yield
    finally:
        for layer, p in zip(layers, previous):
            layer.mix = p


class TaskDispatcher(nn.Module):
    """First-pass expert selection: a linear classifier over the mean hidden state of a prompt's first bytes.

    Args:
        dim: hidden width.
        n_tasks: number of experts.
        mode: ``"classify"`` picks the argmax expert (one-hot); ``"mixture"`` mixes all by their probabilities.
        prefix: how many leading (non-pad) positions are pooled — the prompt, not the answer.
    """

    def __init__(self, dim: int, n_tasks: int, mode: DispatchMode = "classify", prefix: int = 32) -> None:
        super().__init__()
        check_choice("dispatch mode", mode, DispatchMode)
        if prefix < 1:
            raise ValueError(f"dispatch prefix={prefix} must be >= 1")
        self.mode, self.prefix = mode, prefix
        self.head = nn.Linear(dim, n_tasks)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), valid (B, T) bool -> expert logits (B, n_tasks) from the first ``prefix`` valid bytes."""
        keep = valid & (valid.long().cumsum(dim=1) <= self.prefix)  # (B, T)
        w = keep.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, C)
        return self.head(pooled)

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """Expert logits (B, K) -> expert weights (B, K): one-hot argmax or softmax."""
        if self.mode == "classify":
            return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        return logits.softmax(dim=-1)
