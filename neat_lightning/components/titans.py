"""Titans neural long-term memory with memory-as-context attention (Behrouz et al. 2024, arXiv 2501.00663).

The long-term memory is a small MLP ``M`` whose weights are *fast weights*: while a sequence is read, they are
trained by gradient descent on the associative loss ``ℓ(W; k, v) = ‖M_W(k) − v‖²`` (eq. 12). Its gradient is the
*surprise*; a momentum term carries past surprise (eq. 10) and a forgetting gate decays old memories (eq. 13):

    S_n = η_n · S_{n−1} − θ · ∇ℓ(W_0; x_n)          (momentum over chunks; θ_t is a per-token data-dependent step)
    W_n = (1 − α_n) · W_{n−1} + S_n                  (forgetting / weight decay)

Updates are chunked and vectorised like ``lucidrains/titans-pytorch``: the sequence is cut into chunks of
``chunk_size`` tokens; the per-chunk gradients are all taken at the weights the call started from (mini-batch
test-time training), in parallel with ``torch.func.vmap(torch.func.grad(...))``; the two recurrences above are
linear, so they run as a log-depth parallel scan (:func:`linear_scan`) instead of a loop over chunks. Tokens of
chunk ``n`` read the memory with the weights after chunk ``n − 1`` (causal: nothing of their own chunk).

Memory as context (MAC, §4.1): learned persistent tokens (input-independent) and the memory's readouts are
prepended to the keys/values of a sliding-window attention, so each token attends to
``[persistent | memory readouts in its window | tokens in its window]``. The block reuses a
:class:`~neat_lightning.components.transformer.Block`'s weights and, when the memory is switched off, *is* that
block (an exact bypass). By default (``readout_gate``) the readouts are also added to the residual stream through a
learned per-channel gate: without that direct path the memory got too little gradient to learn recall in our CPU
runs (``benchmarks/neat_memory.py``). A short causal depthwise convolution over the memory's q/k/v (``conv_kernel``,
§4.4) lets the key written at a value byte hold the bytes just before it (``cat=`` before ``7``).

High-surprise ``(key, value)`` items are kept in an episodic buffer (``memory_size`` slots ranked by importance):
the sleep-wake consolidation replays them into the slow (initial) memory weights.

Axis legend: ``b`` batch, ``n`` chunks, ``c`` tokens in a chunk, ``t`` tokens, ``s`` key positions, ``h`` heads,
``d`` head dim, ``i``/``o`` memory-weight input/output, ``m`` episodic slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from torch.func import grad, vmap

from neat_lightning.components.transformer import Block, TransformerConfig, apply_rope, attention_mask


@dataclass(frozen=True)
class TitansConfig:
    """Settings of the neural long-term memory (defaults: memory 2048 slots, 128 persistent tokens, surprise threshold
    0.5, the sizes of ``configs/neat.yaml``)."""

    dim_memory: int | None = None  # key/value width of the neural memory; None -> the model width
    memory_depth: int = 2  # layers of the memory MLP; 1 = a linear associative memory (fast-weight / delta-rule-like)
    memory_expansion: float = 2.0  # hidden width of the memory MLP as a multiple of dim_memory
    chunk_size: int = 16  # tokens per memory update; gradients of one chunk share the same start weights
    persistent_tokens: int = 128  # learned, input-independent tokens every query can attend to
    memory_size: int = 2048  # episodic slots for high-surprise (key, value) items, replayed in sleep
    surprise_threshold: float = 0.5  # relative associative error ‖M(k) − v‖² / ‖v‖² above which an item is kept
    max_lr: float = 1.0  # the data-dependent inner step θ_t lies in (0, max_lr)
    importance_decay: float = 0.99  # episodic importance fades by this factor each time new items are stored
    init_forget_bias: float = -6.0  # sigmoid(-6) ≈ 0.0025: almost no forgetting at the start
    init_lr_bias: float = -2.0  # sigmoid(-2) ≈ 0.12 · max_lr initial inner step
    conv_kernel: int = 4  # causal depthwise conv over q/k/v after their projections (§4.4); 0 = none
    readout_gate: bool = True  # also add the readouts to the residual stream through a learned per-channel gate
    readout_gate_init: float = 1.0  # its initial value (open: a closed gate would starve the memory of gradient)

    def __post_init__(self) -> None:
        if self.conv_kernel < 0:
            raise ValueError(f"TitansConfig.conv_kernel={self.conv_kernel} must be >= 0 (0 = no convolution)")
        for name in ("memory_depth", "chunk_size", "memory_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TitansConfig.{name}={getattr(self, name)} must be >= 1")
        if self.persistent_tokens < 0:
            raise ValueError(f"TitansConfig.persistent_tokens={self.persistent_tokens} must be >= 0")
        if self.dim_memory is not None and self.dim_memory < 1:
            raise ValueError(f"TitansConfig.dim_memory={self.dim_memory} must be >= 1 or None")
        if self.memory_expansion <= 0:
            raise ValueError(f"TitansConfig.memory_expansion={self.memory_expansion} must be > 0")
        if self.max_lr <= 0:
            raise ValueError(f"TitansConfig.max_lr={self.max_lr} must be > 0")
        if self.surprise_threshold < 0:
            raise ValueError(f"TitansConfig.surprise_threshold={self.surprise_threshold} must be >= 0")
        if not 0.0 < self.importance_decay <= 1.0:
            raise ValueError(f"TitansConfig.importance_decay={self.importance_decay} must be in (0, 1]")


class MemoryState(NamedTuple):
    """Fast-weight state carried across calls: memory weights and momentum, each a tuple of (B, i, o) tensors."""

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]


class MemoryStats(NamedTuple):
    """Per-call statistics: mean relative surprise (associative error / ‖v‖²) and its per-token values (B, T)."""

    surprise: torch.Tensor
    token_surprise: torch.Tensor


def detach_state(state: MemoryState | None) -> MemoryState | None:
    """Cut the graph between segments (truncated backprop through the memory)."""
    if state is None:
        return None
    return MemoryState(tuple(w.detach() for w in state.weights), tuple(m.detach() for m in state.momentum))


# ----------------------------------------------------------------------------------------------------------------------
# pure functions


def linear_scan(gates: torch.Tensor, inputs: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """All states of ``h_n = gates_n · h_{n−1} + inputs_n`` with a log-depth (Hillis–Steele) parallel scan.

    Args:
        gates: (B, N) multipliers.
        inputs: (B, N, ...) additive terms.
        initial: (B, ...) ``h_{−1}``; ``None`` for zeros.

    Returns:
        (B, N, ...) ``h_0 .. h_{N−1}``. ``ceil(log2 N)`` vectorised rounds, no loop over ``n``.
    """
    a = gates.reshape(*gates.shape, *([1] * (inputs.dim() - 2))).to(inputs.dtype)  # (B, N, 1, ...)
    x = inputs
    step, n = 1, inputs.shape[1]
    while step < n:  # combine (a1, x1) then (a2, x2) into (a1·a2, a2·x1 + x2), doubling the span each round
        x_prev = torch.cat([torch.zeros_like(x[:, :step]), x[:, :-step]], dim=1)
        a_prev = torch.cat([torch.ones_like(a[:, :step]), a[:, :-step]], dim=1)
        x = x + a * x_prev
        a = a * a_prev
        step *= 2
    if initial is not None:
        x = x + a * initial.unsqueeze(1)
    return x


def memory_mlp(weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """The memory model ``M_W(x)``: ``x (..., c, i)`` with weights ``(..., i, o)`` broadcast over leading dims.

    Depth 1 is linear (``x W``); deeper memories are residual SiLU MLPs (``x + MLP(x)``).
    """
    h = x
    for j, w in enumerate(weights):
        h = h @ w
        if j < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def associative_loss(
    weights: tuple[torch.Tensor, ...], keys: torch.Tensor, values: torch.Tensor, lr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-weighted associative loss of one chunk (eq. 12): ``Σ_t θ_t · mean_d (M(k_t) − v_t)²``.

    Args:
        weights: memory weights, each (i, o).
        keys, values: (c, d).
        lr: (c,) per-token steps θ_t.

    Returns:
        the weighted scalar loss (differentiated by :func:`torch.func.grad`) and the per-token errors (c,).
    """
    err = (memory_mlp(weights, keys) - values).pow(2).mean(dim=-1)  # (c,)
    return (err * lr).sum(), err


