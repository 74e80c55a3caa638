"""Entropy patching (Byte Latent Transformer): bytes -> variable-length patches.

A small byte LM predicts each next byte; where its prediction is uncertain (high entropy) a new patch starts, so
predictable runs of bytes share one patch and the big latent model spends its compute where the text is hard.
Reference: Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than Tokens" (arXiv 2412.09871),
section 2.3 and ``facebookresearch/blt`` ``bytelatent/data/patcher.py``; space patching from Slagle 2024,
"SpaceByte" (arXiv 2404.14408).

The pipeline is a chain of small tensor functions; shapes use ``B`` batch, ``T`` bytes, ``P`` patches, ``V`` vocab,
``W`` context windows, ``L`` window length, ``N`` bytes of a flattened batch::

    ids (B, T) --next_byte_entropies--> entropies (B, T) nats
        --global_start_mask / monotonic_start_mask / combined_start_mask--> start mask (B, T) bool
        --split_long_patches (max_patch_length)--> start mask (B, T) bool
        --patch_start_ids_from_start_mask--> start ids (B, P), padded with T
        --patch_lengths_from_start_ids--> lengths (B, P), padded with 0
        --patch_ids_from_lengths--> patch id of every byte (B, T)

Conventions (as in the reference): ``H_j`` is the entropy of the model's prediction of byte ``j`` from the bytes
before it (byte 0 is predicted from a BOS prefix), and ``H_j`` decides whether byte ``j`` starts a patch (strict
``>``). The first byte of each row always starts a patch. :class:`PatcherConfig` + :class:`Patcher` wrap the chain;
:func:`calibrate_threshold` finds the global threshold for a target mean patch size and
:class:`AdaptiveEntropyThreshold` keeps a target boundary ratio on a stream. Plain ``torch``, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from neat_lightning.codec import BOS_ID, OFFSET, PAD_ID

Mode = Literal["entropy", "static", "space"]
Rule = Literal["global", "monotonic", "both"]
Combine = Literal["or", "and"]
EntropyModel = Callable[[torch.Tensor], torch.Tensor]  # (B, T) int64 ids -> (B, T, V) logits

NEWLINE_ID = ord("\n") + OFFSET

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, T) tensor, got shape {shape}")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) tensor -> (1, T) int64 positions 0..T-1 on its device."""
    return torch.arange(mask.shape[1], device=mask.device)[None]


def force_first_start(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, T) bool -> (B, T) bool with the first byte of every row a patch start."""
    first = torch.ones_like(mask[:, :1])
    return torch.cat([first, mask[:, 1:]], dim=1)


def context_size(model: Any) -> int | None:
    """The context length a model was trained on (``model.config.block_size``), or None when unknown."""
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None)


# ----------------------------------------------------------------------------------------------------------------------
# entropies


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-byte distributions, in nats (natural log), computed in float32.

    Args:
        logits: (B, T, V) unnormalised scores.

    Returns:
        (B, T) float32 entropies ``-sum_v p_v log p_v``, in [0, log V].
    """
    # H = log Z - sum_v p_v z_v with z = logits - max and Z = sum_v exp(z_v): one exp pass instead of the two of
    # log_softmax + exp. The clamp keeps -inf logits finite (exp gives 0 and 0 * z stays 0, not nan).
    z = logits.float() - logits.amax(dim=-1, keepdim=True).float()  # (B, T, V), <= 0
    z = z.clamp_(min=-1e4)
    e = z.exp()
    total = e.sum(dim=-1)  # (B, T), >= 1
    return total.log() - (e * z).sum(dim=-1) / total


def segment_start_mask(ids: torch.Tensor, reset_at_newline: bool = False) -> torch.Tensor:
    """Where the entropy model's context restarts.

    Args:
        ids: (B, T) int64 byte ids.
        reset_at_newline: also restart after every newline byte, as if each line were a new document.

    Returns:
        (B, T) bool, True at the first byte of every row and (optionally) at every byte following a newline.
    """
    after_newline = torch.zeros_like(ids, dtype=torch.bool)
    if reset_at_newline:
        after_newline[:, 1:] = ids[:, :-1] == NEWLINE_ID
    return force_first_start(after_newline)


