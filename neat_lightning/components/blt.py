"""BLT processor: bytes -> hash n-gram embeddings -> local encoder -> patches -> latent model -> local decoder.

The Byte Latent Transformer (Pagnoni et al. 2024, arXiv 2412.09871, §3; reference code ``facebookresearch/blt``,
``bytelatent/model/blt.py`` and ``local_models.py``) runs a small *local* model over bytes and a big *latent* model
over variable-length patches of bytes:

1. **Embeddings** (§3.2.1): each byte's embedding plus hash embeddings of the n-grams ending at it, ``n = 3..8``
   (rolling polynomial hash into a table per ``n``, as the reference's ``byte_group_hash_function``).
2. **Local encoder** (§3.2): a few causal (sliding-window) transformer blocks over bytes, then *patch-to-own-bytes
   cross-attention*: each patch's query starts as the mean of its bytes' states (``cross_attn_init_by_pooling``)
   and attends only to the bytes of that patch (a block mask, batched over rows with a padding mask).
3. **Latent transformer**: any callable over patch embeddings ``(B, P, C) -> (B, P, C)``; in NeatModel it is the
   :class:`~neat_lightning.components.neat_backbone.NeatBackbone` with Titans memory and SVF.
4. **Local decoder** (§3.3): every byte cross-attends to the latent outputs it may see, then causal blocks and a
   byte head.

Causality (the reference's BOE shift). The latent input is ``[start, patch_0, ..., patch_{P-2}]``, so latent output
``j`` has seen patches ``< j`` only. A byte of patch ``p`` attends to latent outputs ``j <= p`` (optionally the last
``decoder_patch_window`` of them): the patches *before* its own, never its own or a later one. Patch boundaries
are causal too: whether byte ``s`` starts a patch depends only on bytes ``< s`` (the entropy of predicting byte
``s``; the byte before ``s`` for space patching). So the logits at position ``t`` depend on bytes ``<= t`` only,
which ``tests/components/test_blt.py`` checks by changing one byte.

Patches come from :mod:`neat_lightning.components.patching` (:class:`BLTConfig` holds its
:class:`~neat_lightning.components.patching.PatcherConfig`): entropy patching with a frozen entropy model (its
global threshold held at a boundary ratio by
:class:`~neat_lightning.components.patch_threshold.AdaptiveEntropyThreshold` while training, whose state travels in
this module's ``state_dict`` as extra state), or static / space patching.

Axis legend: ``b`` batch, ``t`` bytes, ``p`` patches, ``h`` heads, ``d`` head dim, ``c`` width, ``n`` n-gram sizes.
Plain ``torch``; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from neat_lightning.codec import PAD_ID, VOCAB_SIZE
from neat_lightning.components.entropy import EntropyModel
from neat_lightning.components.patch_threshold import AdaptiveEntropyThreshold
from neat_lightning.components.patching import (
    Patcher,
    PatcherConfig,
    patch_ids_from_lengths,
    patch_lengths_from_start_mask,
)
from neat_lightning.components.transformer import Block, TransformerConfig, rope_angles

# the reference's hash primes (bytelatent/model/local_models.py, rolling_polynomial_hash), one per hash function
HASH_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133)
MIN_MEAN_PATCH_SIZE, MAX_PATCH_SIZE = 8, 128  # patch size bounds: mean 8-128 bytes, no patch over 128


def exists(x: Any) -> bool:
    return x is not None


# ----------------------------------------------------------------------------------------------------------------------
# config


def default_patcher() -> PatcherConfig:
    """BLT's patching defaults: entropy patching, no patch over ``MAX_PATCH_SIZE`` bytes, static patches of 8."""
    return PatcherConfig(mode="entropy", max_patch_length=MAX_PATCH_SIZE, patch_size=8)


