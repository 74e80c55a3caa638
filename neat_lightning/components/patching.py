"""Entropy patching (Byte Latent Transformer): bytes -> variable-length patches.

A small byte LM predicts each next byte; where its prediction is uncertain (high entropy) a new patch starts, so
predictable runs of bytes share one patch and the big latent model spends its compute where the text is hard.
Reference: Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than Tokens" (arXiv 2412.09871),
section 2.3 and ``facebookresearch/blt`` ``bytelatent/data/patcher.py``; space patching from Slagle 2024,
"SpaceByte" (arXiv 2404.14408).

The pipeline is a chain of small tensor functions; shapes use ``B`` batch, ``T`` bytes, ``P`` patches::

    ids (B, T) --next_byte_entropies (components/entropy.py)--> entropies (B, T) nats
        --global_start_mask / monotonic_start_mask / combined_start_mask--> start mask (B, T) bool
        --split_long_patches (max_patch_length)--> start mask (B, T) bool
        --patch_start_ids_from_start_mask--> start ids (B, P), padded with T
        --patch_lengths_from_start_ids--> lengths (B, P), padded with 0
        --patch_ids_from_lengths--> patch id of every byte (B, T)

Conventions (as in the reference): ``H_j`` is the entropy of the model's prediction of byte ``j`` from the bytes
before it (byte 0 is predicted from a BOS prefix), and ``H_j`` decides whether byte ``j`` starts a patch (strict
``>``). The first byte of each row always starts a patch. :class:`PatcherConfig` + :class:`Patcher` wrap the chain;
:mod:`neat_lightning.components.patch_threshold` calibrates the global threshold to a target mean patch size and
controls it on a stream. Plain ``torch``, no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from neat_lightning.choices import check_choice
from neat_lightning.codec import BOS_ID, OFFSET
from neat_lightning.components.entropy import EntropyModel, check_2d, context_size, next_byte_entropies

Mode = Literal["entropy", "static", "space"]
Rule = Literal["global", "monotonic", "both"]
Combine = Literal["or", "and"]

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) tensor -> (1, T) int64 positions 0..T-1 on its device."""
    return torch.arange(mask.shape[1], device=mask.device)[None]


def force_first_start(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, T) bool -> (B, T) bool with the first byte of every row a patch start."""
    first = torch.ones_like(mask[:, :1])
    return torch.cat([first, mask[:, 1:]], dim=1)


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
    check_choice("combine", combine, Combine)
    return a | b if combine == "or" else a & b


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
    check_2d("start_mask", start_mask)
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
    # BLT's default for its 100M entropy model (PatcherArgs.threshold). The one default threshold of the package:
    # BLTConfig holds a PatcherConfig, and with its adaptive controller this is only the starting θ, which the
    # controller moves to the target boundary ratio within a few batches (configs write their θ explicitly).
    threshold: float = 1.335442066192627
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
        for name, allowed in (("mode", Mode), ("rule", Rule), ("combine", Combine)):
            check_choice(f"PatcherConfig.{name}", getattr(self, name), allowed)
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
        check_2d("ids", ids)
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
