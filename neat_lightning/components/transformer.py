"""Decoder-only transformer parts: RMSNorm, RoPE, causal / sliding-window attention (SDPA), SwiGLU, blocks.

Plain ``torch``; no Lightning. Follows the llama / litgpt layout: pre-norm blocks, rotary position embeddings on
queries and keys, SwiGLU MLP, optional weight tying between the byte embedding and the output head.

Axis legend: ``b`` batch, ``t`` query positions, ``s`` key positions, ``h`` heads, ``d`` head dim, ``c`` model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a byte-level decoder-only transformer."""

    vocab_size: int = 260
    dim: int = 128
    n_layers: int = 2
    heads: int = 4
    block_size: int = 256  # longest context seen in training; RoPE itself extrapolates
    window: int | None = None  # sliding-window attention span in tokens; None = full causal attention
    mlp_hidden: int | None = None  # None -> 8/3 * dim rounded up to a multiple of 32 (llama's SwiGLU sizing)
    dropout: float = 0.0  # on each block's attention and MLP outputs (residual dropout)
    # on the attention weights; off by default: any value > 0 sends PyTorch's CPU attention to its unfused path,
    # which made a quickstart step (batch 32 x 256, 2 threads) take 0.81 s against 0.48 s with residual dropout only
    attention_dropout: float = 0.0
    tie_weights: bool = True  # share the byte embedding with the output head: 260 x dim fewer parameters
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"dim_head={self.dim // self.heads} (dim / heads) must be even for rotary embeddings")
        for name in ("vocab_size", "dim", "n_layers", "heads", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 or None")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or find_multiple(int(8 * self.dim / 3), 32)


def rope_angles(positions: torch.Tensor, dim_head: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for integer ``positions`` (T,) -> ``cos, sin`` each (T, dim_head), float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim_head, 2, device=positions.device, dtype=torch.float32) / dim_head)
    freqs = torch.outer(positions.float(), inv_freq)  # (T, d/2)
    freqs = torch.cat([freqs, freqs], dim=-1)  # (T, d)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, d) by angles (T, d) using the rotate-half convention (GPT-NeoX / llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query position may attend key position (causal, optional window)."""
    diff = q_pos[:, None] - k_pos[None, :]  # (T, S)
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


class KVCache(nn.Module):
    """Preallocated key/value cache for incremental decoding of one layer."""

    def __init__(self, batch: int, heads: int, max_len: int, dim_head: int, device=None, dtype=None) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, heads, max_len, dim_head, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, heads, max_len, dim_head, device=device, dtype=dtype), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, d) keys/values; return all cached ones so far, (B, H, S, d)."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {t} tokens > max_len={self.max_len}")
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x: (B, T, C); cos/sin: (T, d) for ``positions`` (T,) -> (B, T, C)."""
        cfg = self.config
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=cfg.heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)  # (B, H, S, d)
            k_pos = torch.arange(k.shape[2], device=x.device)
            q_pos = torch.arange(start, start + x.shape[1], device=x.device)
            mask = attention_mask(q_pos, k_pos, cfg.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif cfg.window is None or cfg.window >= x.shape[1]:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=cfg.attention_dropout if self.training else 0.0)
        else:
            mask = attention_mask(positions, positions, cfg.window)  # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=cfg.attention_dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.dim, eps=1e-6)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.dim, eps=1e-6)
        self.mlp = SwiGLU(config.dim, config.hidden)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, positions, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class ByteTransformer(nn.Module):
    """Embedding -> N pre-norm blocks -> RMSNorm -> vocabulary logits."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2 scaled init of residual projections: keeps the residual stream's variance flat with depth
            if name.endswith(("attn.proj.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(
        self, ids: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None, return_hidden: bool = False
    ) -> torch.Tensor:
        """ids: (B, T) int64 -> logits (B, T, V) (or final hidden states (B, T, C) with ``return_hidden``)."""
        positions = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)
        cos, sin = rope_angles(positions, self.config.dim_head, self.config.rope_base)
        x = self.embed(ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, positions, caches[i] if caches is not None else None)
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    def make_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        cfg = self.config
        return [KVCache(batch, cfg.heads, max_len, cfg.dim_head, device=device, dtype=dtype) for _ in self.blocks]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