@dataclass(frozen=True)
class BLTConfig:
    """The BLT processor's local models, hash embeddings and patching.

    Patch size bounds: the mean patch size ``1 / target_boundary_ratio`` must lie in [8, 128] bytes and no patch is
    longer than ``patcher.max_patch_length`` (<= 128). ``patcher.max_patch_length`` must be at least the target mean
    size, else the controller could never reach its target (splits add boundaries that count in the ratio).
    ``patcher.threshold`` is the fixed threshold (``adaptive=False``) or the controller's starting θ.
    """

    # local encoder / decoder
    dim_local: int = 128
    heads_local: int = 4
    encoder_layers: int = 2  # causal byte blocks before the pooling cross-attention
    decoder_layers: int = 2
    window_local: int | None = 128  # sliding-window self-attention span of the local models, bytes
    mlp_hidden_local: int | None = None  # None -> 8/3 * dim_local rounded to 32
    cross_heads: int = 4  # heads of both cross-attentions
    decoder_patch_window: int | None = None  # latent outputs a byte attends to (the last k visible); None = all
    # hash n-gram embeddings (BLT §3.2.1)
    ngram_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    hash_vocab: int = 4096  # rows of each n-gram table (the reference uses 500k at 8B scale)
    # patching
    patcher: PatcherConfig = field(default_factory=default_patcher)  # mode, threshold, max_patch_length, ...
    adaptive: bool = True  # entropy: EMA controller on the global threshold during training
    target_boundary_ratio: float = 0.1  # 10 % of bytes start a patch = mean patch size 10

    def __post_init__(self) -> None:
        if isinstance(self.ngram_sizes, list):  # YAML gives lists
            object.__setattr__(self, "ngram_sizes", tuple(self.ngram_sizes))
        if isinstance(self.patcher, dict):  # as stored in checkpoints (plain values)
            object.__setattr__(self, "patcher", PatcherConfig(**self.patcher))
        if not isinstance(self.patcher, PatcherConfig):
            raise TypeError(f"BLTConfig.patcher must be a PatcherConfig, got {type(self.patcher).__name__}")
        for name in ("dim_local", "heads_local", "cross_heads", "hash_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"BLTConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"BLTConfig.{name}={getattr(self, name)} must be >= 0")
        if self.dim_local % self.heads_local or (self.dim_local // self.heads_local) % 2:
            raise ValueError(
                f"BLTConfig.dim_local={self.dim_local} must split into heads_local={self.heads_local} even-sized heads"
            )
        if self.dim_local % self.cross_heads:
            raise ValueError(f"BLTConfig.dim_local={self.dim_local} must be divisible by cross_heads={self.cross_heads}")
        if any(n < 1 for n in self.ngram_sizes) or len(set(self.ngram_sizes)) != len(self.ngram_sizes):
            raise ValueError(f"BLTConfig.ngram_sizes={list(self.ngram_sizes)} must be distinct sizes >= 1")
        if not 1 / MAX_PATCH_SIZE <= self.target_boundary_ratio <= 1 / MIN_MEAN_PATCH_SIZE:
            raise ValueError(
                f"BLTConfig.target_boundary_ratio={self.target_boundary_ratio} must be in [1/{MAX_PATCH_SIZE}, "
                f"1/{MIN_MEAN_PATCH_SIZE}] (mean patch size {MIN_MEAN_PATCH_SIZE}..{MAX_PATCH_SIZE} bytes)"
            )
        p = self.patcher
        if exists(p.max_patch_length) and not 1 <= p.max_patch_length <= MAX_PATCH_SIZE:
            raise ValueError(
                f"BLTConfig.patcher.max_patch_length={p.max_patch_length} must be in [1, {MAX_PATCH_SIZE}]"
            )
        adaptive = p.mode == "entropy" and self.adaptive
        if adaptive and exists(p.max_patch_length) and p.max_patch_length < 1 / self.target_boundary_ratio:
            raise ValueError(
                f"BLTConfig.patcher.max_patch_length={p.max_patch_length} is below the target mean patch size "
                f"1/target_boundary_ratio={1 / self.target_boundary_ratio:g}: the target is unreachable"
            )
        if adaptive and p.rule == "monotonic":
            raise ValueError(
                "BLTConfig.adaptive=True controls the global threshold, but patcher.rule='monotonic' does not use it; "
                "use rule 'global' or 'both', or adaptive=False"
            )
        if not (math.isfinite(p.threshold) and p.threshold > 0):
            raise ValueError(f"BLTConfig.patcher.threshold={p.threshold} must be a finite number > 0 (nats)")
        if exists(self.window_local) and self.window_local < 1:
            raise ValueError(f"BLTConfig.window_local={self.window_local} must be >= 1 or None")
        if exists(self.decoder_patch_window) and self.decoder_patch_window < 1:
            raise ValueError(f"BLTConfig.decoder_patch_window={self.decoder_patch_window} must be >= 1 or None")


# ----------------------------------------------------------------------------------------------------------------------
# hash n-gram embeddings


def rolling_polynomial_hash(windows: torch.Tensor, prime: int = HASH_PRIMES[0]) -> torch.Tensor:
    """windows: (..., n) int64 -> (...) int64 ``sum_i windows[..., i] * prime**i`` (wrapping int64 arithmetic)."""
    powers = torch.tensor([prime**i % 2**64 for i in range(windows.shape[-1])], dtype=torch.uint64)
    powers = powers.view(torch.int64).to(windows.device)  # two's complement: the same wrap-around as the reference
    return (windows * powers).sum(dim=-1)


def hash_ngram_ids(ids: torch.Tensor, n: int, hash_vocab: int, prime: int = HASH_PRIMES[0]) -> torch.Tensor:
    """Hash of the n-gram ending at every byte (zeros before the row's start), as ``byte_group_hash_function``.

    Args:
        ids: (B, T) int64 byte ids.
        n: n-gram size.
        hash_vocab: table rows.
        prime: hash base.

    Returns:
        (B, T) int64 in ``[0, hash_vocab)``; position ``t`` depends on ``ids[:, t-n+1 : t+1]`` only.
    """
    padded = F.pad(ids, (n - 1, 0), value=0)  # (B, T + n - 1)
    windows = padded.unfold(1, n, 1)  # (B, T, n)
    return torch.remainder(rolling_polynomial_hash(windows, prime), hash_vocab)


class HashNgramEmbedding(nn.Module):
    """Byte embedding + one hash-table embedding per n-gram size (BLT §3.2.1, eq. 2-3), summed."""

    def __init__(self, vocab_size: int, dim: int, ngram_sizes: tuple[int, ...], hash_vocab: int) -> None:
        super().__init__()
        self.ngram_sizes, self.hash_vocab = tuple(ngram_sizes), hash_vocab
        self.embed = nn.Embedding(vocab_size, dim)
        self.hash_embed = nn.Embedding(len(self.ngram_sizes) * hash_vocab, dim)  # the n tables, stacked
        self.register_buffer("offsets", torch.arange(len(self.ngram_sizes)) * hash_vocab, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 -> (B, T, C)."""
        x = self.embed(ids)
        if not self.ngram_sizes:
            return x
        with torch.no_grad():
            h = torch.stack([hash_ngram_ids(ids, n, self.hash_vocab) for n in self.ngram_sizes], dim=-1)  # (B, T, N)
        h = h + self.offsets
        return x + reduce(self.hash_embed(h), "b t n c -> b t c", "sum")


# ----------------------------------------------------------------------------------------------------------------------
# cross-attention and masks


class PatchCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention between bytes and patches, with a residual:
    ``x + proj(attn(q(x), kv(ctx), mask))`` (the encoder's patch-to-own-bytes pooling and the decoder's
    byte-to-patches reading).

    Args:
        dim_q: width of the queries ``x`` (and of the output).
        dim_kv: width of the context.
        heads: attention heads over ``dim_q``.
    """

    def __init__(self, dim_q: int, dim_kv: int, heads: int) -> None:
        super().__init__()
        if dim_q % heads:
            raise ValueError(f"dim_q={dim_q} must be divisible by heads={heads}")
        self.heads = heads
        self.norm_q = nn.RMSNorm(dim_q, eps=1e-6)
        self.norm_kv = nn.RMSNorm(dim_kv, eps=1e-6)
        self.q = nn.Linear(dim_q, dim_q, bias=False)
        self.kv = nn.Linear(dim_kv, 2 * dim_q, bias=False)
        self.proj = nn.Linear(dim_q, dim_q, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, Cq), ctx (B, S, Ckv), mask (B, Q, S) bool (True = may attend; every row needs one) -> (B, Q, Cq)."""
        q = rearrange(self.q(self.norm_q(x)), "b q (h d) -> b h q d", h=self.heads)
        k, v = rearrange(self.kv(self.norm_kv(ctx)), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, H, Q, d)
        return x + self.proj(rearrange(y, "b h q d -> b q (h d)"))


def encoder_mask(patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Patch-to-own-bytes block mask: patch ``p`` sees byte ``t`` iff ``patch_ids[t] == p``.

    Args:
        patch_ids: (B, T) int64 patch of each byte.
        n_patches: P.

    Returns:
        (B, P, T) bool.
    """
    return patch_ids[:, None, :] == torch.arange(n_patches, device=patch_ids.device)[None, :, None]


def decoder_mask(patch_ids: torch.Tensor, n_patches: int, window: int | None = None) -> torch.Tensor:
    """Byte ``t`` of patch ``p`` sees latent outputs ``j`` with ``p - window < j <= p`` (output ``j`` summarises
    patches ``< j``, see the module docstring).

    Args:
        patch_ids: (B, T) int64.
        n_patches: P latent outputs.
        window: how many of the visible outputs (the most recent); None for all.

    Returns:
        (B, T, P) bool, never an empty row (``j = p`` is always visible).
    """
    j = torch.arange(n_patches, device=patch_ids.device)[None, None, :]  # (1, 1, P)
    p = patch_ids[:, :, None]  # (B, T, 1)
    allowed = j <= p
    if exists(window):
        allowed &= j > p - window
    return allowed


def mean_pool(x: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Mean of each patch's byte states: x (B, T, C), patch_ids (B, T) -> (B, P, C) (zeros for empty patches)."""
    b, t, c = x.shape
    sums = x.new_zeros(b, n_patches, c).scatter_add_(1, patch_ids[..., None].expand(b, t, c), x)  # (B, P, C)
    counts = torch.zeros(b, n_patches, device=x.device, dtype=x.dtype).scatter_add_(
        1, patch_ids, torch.ones_like(patch_ids, dtype=x.dtype)
    )
    return sums / counts.clamp_min(1)[..., None]


# ----------------------------------------------------------------------------------------------------------------------
# the processor


class BLTOutput(NamedTuple):
    """What :meth:`BLTProcessor.forward` returns."""

    logits: torch.Tensor  # (B, T, V) next-byte logits
    latent: torch.Tensor  # (B, P, dim) latent outputs
    patch_ids: torch.Tensor  # (B, T) int64 patch of each byte
    lengths: torch.Tensor  # (B, P) int64 patch lengths, padded with 0


class BLTProcessor(nn.Module):
    """Local encoder + decoder around a latent model over patches (see the module docstring).

    Args:
        config: local model, hash embedding and patching settings.
        vocab_size: byte vocabulary (260 for the codec; larger when other token ranges share the stream).
        dim: width of the latent model (the patch embeddings it receives and the outputs it returns).
        dropout: dropout in the local blocks.
        rope_base: RoPE base of the local blocks.
        entropy_model: ``(B, T) ids -> (B, T, V) logits``, frozen; required for ``patcher.mode="entropy"``. It is *not*
            a submodule: it is neither trained nor saved with this module (it is reloaded from its own checkpoint).
    """

    def __init__(
        self,
        config: BLTConfig,
        vocab_size: int,
        dim: int,
        dropout: float = 0.0,
        rope_base: float = 10_000.0,
        entropy_model: EntropyModel | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, BLTConfig):
            raise TypeError(f"config must be a BLTConfig, got {type(config).__name__}")
        if config.patcher.mode == "entropy" and entropy_model is None:
            raise ValueError("BLTConfig.patcher.mode='entropy' needs an entropy_model (a frozen ByteLM)")
        if dim % config.cross_heads:
            raise ValueError(f"dim={dim} must be divisible by BLTConfig.cross_heads={config.cross_heads}")
        self.config, self.dim, self.vocab_size = config, dim, vocab_size
        n_local = max(config.encoder_layers, config.decoder_layers, 1)
        self.local_config = TransformerConfig(
            vocab_size=vocab_size, dim=config.dim_local, n_layers=n_local, heads=config.heads_local,
            window=config.window_local, mlp_hidden=config.mlp_hidden_local, dropout=dropout, rope_base=rope_base,
        )
        self.embed = HashNgramEmbedding(vocab_size, config.dim_local, config.ngram_sizes, config.hash_vocab)
        self.encoder = nn.ModuleList(Block(self.local_config) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.RMSNorm(config.dim_local, eps=1e-6)
        self.to_query = nn.Linear(config.dim_local, dim, bias=False)  # pooled bytes -> patch query
        self.pool = PatchCrossAttention(dim, config.dim_local, config.cross_heads)
        self.start = nn.Parameter(torch.zeros(dim))  # the latent input before the first patch (the reference's BOE)
        self.decoder_cross = nn.ModuleList(
            PatchCrossAttention(config.dim_local, dim, config.cross_heads)
            for _ in range(max(config.decoder_layers, 1))
        )
        self.decoder = nn.ModuleList(Block(self.local_config) for _ in range(config.decoder_layers))
        self.norm = nn.RMSNorm(config.dim_local, eps=1e-6)
        self.head = nn.Linear(config.dim_local, vocab_size, bias=False)
        self.apply(self._init_weights)
        n_layers = config.encoder_layers + config.decoder_layers
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.w2.weight", ".proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(n_layers, 1)))
        self.patcher = Patcher(config.patcher, entropy_model)
        self.controller = (
            AdaptiveEntropyThreshold(
                target_boundary_ratio=config.target_boundary_ratio, initial_threshold=config.patcher.threshold,
                max_patch_length=config.patcher.max_patch_length,
            )
            if config.patcher.mode == "entropy" and config.adaptive
            else None
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # -- patching ----------------------------------------------------------------------------------------------------

    @property
    def entropy_model(self) -> EntropyModel | None:
        return self.patcher.entropy_model

    @property
    def threshold(self) -> float:
        """The global entropy threshold in use (nats)."""
        return self.controller.threshold if exists(self.controller) else self.config.patcher.threshold

    def patch_lengths(
        self, ids: torch.Tensor, update: bool = False, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Patch a batch.

        Args:
            ids: (B, T) int64 byte ids.
            update: let the adaptive controller observe this batch's boundary ratio (training steps only).
            reduce_mean: averages a tensor over processes (DDP ranks); applied to the (2,) boundary and position
                counts before the update, so every rank observes the pooled ratio and keeps the same θ.

        Returns:
            (B, P) int64 patch lengths padded with 0, rows summing to T.
        """
        model = self.entropy_model
        if isinstance(model, nn.Module):  # not a submodule: follow the batch's device by hand
            param = next(model.parameters(), None)
            if param is not None and param.device != ids.device:
                model.to(ids.device)
        # ids beyond the byte codec (MVoT's image markers and visual codes) are each a patch of their own, and the
        # byte after one starts a new patch; the entropy model and the space rule see PAD there (both causal)
        extra = ids >= VOCAB_SIZE  # (B, T)
        byte_ids = ids.masked_fill(extra, PAD_ID) if bool(extra.any()) else ids
        entropy_mode = self.config.patcher.mode == "entropy"
        mask = self.patcher.start_mask(byte_ids, threshold=self.threshold if entropy_mode else None)
        ruled = torch.ones_like(mask)  # (B, T) positions whose start the patching rule decides
        if byte_ids is not ids:
            forced = extra | F.pad(extra[:, :-1], (1, 0), value=False)  # (B, T)
            mask, ruled = mask | forced, ~forced
        if update and exists(self.controller):
            # the controller holds the rule's boundary ratio over byte positions: image ids and the byte after each
            # are starts by construction, and counting them would push θ up on image-heavy batches
            counts = torch.stack([(mask & ruled).sum(), ruled.sum()]).float()  # (2,) starts, positions
            if exists(reduce_mean):
                counts = reduce_mean(counts)  # the ratio of the means over ranks is the pooled ratio
            if counts[1] > 0:  # no byte position anywhere (all image ids): nothing to observe, θ holds
                self.controller.observe(float(counts[0] / counts[1]))
        return patch_lengths_from_start_mask(mask)

    def get_extra_state(self) -> dict[str, Any]:
        """The adaptive threshold's state, saved in ``state_dict`` (so checkpoints and resumes carry it)."""
        return {"controller": self.controller.state_dict() if exists(self.controller) else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("controller") if isinstance(state, dict) else None
        if exists(saved) and exists(self.controller):
            self.controller.load_state_dict(saved)

    # -- model -------------------------------------------------------------------------------------------------------

    def _local(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_angles(positions, self.local_config.dim_head, self.local_config.rope_base)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in blocks:
            x = block(x, cos, sin, positions)
        return x

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bytes -> byte states and patch embeddings.

        Args:
            ids: (B, T) int64.
            lengths: (B, P) int64 patch lengths (rows sum to T, padded with 0).

        Returns:
            h: (B, T, dim_local) causal byte states; patches: (B, P, dim) pooled patches (zeros for padding
            patches); patch_ids: (B, T) int64.
        """
        b, t = ids.shape
        p = lengths.shape[1]
        patch_ids = patch_ids_from_lengths(lengths, t)  # (B, T)
        h = self._local(self.encoder, self.embed(ids))  # (B, T, Cl)
        hn = self.encoder_norm(h)
        query = self.to_query(mean_pool(hn, patch_ids, p))  # (B, P, C): initialised by pooling its bytes
        mask = encoder_mask(patch_ids, p)  # (B, P, T)
        real = lengths > 0  # (B, P)
        mask = mask | ~real[..., None]  # padding patches attend anywhere (no NaN); their output is zeroed below
        patches = self.pool(query, hn, mask) * real[..., None].to(query.dtype)
        return h, patches, patch_ids

    def latent_inputs(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, C) patches -> (B, P, C) latent inputs ``[start, patch_0, ..., patch_{P-2}]``."""
        start = self.start.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([start, patches[:, :-1]], dim=1)

    def decode(self, h: torch.Tensor, latent: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """Byte states (B, T, Cl) + latent outputs (B, P, C) -> next-byte logits (B, T, V)."""
        mask = decoder_mask(patch_ids, latent.shape[1], self.config.decoder_patch_window)  # (B, T, P)
        positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_angles(positions, self.local_config.dim_head, self.local_config.rope_base)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        x = h
        for i, cross in enumerate(self.decoder_cross):  # cross-attention before every decoder block
            x = cross(x, latent, mask)
            if i < len(self.decoder):
                x = self.decoder[i](x, cos, sin, positions)
        return self.head(self.norm(x))

    def forward(
        self,
        ids: torch.Tensor,
        latent_model: Callable[[torch.Tensor], torch.Tensor],
        lengths: torch.Tensor | None = None,
    ) -> BLTOutput:
        """ids (B, T) -> logits (B, T, V) through ``latent_model`` ((B, P, dim) -> (B, P, dim)).

        Args:
            ids: (B, T) int64 ids.
            latent_model: the model over patches.
            lengths: (B, P) int64 patch lengths of ``ids`` when already computed (e.g. by :meth:`patch_lengths`
                with ``update=True`` earlier in the step); ``None`` patches here without updating the controller.

        Returns:
            :class:`BLTOutput`: logits (B, T, V), latent (B, P, dim), patch_ids (B, T), lengths (B, P).
        """
        if lengths is None:
            lengths = self.patch_lengths(ids)
        h, patches, patch_ids = self.encode(ids, lengths)
        latent = latent_model(self.latent_inputs(patches))  # (B, P, dim)
        logits = self.decode(h, latent, patch_ids)
        return BLTOutput(logits=logits, latent=latent, patch_ids=patch_ids, lengths=lengths)
