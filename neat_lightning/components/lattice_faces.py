"""Text in and out of the lattice: a byte encoder that spells the question across the input face, and a byte
decoder that cross-attends to the output face.

The encoder writes byte ``t`` onto ``k = H·W // max_len`` adjacent input-face cells; the decoder is a small byte
transformer whose layers cross-attend to the output-face cells (optionally with rotary positions: each cell at the
reading position of the byte written above it). Both hold one face-sized parameter (``FaceEncoder.cell_bias``,
``FaceDecoder.cell_pos``, ``(H·W, ·)``) that a growing lattice resamples with :func:`resample_face`.

Axis legend: ``b`` batch, ``t`` byte positions, ``s`` memory slots (face cells), ``h`` heads in attention
patterns and face rows in face patterns (``w`` face columns), ``d`` head width, ``k`` cells per byte, ``c`` cell
channels, ``e`` model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.components.transformer import Block, KVCache, TransformerConfig, apply_rope, rope_angles


@dataclass(frozen=True)
class FaceTextConfig:
    """The byte encoder of the input face and the byte decoder of the output face."""

    encoder_dim: int = 64  # width of the byte encoder
    decoder_dim: int = 128  # width of the byte decoder
    heads: int = 4  # attention heads of encoder and decoder
    decoder_layers: int = 2  # decoder layers (self-attention + cross-attention to the output face)
    # rotary cross-attention: output-face cells at their reading position (cell index // the encoder's cells per
    # byte), so the decoder can learn "copy from k bytes ahead" once for all positions
    decoder_cell_rope: bool = False
    max_question_bytes: int = 48  # question length Lq the encoder is built for (longer prompts keep their end)
    max_answer_bytes: int = 40  # answer length the decoder is trained on

    def __post_init__(self) -> None:
        for name in ("encoder_dim", "decoder_dim", "heads", "decoder_layers", "max_question_bytes", "max_answer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def resample_face(values: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Face-sized values (H·W, E) resampled bilinearly (corners aligned) to (H'·W', E)."""
    x = rearrange(values, "(h w) e -> 1 e h w", h=old_hw[0], w=old_hw[1])
    out = F.interpolate(x, size=tuple(new_hw), mode="bilinear", align_corners=True)
    return rearrange(out, "1 e h w -> (h w) e").contiguous()


@torch.no_grad()
def resize_face_parameter(
    p: nn.Parameter, old_hw: tuple[int, int], new_hw: tuple[int, int], resample: bool
) -> None:
    """Give a face-sized parameter (H·W, E) the face size ``new_hw`` **in place** (the same ``Parameter`` object, so
    an optimizer keeps tracking it): its values resampled with :func:`resample_face`, or zeros (``resample=False``:
    a checkpoint's weights fill it). Its gradient is dropped."""
    if resample:
        p.data = resample_face(p.detach(), old_hw, new_hw)
    else:
        p.data = p.new_zeros(new_hw[0] * new_hw[1], p.shape[1])
    p.grad = None


class FaceCrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` (B, T, E) to a memory (B, S, E) with SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def keys_values(self, memory: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """memory (B, S, E) -> stacked keys and values (2, B, h, S, d), reusable across decoding steps; ``rope``
        (cos, sin) (S, d) rotates the keys by the memory slots' positions."""
        k, v = rearrange(self.kv(memory), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        return torch.stack([apply_rope(k, *rope) if rope is not None else k, v])

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None, key_mask: torch.Tensor | None = None,
        kv: torch.Tensor | None = None, rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, E), memory: (B, S, E) (or its precomputed ``kv``), key_mask: (B, S) bool True = attend
        -> (B, T, E). ``rope_q`` (T, d) and ``rope_k`` (S, d) rotate queries and keys (relative-position scores)."""
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.heads)
        if rope_q is not None:
            q = apply_rope(q, *rope_q)
        k, v = kv if kv is not None else self.keys_values(memory, rope_k)
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class FaceEncoder(nn.Module):
    """Question bytes -> input face. Byte embeddings + a causal transformer block give one vector per byte; byte
    ``t`` is written onto ``k = H·W // max_len`` adjacent face cells (row-major, ``C`` channels each), so the question
    lies spelled out across the face; a learned per-cell bias marks positions and fills the cells no byte reaches."""

    def __init__(self, channels: int, height: int, width: int, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        if max_len > height * width:
            raise ValueError(f"max_len={max_len} question bytes do not fit on a {height}x{width} face (one cell each)")
        self.height, self.width, self.max_len = height, width, max_len
        self.cells_per_byte = height * width // max_len
        self.tconfig = TransformerConfig(vocab_size=260, dim=dim, n_layers=1, heads=heads, block_size=max_len)
        self.embed = nn.Embedding(260, dim)
        self.block = Block(self.tconfig)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, self.cells_per_byte * channels, bias=False)  # PAD (zero) -> zero cells
        self.cell_bias = nn.Parameter(torch.zeros(height * width, channels))
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """ids: (B, T <= max_len) int64 question bytes (PAD-padded) -> input face (B, H·W, C), cells row-major."""
        if ids.shape[1] > self.max_len:
            raise ValueError(f"question length {ids.shape[1]} > max_len={self.max_len}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        cos, sin = rope_angles(positions, self.tconfig.dim_head, self.tconfig.rope_base)
        x = self.norm(self.block(self.embed(ids), cos, sin, positions))  # (B, T, E)
        x = x * (ids != pad_id)[..., None]  # PAD bytes write nothing (causal: they never reach real bytes)
        cells = rearrange(self.out(x), "b t (k c) -> b (t k) c", k=self.cells_per_byte)  # (B, T·k, C)
        face = F.pad(cells, (0, 0, 0, self.height * self.width - cells.shape[1]))  # (B, H·W, C)
        return face + self.cell_bias

    def resize(self, height: int, width: int, resample: bool) -> None:
        """A face of ``height × width`` cells: ``cell_bias`` resized in place (:func:`resize_face_parameter`)."""
        if height * width < self.max_len * self.cells_per_byte:
            raise ValueError(f"a {height}x{width} face cannot hold the encoder's {self.max_len} bytes x "
                             f"{self.cells_per_byte} cells")
        resize_face_parameter(self.cell_bias, (self.height, self.width), (height, width), resample)
        self.height, self.width = height, width


class DecoderLayer(nn.Module):
    """Causal self-attention + SwiGLU (a transformer Block) followed by cross-attention to the output face."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.block = Block(config)
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.cross = FaceCrossAttention(config.dim, config.heads)

    def forward(self, x, memory, cos, sin, positions, cache: KVCache | None = None, kv=None, cell_rope=None):
        """``cell_rope``: (cos, sin) of the memory cells' positions (keys in a given ``kv`` are already rotated by
        them); with it the cross-attention queries are rotated by their own positions too."""
        x = self.block(x, cos, sin, positions, cache)
        rope_q = (cos, sin) if cell_rope is not None else None
        return x + self.cross(self.norm(x), memory, kv=kv, rope_q=rope_q, rope_k=cell_rope)


class FaceDecoder(nn.Module):
    """A small byte transformer that cross-attends to the output-face cells and predicts the next byte.

    With ``cell_stride`` the cross-attention is rotary: output-face cell ``n`` (row-major) sits at reading position
    ``n // cell_stride`` and answer byte ``j`` at ``j``, so a score can depend on their offset — the answer
    ``"12 plus 7 is 19."`` repeats the question ``"What is 12 plus 7?"`` 8 bytes earlier, a relation learnt once for
    every position instead of per cell. It is positional information about the output face only; the face's
    content still has to come through the lattice."""

    def __init__(
        self, channels: int, n_cells: int, dim: int, heads: int, n_layers: int, max_len: int,
        cell_stride: int | None = None,
    ) -> None:
        super().__init__()
        if cell_stride is not None and cell_stride < 1:
            raise ValueError(f"cell_stride={cell_stride} must be >= 1 or None")
        self.cell_stride = cell_stride
        self.config = TransformerConfig(vocab_size=260, dim=dim, n_layers=n_layers, heads=heads, block_size=max_len)
        self.embed = nn.Embedding(260, dim)
        self.cell_in = nn.Linear(channels, dim)
        self.cell_pos = nn.Parameter(torch.randn(n_cells, dim) * 0.02)
        self.memory_norm = nn.RMSNorm(dim, eps=1e-6)
        self.layers = nn.ModuleList(DecoderLayer(self.config) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 260, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def memory(self, face: torch.Tensor) -> torch.Tensor:
        """Output face (B, H·W, C) -> decoder memory (B, H·W, E)."""
        return self.memory_norm(self.cell_in(face) + self.cell_pos)

    def forward(
        self, ids: torch.Tensor, memory: torch.Tensor | None, start_pos: int = 0,
        caches: list[KVCache] | None = None, kvs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids: (B, T) int64 (BOS + answer so far), memory: (B, N, E) -> next-byte logits (B, T, 260).

        For incremental decoding pass ``caches`` (:meth:`make_caches`), ``kvs`` (:meth:`cross_keys_values`) and the
        position ``start_pos`` of ``ids[:, 0]``."""
        positions = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)
        cos, sin = rope_angles(positions, self.config.dim_head, self.config.rope_base)
        x = self.embed(ids)
        cell_rope = self.cell_rope()
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, cos, sin, positions, caches[i] if caches else None, kvs[i] if kvs else None, cell_rope)
        return self.head(self.norm(x))

    def cell_rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary angles (cos, sin) (H·W, d) of the output-face cells' reading positions, or None (no cell_stride)."""
        if self.cell_stride is None:
            return None
        cells = torch.arange(self.cell_pos.shape[0], device=self.cell_pos.device) // self.cell_stride
        return rope_angles(cells, self.config.dim_head, self.config.rope_base)

    def resize(self, old_hw: tuple[int, int], new_hw: tuple[int, int], resample: bool) -> None:
        """An output face of ``new_hw`` cells (was ``old_hw``): ``cell_pos`` resized in place
        (:func:`resize_face_parameter`)."""
        resize_face_parameter(self.cell_pos, old_hw, new_hw, resample)

    def make_caches(self, batch: int, max_len: int) -> list[KVCache]:
        cfg, w = self.config, self.embed.weight
        return [KVCache(batch, cfg.heads, max_len, cfg.dim_head, device=w.device, dtype=w.dtype) for _ in self.layers]

    def cross_keys_values(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's cross-attention keys/values of ``memory``, computed once per generation."""
        return [layer.cross.keys_values(memory, self.cell_rope()) for layer in self.layers]


class PointwiseAdapter(nn.Module):
    """The no-lattice baseline's stand-in for the lattice: a residual per-cell MLP on the input face, sized to match
    the lattice rule's parameter count, with no communication between cells."""

    def __init__(self, channels: int, n_params: int) -> None:
        super().__init__()
        hidden = max(1, round((n_params - channels) / (2 * channels + 1)))  # C·h + h + h·C + C = n_params
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """face (B, H·W, C) -> (B, H·W, C)."""
        return face + self.mlp(face)

