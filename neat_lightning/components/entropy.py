"""Next-byte entropies of a byte language model: what entropy patching thresholds.

``H_j`` is the entropy (nats) of the model's prediction of byte ``j`` from the bytes before it; byte 0 of a row
(and, optionally, every byte after a newline) is predicted from a BOS prefix alone. Long rows are cut into windows
of the model's context, all at once (:func:`context_windows`), and run in batches of windows, never byte by byte.
Reference: Pagnoni et al. 2024, "Byte Latent Transformer" (arXiv 2412.09871), section 2.3, and
``facebookresearch/blt`` ``bytelatent/data/patcher.py`` (``calculate_entropies``).

Shapes: ``B`` batch, ``T`` bytes, ``V`` vocab, ``W`` context windows, ``L`` window length, ``N`` bytes of a flattened
batch. Plain ``torch``, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from neat_lightning.codec import BOS_ID, OFFSET, PAD_ID

EntropyModel = Callable[[torch.Tensor], torch.Tensor]  # (B, T) int64 ids -> (B, T, V) logits

NEWLINE_ID = ord("\n") + OFFSET


def check_2d(name: str, x: torch.Tensor) -> None:
    """Raise unless ``x`` is a (B, T) tensor, naming ``name`` and the shape received."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, T) tensor, got shape {shape}")


def context_size(model: Any) -> int | None:
    """The context length a model was trained on (``model.config.block_size``), or None when unknown."""
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None)



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
    after_newline[:, :1] = True  # a row's first byte starts a segment
    return after_newline


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
    check_2d("ids", ids)
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