# per-(batch, chunk) gradients at each row's start weights: outer vmap over b (weights per row), inner over n
_chunk_grads = vmap(vmap(grad(associative_loss, has_aux=True), in_dims=(None, 0, 0, 0)), in_dims=(0, 0, 0, 0))


# ----------------------------------------------------------------------------------------------------------------------
# the memory


@torch.no_grad()
def prune_slots(importance: torch.Tensor, fraction: float, *slots: torch.Tensor) -> int:
    """Empty the lowest-importance ``fraction`` of the filled slots (importance > 0), in place.

    Args:
        importance: (M,) slot importances; 0 marks an empty slot.
        fraction: share of the filled slots to empty, in [0, 1] (rounded down).
        slots: tensors with leading dim M (keys, values) zeroed on the pruned slots.

    Returns:
        the number of slots emptied.
    """
    filled = importance > 0
    k = int(int(filled.sum()) * fraction)
    if k == 0:
        return 0
    ranked = importance.masked_fill(~filled, float("inf"))
    index = torch.topk(ranked, k, largest=False).indices  # (k,) the least important filled slots
    importance[index] = 0
    for s in slots:
        s[index] = 0
    return k


class NeuralMemory(nn.Module):
    """Neural long-term memory: stores ``(k, v)`` of a sequence by test-time gradient descent, retrieves ``M(q)``.

    Args:
        dim: input/output width (the model width).
        config: memory settings.

    The initial memory weights ``weights`` are ordinary (slow) parameters trained by the outer loop; the fast
    weights live only in the returned :class:`MemoryState`. Episodic buffers (``episodic_keys``/``values``/
    ``importance``) are persistent buffers, so checkpoints carry them.
    """

    def __init__(self, dim: int, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        dm = config.dim_memory or dim
        hidden = max(1, int(round(dm * config.memory_expansion)))
        self.dim, self.dim_memory = dim, dm
        self.to_q = nn.Linear(dim, dm, bias=False)
        self.to_k = nn.Linear(dim, dm, bias=False)
        self.to_v = nn.Linear(dim, dm, bias=False)
        self.to_out = nn.Linear(dm, dim, bias=False)
        # short causal depthwise conv over [q | k | v] (Titans §4.4, as in modern linear-attention memories): the key
        # written at a token then also holds the few bytes before it, so one layer can bind "cat=" -> "7"
        k = config.conv_kernel
        self.conv = nn.Conv1d(3 * dm, 3 * dm, k, groups=3 * dm, bias=False) if k else None
        self.to_lr = nn.Linear(dim, 1)  # θ_t, per token
        self.to_momentum = nn.Linear(dim, 1)  # η_n, per chunk
        self.to_forget = nn.Linear(dim, 1)  # α_n, per chunk
        shapes = [(dm, dm)] if config.memory_depth == 1 else (
            [(dm, hidden)] + [(hidden, hidden)] * (config.memory_depth - 2) + [(hidden, dm)]
        )
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(i, o)) for i, o in shapes)
        self.register_buffer("episodic_keys", torch.zeros(config.memory_size, dm))
        self.register_buffer("episodic_values", torch.zeros(config.memory_size, dm))
        self.register_buffer("episodic_importance", torch.zeros(config.memory_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.config
        for j, w in enumerate(self.weights):
            if len(self.weights) == 1:
                nn.init.zeros_(w)  # a linear memory starts empty: M(k) = 0
            elif j == len(self.weights) - 1:
                nn.init.normal_(w, std=0.02)  # the residual MLP starts near identity
            else:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[0]))
        if self.conv is not None:  # start as the identity on the current token plus a little of the previous ones
            nn.init.normal_(self.conv.weight, std=0.1)
            with torch.no_grad():
                self.conv.weight[:, 0, -1] += 1.0
        for lin in (self.to_lr, self.to_momentum, self.to_forget):
            nn.init.zeros_(lin.weight)
        nn.init.constant_(self.to_lr.bias, cfg.init_lr_bias)
        nn.init.constant_(self.to_momentum.bias, 0.0)
        nn.init.constant_(self.to_forget.bias, cfg.init_forget_bias)

    # -- state -----------------------------------------------------------------------------------------------------

    def initial_state(self, batch: int) -> MemoryState:
        """Fast weights = the slow weights, zero momentum; each (B, i, o) (an expanded view, no copy)."""
        weights = tuple(repeat(w, "i o -> b i o", b=batch) for w in self.weights)
        return MemoryState(weights, tuple(torch.zeros_like(w) for w in weights))

    # -- store / retrieve ------------------------------------------------------------------------------------------

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> l2-normalised queries and keys, values (each (B, T, d)) and inner steps θ (B, T).

        With ``conv_kernel`` the projections pass a causal depthwise convolution first (each segment starts from
        zero padding: the convolution does not reach into a previous call's tokens).
        """
        qkv = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1)  # (B, T, 3d)
        if self.conv is not None:
            qkv = rearrange(qkv, "b t d -> b d t")
            qkv = rearrange(self.conv(F.pad(qkv, (self.conv.kernel_size[0] - 1, 0))), "b d t -> b t d")
        q, k, v = qkv.chunk(3, dim=-1)
        lr = self.config.max_lr * torch.sigmoid(self.to_lr(x)).squeeze(-1)  # (B, T)
        # l2-normalised queries and keys (as in the paper, §3.1)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, lr

    def forward(
        self, x: torch.Tensor, state: MemoryState | None = None, record: bool = False
    ) -> tuple[torch.Tensor, MemoryState, MemoryStats]:
        """Store the chunks of ``x`` and read the memory at every position.

        Args:
            x: (B, T, C) normalised hidden states; any ``T`` (the last chunk may be partial).
            state: fast weights from the previous segment, or ``None`` to start from the slow weights.
            record: keep high-surprise items in the episodic buffer (no gradient flows into it).

        Returns:
            readouts (B, T, C) — token ``t`` of chunk ``n`` reads ``M_{W_{n−1}}(q_t)`` —, the state after the last
            chunk, and surprise statistics.
        """
        cfg = self.config
        b, t, _ = x.shape
        c = cfg.chunk_size
        n = math.ceil(t / c)
        pad = n * c - t
        state = state if state is not None else self.initial_state(b)

        q, k, v, lr = self.project(x)
        if pad:  # padded positions store nothing (θ = 0) and their readouts are dropped
            q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
            lr = F.pad(lr, (0, pad))
        qc, kc, vc = (rearrange(z, "b (n c) d -> b n c d", c=c) for z in (q, k, v))
        lrc = rearrange(lr, "b (n c) -> b n c", c=c)

        # surprise: per-chunk gradients of the associative loss at the start weights, in parallel (eq. 12)
        grads, err = _chunk_grads(state.weights, kc, vc, lrc)  # each (B, N, i, o); err (B, N, C)

        # chunk gates from the chunk's mean hidden state
        pooled = reduce(F.pad(x, (0, 0, 0, pad)), "b (n c) d -> b n d", "sum", c=c) / rearrange(
            torch.clamp(torch.arange(1, n + 1, device=x.device) * c, max=t) - torch.arange(n, device=x.device) * c,
            "n -> 1 n 1",
        )  # (B, N, C) mean over the real tokens of each chunk
        eta = torch.sigmoid(self.to_momentum(pooled)).squeeze(-1)  # (B, N)
        keep = torch.sigmoid(-self.to_forget(pooled)).squeeze(-1)  # 1 − α_n, (B, N)

        new_weights, new_momentum, per_chunk = [], [], []
        for g, w0, m0 in zip(grads, state.weights, state.momentum):  # a loop over a few weight tensors
            momentum = linear_scan(eta, -g, m0)  # eq. (10): S_n = η_n S_{n−1} − θ∇ℓ      (B, N, i, o)
            weights = linear_scan(keep, momentum, w0)  # eq. (13): W_n = (1 − α_n) W_{n−1} + S_n
            new_weights.append(weights[:, -1])
            new_momentum.append(momentum[:, -1])
            per_chunk.append(torch.cat([w0.unsqueeze(1), weights[:, :-1]], dim=1))  # W_{n−1} for chunk n

        read = memory_mlp(tuple(per_chunk), qc)  # (B, N, C, d): batched over (b, n) by broadcasting
        read = rearrange(read, "b n c d -> b (n c) d")[:, :t]

        token_err = rearrange(err, "b n c -> b (n c)")[:, :t]
        token_surprise = token_err / v[:, :t].pow(2).mean(dim=-1).clamp_min(1e-6)  # relative error, (B, T)
        if record:
            self.record_items(k[:, :t], v[:, :t], token_surprise)
        stats = MemoryStats(token_surprise.mean(), token_surprise)
        return self.to_out(read), MemoryState(tuple(new_weights), tuple(new_momentum)), stats

    # -- episodic buffer -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def record_items(self, keys: torch.Tensor, values: torch.Tensor, surprise: torch.Tensor) -> int:
        """Keep items whose surprise exceeds the threshold; the buffer holds the ``memory_size`` most important.

        Args:
            keys, values: (B, T, d) memory-space keys and values.
            surprise: (B, T) relative associative error (the importance of a new item).

        Returns:
            how many new items passed the threshold.
        """
        cfg = self.config
        keys, values, surprise = (rearrange(z, "b t ... -> (b t) ...") for z in (keys, values, surprise))
        hot = surprise > cfg.surprise_threshold
        n_hot = int(hot.sum())
        if n_hot == 0:
            return 0
        importance = torch.cat([self.episodic_importance * cfg.importance_decay, surprise[hot].float()])
        all_keys = torch.cat([self.episodic_keys, keys[hot].to(self.episodic_keys.dtype)])
        all_values = torch.cat([self.episodic_values, values[hot].to(self.episodic_values.dtype)])
        top = torch.topk(importance, cfg.memory_size).indices  # (m,)
        self.episodic_importance.copy_(importance[top])
        self.episodic_keys.copy_(all_keys[top])
        self.episodic_values.copy_(all_values[top])
        return n_hot

    def utilization(self) -> torch.Tensor:
        """Fraction of episodic slots holding an item, () float."""
        return (self.episodic_importance > 0).float().mean()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Filled episodic items: ``keys`` (M, d), ``values`` (M, d), ``importance`` (M,) — detached copies."""
        filled = self.episodic_importance > 0
        return {
            "keys": self.episodic_keys[filled].clone(),
            "values": self.episodic_values[filled].clone(),
            "importance": self.episodic_importance[filled].clone(),
        }

    def consolidation_loss(self, max_items: int | None = None) -> torch.Tensor | None:
        """Importance-weighted associative loss of the episodic items under the *slow* weights (differentiable).

        Replays the ``max_items`` most important items (all when None); ``None`` when the buffer is empty.
        Minimising it writes the replayed memories into the initial weights.
        """
        filled = self.episodic_importance > 0
        if not bool(filled.any()):
            return None
        keys, values, imp = self.episodic_keys[filled], self.episodic_values[filled], self.episodic_importance[filled]
        if max_items is not None and len(imp) > max_items:
            top = torch.topk(imp, max_items).indices
            keys, values, imp = keys[top], values[top], imp[top]
        return self.replay_loss(keys, values, imp)

    def replay_loss(self, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """Importance-weighted associative loss ``Σ_m imp_m ‖M_slow(k_m) − v_m‖² / Σ_m imp_m`` of given items.

        Args:
            keys, values: (M, d) memory-space items (e.g. a replay draw from :meth:`snapshot`).
            importance: (M,) > 0 weights.

        Returns:
            () differentiable in the slow weights.
        """
        err = (memory_mlp(tuple(self.weights), keys) - values).pow(2).mean(dim=-1)  # (M,)
        return (err * importance).sum() / importance.sum()

    @torch.no_grad()
    def prune(self, fraction: float) -> int:
        """Empty the lowest-importance ``fraction`` of the filled episodic slots; returns how many were emptied."""
        return prune_slots(self.episodic_importance, fraction, self.episodic_keys, self.episodic_values)

    @torch.no_grad()
    def clear_episodic(self) -> None:
        self.episodic_importance.zero_()
        self.episodic_keys.zero_()
        self.episodic_values.zero_()


# ----------------------------------------------------------------------------------------------------------------------
# memory as context


class MemoryBlock(Block):
    """A transformer :class:`Block` with Titans memory as context (MAC) that can be switched off exactly.

    Its attention reuses the block's own ``attn.qkv`` / ``attn.proj`` weights over
    ``[persistent tokens | memory readouts | tokens]``; persistent tokens have no position (no RoPE), readouts carry
    the position of the token that read them and are visible under the same causal sliding window as tokens.
    With ``memory_active = False`` (or through :meth:`Block.forward`) it is exactly the plain block, so its
    parameter names and outputs match a model built without the memory.
    """

    def __init__(self, config: TransformerConfig, titans: TitansConfig) -> None:
        super().__init__(config)
        self.titans = titans
        self.memory = NeuralMemory(config.dim, titans)
        self.persistent = nn.Parameter(torch.randn(titans.persistent_tokens, config.dim) * 0.02)
        # optional direct path of the readouts into the residual stream, besides the attention over them
        self.readout_gate = (
            nn.Parameter(torch.full((config.dim,), titans.readout_gate_init)) if titans.readout_gate else None
        )
        self.memory_active = True

    def forward(self, x, cos, sin, positions, cache=None) -> torch.Tensor:
        """Block interface: the memory path (from the slow weights, no state) when active, else the plain block.

        A KV cache is only supported on the plain path: decoding with an active memory re-reads the context.
        """
        if not self.memory_active:
            return super().forward(x, cos, sin, positions, cache)
        if cache is not None:
            raise ValueError("MemoryBlock: a KV cache is not supported while the memory is active (memory_active=True)")
        return self.forward_memory(x, cos, sin, positions)[0]

    def forward_memory(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        state: MemoryState | None = None,
        record: bool = False,
    ) -> tuple[torch.Tensor, MemoryState | None, MemoryStats | None]:
        """x: (B, T, C), cos/sin (T, d) for ``positions`` (T,) -> (B, T, C), next memory state, stats.

        When the memory is off this is ``Block.forward`` and the state passes through untouched.
        """
        if not self.memory_active:
            return super().forward(x, cos, sin, positions), state, None
        h = self.norm1(x)
        readout, next_state, stats = self.memory(h, state, record=record)  # (B, T, C)
        x = x + self.drop(self.mac_attention(h, readout, cos, sin, positions))
        if self.readout_gate is not None:
            x = x + self.drop(self.readout_gate * readout)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, next_state, stats

    def mac_attention(
        self, h: torch.Tensor, readout: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Sliding-window attention of tokens over ``[persistent | readouts | tokens]`` -> (B, T, C)."""
        cfg = self.attn.config
        b, t, _ = h.shape
        q, k, v = rearrange(self.attn.qkv(h), "b t (three h d) -> three b h t d", three=3, h=cfg.heads)
        _, km, vm = rearrange(self.attn.qkv(readout), "b t (three h d) -> three b h t d", three=3, h=cfg.heads)
        q, k, km = apply_rope(q, cos, sin), apply_rope(k, cos, sin), apply_rope(km, cos, sin)
        keys, vals = [km, k], [vm, v]
        p = self.persistent.shape[0]
        if p:
            # projected per row so per-sample weights (SVF experts) apply to the persistent tokens too
            persistent = repeat(self.persistent, "p c -> b p c", b=b)
            _, kp, vp = rearrange(self.attn.qkv(persistent), "b p (three h d) -> three b h p d", three=3, h=cfg.heads)
            keys.insert(0, kp)
            vals.insert(0, vp)
        local = attention_mask(positions, positions, cfg.window)  # (T, T) causal, windowed
        mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=h.device), local, local], dim=1)  # (T, P + 2T)
        y = F.scaled_dot_product_attention(
            q, torch.cat(keys, dim=2), torch.cat(vals, dim=2), attn_mask=mask,
            dropout_p=cfg.dropout if self.training else 0.0,
        )  # (B, H, T, d)
        return self.attn.proj(rearrange(y, "b h t d -> b t (h d)"))