def context_windows(
    inputs: torch.Tensor, segment_starts: torch.Tensor, block_size: int, context_overlap: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every segment of a flattened id stream into model-sized windows, all at once (no loop over bytes).

    Window ``k`` of a segment covers segment positions ``[k * stride, k * stride + L)`` with ``stride = block_size
    - context_overlap``; window 0 predicts all its positions, later windows only their last ``stride`` (the first
    ``context_overlap`` positions are context already predicted by the window before). Every position of the stream
    is therefore predicted exactly once, from at least ``context_overlap`` bytes of its own segment when available.

    Args:
        inputs: (N,) int64 model inputs (the byte before each position, or BOS at a segment start).
        segment_starts: (N,) bool, True where a segment (row or line) begins; ``segment_starts[0]`` must be True.
        block_size: window length ``L`` (the model's context).
        context_overlap: positions of context each window after the first repeats from the one before.

    Returns:
        windows: (W, L) int64 model inputs, PAD after a segment's end.
        keep: (W, L) bool, the positions whose prediction is used.
        index: (W, L) int64 stream position of each window position (clamped into range where not kept).
    """
    n = inputs.shape[0]
    device = inputs.device
    starts = segment_starts.nonzero().squeeze(1)  # (S,)
    lengths = torch.diff(starts, append=torch.tensor([n], device=device))  # (S,)
    stride = block_size - context_overlap
    window_len = min(block_size, int(lengths.max()))  # short segments need no full-length window
    n_windows = 1 + (lengths - window_len).clamp(min=0).add(stride - 1).div(stride, rounding_mode="floor")  # (S,)
    segment = torch.repeat_interleave(torch.arange(len(starts), device=device), n_windows)  # (W,)
    first = torch.cumsum(n_windows, 0) - n_windows  # (S,) index of each segment's first window
    k = torch.arange(len(segment), device=device) - first[segment]  # (W,) window number inside its segment
    local = k[:, None] * stride + torch.arange(window_len, device=device)[None]  # (W, L) segment positions
    valid = local < lengths[segment][:, None]
    keep = valid & ((k[:, None] == 0) | (torch.arange(window_len, device=device)[None] >= context_overlap))
    index = (starts[segment][:, None] + local).clamp(max=n - 1)  # (W, L)
    windows = inputs[index].masked_fill(~valid, PAD_ID)
    return windows, keep, index


@torch.inference_mode()
def _next_byte_entropies(
    model: EntropyModel,
    ids: torch.Tensor,
    block_size: int,
    context_overlap: int,
    reset_at_newline: bool,
    batch_windows: int,
    bos_id: int,
) -> torch.Tensor:
    b, t = ids.shape
    device = _model_device(model, ids.device)
    ids = ids.to(device)
    seg = segment_start_mask(ids, reset_at_newline)  # (B, T)
    previous = torch.cat([torch.full_like(ids[:, :1], bos_id), ids[:, :-1]], dim=1)  # (B, T) byte before each
    inputs = previous.masked_fill(seg, bos_id)  # a segment's first byte is predicted from BOS alone
    windows, keep, index = context_windows(inputs.reshape(-1), seg.reshape(-1), block_size, context_overlap)
    used = keep.sum(dim=1)  # (W,) positions each window contributes
    # longest windows first, so each forward batch can be trimmed to its longest valid prefix (causal model:
    # trailing PAD changes nothing before it)
    ones_based = torch.arange(1, windows.shape[1] + 1, device=device)[None]  # (1, L)
    valid_len = torch.where(keep, ones_based, 0).amax(dim=1)  # (W,) last kept position + 1
    order = torch.argsort(valid_len, descending=True)
    out = torch.empty(b * t, dtype=torch.float32, device=device)
    for chunk in order.split(batch_windows):  # loop over batches of windows, never over bytes
        width = int(valid_len[chunk[0]])
        ent = entropy(model(windows[chunk, :width]))  # (w, width)
        sel = keep[chunk, :width]
        out[index[chunk, :width][sel]] = ent[sel]
    assert int(used.sum()) == b * t, f"windows predict {int(used.sum())} positions, expected {b * t}"
    return rearrange(out, "(b t) -> b t", b=b)


def _model_device(model: Any, fallback: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return fallback


def next_byte_entropies(
    model: EntropyModel,
    ids: torch.Tensor,
    block_size: int | None = None,
    context_overlap: int = 0,
    reset_at_newline: bool = False,
    batch_windows: int = 16,
    bos_id: int = BOS_ID,
) -> torch.Tensor:
    """Entropy ``H_j`` of the model's prediction of every byte ``j`` from the bytes before it.

    Byte 0 (and, with ``reset_at_newline``, every byte after a newline) is predicted from a BOS prefix alone. Long
    rows are cut into windows of the model's context (:func:`context_windows`) that run as batches of
    ``batch_windows``; the model runs in eval mode under ``torch.inference_mode()`` on its own device.

    Args:
        model: ``(B, T) ids -> (B, T, V) logits`` (a ``ByteLM`` or its ``.model``, a ``ByteTransformer``).
        ids: (B, T) int64 byte ids (byte + 4).
        block_size: window length; None reads ``model.config.block_size``.
        context_overlap: bytes of context each window repeats from the previous one (0 = disjoint windows, the
            fastest; larger values give later windows' first bytes more context).
        reset_at_newline: restart the context after each newline (off by default; the reference resets only at
            document boundaries).
        batch_windows: windows per forward pass.
        bos_id: the id fed before a segment's first byte.

    Returns:
        (B, T) float32 entropies in nats, on ``ids``' device (ordinary tensors, usable with autograd later).
    """
    _check_2d("ids", ids)
    block_size = block_size if block_size is not None else context_size(model)
    if block_size is None:
        raise ValueError("block_size=None and the model has no config.block_size; pass block_size explicitly")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if not 0 <= context_overlap < block_size:
        raise ValueError(f"context_overlap={context_overlap} must be in [0, block_size={block_size})")
    if batch_windows < 1:
        raise ValueError(f"batch_windows={batch_windows} must be >= 1")
    if ids.numel() == 0:
        return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()  # no dropout while measuring
    try:
        out = _next_byte_entropies(model, ids, block_size, context_overlap, reset_at_newline, batch_windows, bos_id)
    finally:
        if was_training:
            model.train()
    return out.to(ids.device).clone()  # clone outside inference mode: a normal tensor


# ----------------------------------------------------------------------------------------------------------------------
# patch start rules: (B, T) entropies -> (B, T) bool start mask, first byte always a start


def global_start_mask(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """Global rule (BLT eq. 3): byte ``t`` starts a patch when ``H_t > threshold``.

    Args:
        entropies: (B, T) float, nats.
        threshold: nats.

    Returns:
        (B, T) bool start mask.
    """
    return force_first_start(entropies > threshold)


def monotonic_start_mask(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """Approximately monotonic rule (BLT eq. 4): byte ``t`` starts a patch when ``H_t - H_{t-1} > threshold``.

    Args:
        entropies: (B, T) float, nats.
        threshold: nats.

    Returns:
        (B, T) bool start mask.
    """
    rise = entropies[:, 1:] - entropies[:, :-1]  # (B, T - 1)
    return force_first_start(F.pad(rise > threshold, (1, 0)))


def combined_start_mask(
    entropies: torch.Tensor, threshold: float, monotonic_threshold: float, combine: Combine = "or"
) -> torch.Tensor:
    """Both rules: a start where either (``"or"``) or both (``"and"``, the reference's combination) fire.

    Args:
        entropies: (B, T) float, nats.
        threshold: global threshold, nats.
        monotonic_threshold: threshold on ``H_t - H_{t-1}``, nats.
        combine: ``"or"`` or ``"and"``.

    Returns:
        (B, T) bool start mask.
    """
    a, b = global_start_mask(entropies, threshold), monotonic_start_mask(entropies, monotonic_threshold)
    if combine == "or":
        return a | b
    if combine == "and":
        return a & b
    raise ValueError(f"combine={combine!r} must be one of 'or', 'and'")


def split_long_patches(start_mask: torch.Tensor, max_patch_length: int) -> torch.Tensor:
    """Split every patch longer than ``m = max_patch_length`` into full m-chunks plus the remainder.

    A byte starts a patch when it did before or when it lies a multiple of ``m`` bytes after the last start
    (``cummax`` of the start positions: no loop). Lengths ``[10]`` with ``m = 4`` become ``[4, 4, 2]``.

    Args:
        start_mask: (B, T) bool; a row without a start at 0 is treated as starting there.
        max_patch_length: m >= 1.

    Returns:
        (B, T) bool start mask.
    """
    if max_patch_length < 1:
        raise ValueError(f"max_patch_length={max_patch_length} must be >= 1")
    pos = _positions(start_mask)  # (1, T)
    last_start = torch.cummax(torch.where(start_mask, pos, 0), dim=1).values  # (B, T)
    return start_mask | ((pos - last_start) % max_patch_length == 0)


def static_start_mask(ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Static baseline: fixed-size patches of ``patch_size`` bytes (the last one may be shorter).

    Args:
        ids: (B, T) ids (only the shape is used).
        patch_size: bytes per patch.

    Returns:
        (B, T) bool start mask.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size={patch_size} must be >= 1")
    return (_positions(ids) % patch_size == 0).expand(ids.shape[0], -1)


def space_like(ids: torch.Tensor) -> torch.Tensor:
    """SpaceByte's space-like bytes, as in BLT's space patching: any byte that is not an ASCII letter or digit and
    not a UTF-8 continuation byte (so UTF-8 lead bytes count), plus the special ids.

    Args:
        ids: (B, T) int64 ids.

    Returns:
        (B, T) bool.
    """
    byte = ids - OFFSET
    alnum = ((byte >= ord("0")) & (byte <= ord("9"))) | ((byte >= ord("A")) & (byte <= ord("Z")))
    alnum |= (byte >= ord("a")) & (byte <= ord("z"))
    continuation = (byte >= 0x80) & (byte < 0xC0)
    return ~(alnum | continuation) | (ids < OFFSET)


def space_start_mask(ids: torch.Tensor) -> torch.Tensor:
    """Space baseline (BLT / SpaceByte): a patch starts after each space-like byte that follows a non-space-like
    one (a run of spaces closes the word before it once; the rest of the run leads the next patch).

    Args:
        ids: (B, T) int64 ids.

    Returns:
        (B, T) bool start mask.
    """
    space = space_like(ids)  # (B, T)
    ends = space & ~F.pad(space[:, :-1], (1, 0), value=False)  # first space-like byte of each run
    return force_first_start(F.pad(ends[:, :-1], (1, 0)))  # the byte after an end starts a patch


# ----------------------------------------------------------------------------------------------------------------------
# masks <-> start ids <-> lengths <-> patch ids


def patch_start_ids_from_start_mask(start_mask: torch.Tensor) -> torch.Tensor:
    """Positions of the patch starts, left-aligned and padded with T (no loop: each start is scattered to its
    patch number).

    Args:
        start_mask: (B, T) bool.

    Returns:
        (B, P) int64 start positions, P the largest number of starts in a row; padded with T.
    """
    b, t = start_mask.shape
    counts = start_mask.sum(dim=1)  # (B,)
    p = int(counts.max()) if b else 0
    slot = torch.where(start_mask, start_mask.long().cumsum(1) - 1, p)  # (B, T) patch number, or the spare column
    out = torch.full((b, p + 1), t, dtype=torch.long, device=start_mask.device)
    out.scatter_(1, slot, _positions(start_mask).expand(b, -1).contiguous())
    return out[:, :p]


def patch_lengths_from_start_ids(start_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Start ids (padded with ``seq_len``) -> patch lengths: next start minus this start.

    Args:
        start_ids: (B, P) int64, increasing within the real patches, then ``seq_len``.
        seq_len: T.

    Returns:
        (B, P) int64 lengths, 0 for padding.
    """
    ends = torch.cat([start_ids[:, 1:], torch.full_like(start_ids[:, :1], seq_len)], dim=1)  # (B, P)
    return ends - start_ids


def check_patch_lengths(lengths: torch.Tensor, seq_len: int) -> None:
    """Invariants of padded patch lengths: every row sums to ``seq_len`` and no non-zero length follows a zero."""
    sums = lengths.sum(dim=1)
    bad = (sums != seq_len).nonzero()
    assert len(bad) == 0, f"row {int(bad[0])}: patch lengths sum to {int(sums[bad[0]])}, expected {seq_len}"
    after_zero = (lengths != 0) & F.pad(lengths[:, :-1] == 0, (1, 0), value=False)
    bad = after_zero.nonzero()
    assert len(bad) == 0, (
        f"row {int(bad[0, 0])}: non-zero patch length {int(lengths[bad[0, 0], bad[0, 1]])} "
        f"at patch {int(bad[0, 1])} after a zero length at patch {int(bad[0, 1]) - 1}"
    )
    assert bool((lengths >= 0).all()), f"negative patch length {int(lengths.min())}"


def patch_lengths_from_start_mask(start_mask: torch.Tensor) -> torch.Tensor:
    """Start mask -> patch lengths, padded with zeros; the invariants are asserted on the way out.

    Args:
        start_mask: (B, T) bool; the first byte of each row must be a start (the rules guarantee it).

    Returns:
        (B, P) int64 lengths, each row summing to T.
    """
    _check_2d("start_mask", start_mask)
    if start_mask.shape[1] and not bool(start_mask[:, 0].all()):
        raise ValueError("start_mask[:, 0] must be True: the first byte of every row starts a patch")
    lengths = patch_lengths_from_start_ids(patch_start_ids_from_start_mask(start_mask), start_mask.shape[1])
    check_patch_lengths(lengths, start_mask.shape[1])
    return lengths


def start_mask_from_patch_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of :func:`patch_lengths_from_start_mask`.

    Args:
        lengths: (B, P) int64 patch lengths padded with 0.
        seq_len: T.

    Returns:
        (B, T) bool start mask.
    """
    starts = torch.cumsum(lengths, dim=1) - lengths  # (B, P) start of each patch (T for padding after the last)
    mask = torch.zeros(lengths.shape[0], seq_len + 1, dtype=torch.bool, device=lengths.device)
    mask.scatter_(1, starts.clamp(max=seq_len), True)
    return mask[:, :seq_len]


def patch_ids_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Which patch every byte belongs to (what the BLT encoder pools by and the decoder cross-attends to).

    Args:
        lengths: (B, P) int64 patch lengths padded with 0, rows summing to ``seq_len``.
        seq_len: T.

    Returns:
        (B, T) int64 patch index of each byte, in [0, P).
    """
    ends = torch.cumsum(lengths, dim=1).contiguous()  # (B, P) exclusive end of each patch
    pos = torch.arange(seq_len, device=lengths.device).expand(lengths.shape[0], -1).contiguous()  # (B, T)
    return torch.searchsorted(ends, pos, right=True)  # number of patches ending at or before each byte


def patch_statistics(lengths: torch.Tensor) -> dict[str, float]:
    """Summary of padded patch lengths: mean / p50 / p90 / p99 / max patch size, boundary ratio, counts.

    Args:
        lengths: (B, P) int64 lengths padded with 0.

    Returns:
        plain floats: ``mean_size``, ``p50``, ``p90``, ``p99``, ``max_size``, ``boundary_ratio`` (patches per byte),
        ``n_bytes``, ``n_patches``.
    """
    sizes = lengths[lengths > 0].float()
    n_bytes, n_patches = float(sizes.sum()), float(sizes.numel())
    if n_patches == 0:
        return dict(mean_size=0.0, p50=0.0, p90=0.0, p99=0.0, max_size=0.0, boundary_ratio=0.0, n_bytes=0.0,
                    n_patches=0.0)
    ranks = (torch.tensor([0.5, 0.9, 0.99]) * (n_patches - 1)).round().long()  # nearest-rank percentiles
    q = torch.sort(sizes).values[ranks.to(sizes.device)]
    return dict(
        mean_size=n_bytes / n_patches, p50=float(q[0]), p90=float(q[1]), p99=float(q[2]), max_size=float(sizes.max()),
        boundary_ratio=n_patches / n_bytes, n_bytes=n_bytes, n_patches=n_patches,
    )


# ----------------------------------------------------------------------------------------------------------------------
# configuration and the patcher


@dataclass(frozen=True)
class PatcherConfig:
    """How bytes become patches.

    Attributes:
        mode: ``"entropy"`` (BLT), or the ``"static"`` / ``"space"`` baselines.
        rule: entropy rule: ``"global"`` ``H_t > threshold``, ``"monotonic"`` ``H_t - H_{t-1} >
            monotonic_threshold``, or ``"both"`` combined by ``combine``.
        threshold: global threshold in nats (BLT's default; calibrate it for another entropy model).
        monotonic_threshold: threshold on the entropy rise, nats.
        combine: how ``rule="both"`` joins the two masks: ``"or"`` (either fires) or ``"and"`` (the reference).
        max_patch_length: split longer patches into chunks of this many bytes; None = no limit.
        patch_size: bytes per patch in static mode.
        reset_at_newline: restart the entropy model's context after each newline (off in the reference).
        context_overlap: bytes of context repeated between consecutive entropy windows.
        block_size: entropy window length; None = the entropy model's ``config.block_size``.
        batch_windows: entropy windows per forward pass.
        bos_id: the id the entropy model sees before a document's (or, with ``reset_at_newline``, a line's) first
            byte. BLT's BOS by default; a ByteLM trained on this package's EOS-separated streams has only ever seen
            EOS there (``EOS_ID = 2``).
    """

    # patching
    mode: Mode = "entropy"
    rule: Rule = "global"
    threshold: float = 1.335442066192627  # BLT's default for its 100M entropy model (PatcherArgs.threshold)
    monotonic_threshold: float = 1.0
    combine: Combine = "or"
    max_patch_length: int | None = None
    patch_size: int = 4  # static baseline; BLT's entropy patches average about 4.5 bytes
    # entropy model
    reset_at_newline: bool = False
    context_overlap: int = 0
    block_size: int | None = None
    batch_windows: int = 16  # windows per forward: small batches stay in cache (16 beat 64 and 256 on CPU)
    bos_id: int = BOS_ID

    def __post_init__(self) -> None:
        choices = {"mode": ("entropy", "static", "space"), "rule": ("global", "monotonic", "both"),
                   "combine": ("or", "and")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PatcherConfig.{name}={getattr(self, name)!r} must be one of {list(allowed)}")
        for name in ("threshold", "monotonic_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"PatcherConfig.{name}={value!r} must be a finite number (nats)")
        if self.max_patch_length is not None and self.max_patch_length < 1:
            raise ValueError(f"PatcherConfig.max_patch_length={self.max_patch_length} must be >= 1 or None")
        if self.patch_size < 1:
            raise ValueError(f"PatcherConfig.patch_size={self.patch_size} must be >= 1")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"PatcherConfig.block_size={self.block_size} must be >= 1 or None")
        if self.context_overlap < 0 or (self.block_size is not None and self.context_overlap >= self.block_size):
            raise ValueError(
                f"PatcherConfig.context_overlap={self.context_overlap} must be >= 0 and < block_size={self.block_size}"
            )
        if self.batch_windows < 1:
            raise ValueError(f"PatcherConfig.batch_windows={self.batch_windows} must be >= 1")
        if not 0 <= self.bos_id < OFFSET:
            raise ValueError(f"PatcherConfig.bos_id={self.bos_id} must be a special id in [0, {OFFSET})")


class Patcher:
    """Turns byte ids (and, in entropy mode, an entropy model) into patch lengths.

    A plain class, not an ``nn.Module``: the entropy model stays outside any module that owns a patcher, so its
    weights are neither trained nor saved twice.

    Args:
        config: the patching settings.
        entropy_model: ``(B, T) ids -> (B, T, V) logits``; needed in entropy mode unless entropies are passed in.

    Example:
        >>> patcher = Patcher(PatcherConfig(mode="static", patch_size=4))
        >>> patcher(torch.full((1, 10), 100)).tolist()
        [[4, 4, 2]]
    """

    def __init__(self, config: PatcherConfig | None = None, entropy_model: EntropyModel | None = None) -> None:
        self.config = config if config is not None else PatcherConfig()
        if not isinstance(self.config, PatcherConfig):
            raise TypeError(f"config must be a PatcherConfig, got {type(self.config).__name__}")
        if entropy_model is not None and not callable(entropy_model):
            raise TypeError(f"entropy_model must be callable (ids -> logits), got {type(entropy_model).__name__}")
        if entropy_model is not None and self.config.block_size is None and context_size(entropy_model) is None:
            raise ValueError("PatcherConfig.block_size=None and the entropy model has no config.block_size")
        self.entropy_model = entropy_model

    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 -> (B, T) float32 next-byte entropies (nats) from the entropy model."""
        if self.entropy_model is None:
            raise ValueError("entropy mode needs an entropy_model (Patcher(config, entropy_model)) or entropies=...")
        c = self.config
        return next_byte_entropies(
            self.entropy_model, ids, block_size=c.block_size, context_overlap=c.context_overlap,
            reset_at_newline=c.reset_at_newline, batch_windows=c.batch_windows, bos_id=c.bos_id,
        )

    def start_mask(
        self, ids: torch.Tensor, entropies: torch.Tensor | None = None, threshold: float | None = None
    ) -> torch.Tensor:
        """Patch start mask.

        Args:
            ids: (B, T) int64 byte ids.
            entropies: (B, T) precomputed entropies (entropy mode); computed with the entropy model when None.
            threshold: overrides ``config.threshold`` (e.g. from :class:`AdaptiveEntropyThreshold`).

        Returns:
            (B, T) bool, True where a patch starts.
        """
        _check_2d("ids", ids)
        c = self.config
        if c.mode == "static":
            mask = static_start_mask(ids, c.patch_size)
        elif c.mode == "space":
            mask = space_start_mask(ids)
        else:
            if entropies is None:
                entropies = self.entropies(ids)
            if entropies.shape != ids.shape:
                raise ValueError(f"entropies shape {tuple(entropies.shape)} != ids shape {tuple(ids.shape)}")
            theta = c.threshold if threshold is None else threshold
            if c.rule == "global":
                mask = global_start_mask(entropies, theta)
            elif c.rule == "monotonic":
                mask = monotonic_start_mask(entropies, c.monotonic_threshold)
            else:
                mask = combined_start_mask(entropies, theta, c.monotonic_threshold, c.combine)
        if c.max_patch_length is not None and ids.shape[1]:
            mask = split_long_patches(mask, c.max_patch_length)
        return mask

    def patch_lengths(
        self, ids: torch.Tensor, entropies: torch.Tensor | None = None, threshold: float | None = None
    ) -> torch.Tensor:
        """ids: (B, T) -> (B, P) int64 patch lengths padded with 0 (see :meth:`start_mask` for the arguments)."""
        return patch_lengths_from_start_mask(self.start_mask(ids, entropies, threshold))

    __call__ = patch_lengths


# ----------------------------------------------------------------------------------------------------------------------
# threshold calibration and control


def _count_patches(entropies: torch.Tensor, threshold: float, max_patch_length: int | None) -> int:
    mask = global_start_mask(entropies, threshold)
    if max_patch_length is not None:
        mask = split_long_patches(mask, max_patch_length)
    return int(mask.sum())


def calibrate_threshold(
    entropies: torch.Tensor, target_mean_patch_size: float, max_patch_length: int | None = None
) -> float:
    """The global threshold whose patches on ``entropies`` have mean size ``target_mean_patch_size``.

    The number of patches is ``B`` forced first bytes + the bytes above the threshold (+ splits of long patches),
    so the target count fixes how many entropies must lie above it: the threshold is taken between two neighbouring
    order statistics (a quantile), then, when ``max_patch_length`` adds patches, the number of entropies above it
    is bisected until the count is the closest achievable. Exact up to ties and rounding to whole patches.

    Args:
        entropies: (B, T) or (T,) float entropies, nats (each row's first byte is a forced start).
        target_mean_patch_size: bytes per patch, >= 1.
        max_patch_length: the limit the patcher will apply (adds patches), or None.

    Returns:
        threshold in nats (use with the strict rule ``H > threshold``).

    Raises:
        ValueError: a target below 1 or beyond what the forced starts and ``max_patch_length`` allow.
    """
    if entropies.dim() == 1:
        entropies = entropies[None]
    _check_2d("entropies", entropies)
    if not target_mean_patch_size >= 1.0:
        raise ValueError(f"target_mean_patch_size={target_mean_patch_size} must be >= 1 byte")
    entropies = entropies.detach().float()
    b, t = entropies.shape
    n = b * t
    if n == 0:
        raise ValueError("entropies is empty: nothing to calibrate on")
    candidates = torch.sort(entropies[:, 1:].reshape(-1), descending=True).values  # (K,)
    big = float(candidates[0]) + 1.0 if len(candidates) else 1.0

    def theta(k: int) -> float:  # a threshold with exactly the top-k candidates above it (up to ties)
        if len(candidates) == 0:
            return big
        if k <= 0:
            return float(candidates[0])
        if k >= len(candidates):
            return float(candidates[-1]) - 1.0
        return 0.5 * (float(candidates[k - 1]) + float(candidates[k]))

    target_count = n / target_mean_patch_size
    fewest = _count_patches(entropies, theta(0), max_patch_length)
    if n / fewest < target_mean_patch_size * (1 - 1e-9):
        raise ValueError(
            f"target_mean_patch_size={target_mean_patch_size} is unreachable: the largest mean patch size is "
            f"{n / fewest:.4g} bytes ({b} rows of {t} bytes, max_patch_length={max_patch_length})"
        )
    # quantile: without splits, count(k) = B + k
    k_hi = min(max(round(target_count - b), 0), len(candidates))
    if max_patch_length is None:
        return theta(k_hi)
    # bisection: count(k) is non-decreasing in k (a split piece never needs fewer chunks); find the k closest
    lo, hi = 0, k_hi  # count(k_hi) >= B + k_hi ~ target
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_patches(entropies, theta(mid), max_patch_length) >= target_count:
            hi = mid
        else:
            lo = mid + 1
    best = min(
        (k for k in (lo - 1, lo) if 0 <= k <= len(candidates)),
        key=lambda k: abs(_count_patches(entropies, theta(k), max_patch_length) - target_count),
    )
    return theta(best)


class AdaptiveEntropyThreshold:
    """Keeps the boundary ratio (patch starts per byte) of the global rule near a target on a stream of batches.

    Each :meth:`step` patches a batch with the current threshold, observes its boundary ratio ``r``, smooths it
    with an EMA, and moves the threshold multiplicatively (a step on ``log θ``) in proportion to the relative error
    of the smoothed ratio::

        r̄ ← decay · r̄ + (1 − decay) · r          (r̄ = r on the first step)
        log θ ← log θ + gain · clamp(log(r̄ / target), ±max_error)

    Too many boundaries raise θ, too few lower it; in the long run (an integral controller) θ settles on the
    ``1 − target`` quantile of the stream's entropies. :meth:`observe` takes a ratio measured elsewhere (e.g. a
    logged ``patch/mean_size``). The state is plain values (:meth:`state_dict`).

    The loop gain is ``gain · θ · density(θ) / target``: with the defaults it is below 1 for a trained byte LM's
    entropies (spread over several nats), so θ neither lags nor rings. Entropies squeezed into a sliver (an
    untrained model: all near log 260) make it ring; use :func:`calibrate_threshold` there.

    The per-batch ratio still varies with the text of each batch (code vs prose) as it would at any fixed θ; what
    the controller holds is the ratio over a few batches and the stream's mean.

    Args:
        target_boundary_ratio: wanted patches per byte (0.1 = mean patch size 10).
        initial_threshold: θ before the first batch, nats (> 0).
        gain: step size on ``log θ`` per unit of ``log(r̄ / target)``.
        ema_decay: smoothing of the observed ratio, in [0, 1) (0 = none).
        max_error: clamp on ``|log(r̄ / target)|`` per step (an empty or all-boundary batch).
        min_threshold: lower clamp on θ (> 0).
        max_threshold: upper clamp on θ.
        max_patch_length: applied to the masks (its extra starts count in the ratio), or None.
    """

    def __init__(
        self,
        target_boundary_ratio: float = 0.1,
        initial_threshold: float = 2.0,
        gain: float = 0.2,
        ema_decay: float = 0.3,
        max_error: float = 2.0,
        min_threshold: float = 1e-3,
        max_threshold: float = 50.0,
        max_patch_length: int | None = None,
    ) -> None:
        if not 0.0 < target_boundary_ratio <= 1.0:
            raise ValueError(f"target_boundary_ratio={target_boundary_ratio} must be in (0, 1]")
        if not 0.0 < min_threshold <= initial_threshold <= max_threshold:
            raise ValueError(
                f"need 0 < min_threshold={min_threshold} <= initial_threshold={initial_threshold} "
                f"<= max_threshold={max_threshold}"
            )
        if not gain > 0.0:
            raise ValueError(f"gain={gain} must be > 0")
        if not max_error > 0.0:
            raise ValueError(f"max_error={max_error} must be > 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        if max_patch_length is not None and max_patch_length < 1:
            raise ValueError(f"max_patch_length={max_patch_length} must be >= 1 or None")
        self.target_boundary_ratio = target_boundary_ratio
        self.gain, self.ema_decay = gain, ema_decay
        self.min_threshold, self.max_threshold = min_threshold, max_threshold
        self.max_patch_length = max_patch_length
        self.max_error = max_error
        self.threshold = float(initial_threshold)
        self.ema_ratio: float | None = None
        self.last_ratio: float | None = None
        self.steps = 0

    def observe(self, ratio: float) -> float:
        """Update θ from one batch's observed boundary ratio; returns the new θ."""
        self.last_ratio = float(ratio)
        d = self.ema_decay
        self.ema_ratio = self.last_ratio if self.ema_ratio is None else d * self.ema_ratio + (1 - d) * self.last_ratio
        # log of the relative error: symmetric in over/undershoot, clamped so an empty or all-boundary batch moves
        # log θ by at most gain * max_error
        error = math.log(max(self.ema_ratio, 1e-6) / self.target_boundary_ratio)
        error = min(max(error, -self.max_error), self.max_error)
        log_theta = math.log(self.threshold) + self.gain * error
        self.threshold = min(max(math.exp(log_theta), self.min_threshold), self.max_threshold)
        self.steps += 1
        return self.threshold

    def start_mask(self, entropies: torch.Tensor) -> torch.Tensor:
        """entropies: (B, T) nats -> (B, T) bool start mask at the current θ (no update)."""
        mask = global_start_mask(entropies, self.threshold)
        if self.max_patch_length is not None:
            mask = split_long_patches(mask, self.max_patch_length)
        return mask

    def step(self, entropies: torch.Tensor) -> torch.Tensor:
        """Patch one batch with the current θ, then update θ from its boundary ratio.

        Args:
            entropies: (B, T) float, nats.

        Returns:
            (B, T) bool start mask the batch was patched with.
        """
        _check_2d("entropies", entropies)
        mask = self.start_mask(entropies)
        self.observe(float(mask.float().mean()))
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "ema_ratio": self.ema_ratio, "last_ratio": self.last_ratio,
            "steps": self.steps, "target_boundary_ratio": self.target_boundary_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.ema_ratio = state.get("ema_ratio")
        self.last_ratio = state.get("last_ratio")
        self.steps = int(state.get("steps", 0))
        self.target_boundary_ratio = float(state.get("target_boundary_ratio", self.target_boundary_ratio))
