"""Next-id sampling and the eval-mode context shared by every generation loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import pack, unpack
from torch import nn


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one id per row of ``logits``.

    Args:
        logits: (..., V) float, unnormalised scores; any leading shape (``(V,)`` for one row, ``(B, V)`` a batch).
        temperature: softmax temperature; ``<= 0`` picks the argmax (greedy, deterministic).
        top_k: keep only the ``top_k`` highest scores of each row before sampling (None: all).
        generator: the random source of ``torch.multinomial`` (None: the global one).

    Returns:
        (...) int64 ids, the leading shape of ``logits``.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    rows, shape = pack([logits.float() / temperature], "* v")  # (N, V)
    if top_k is not None and top_k < rows.shape[-1]:
        kth = torch.topk(rows, top_k, dim=-1).values[:, -1:]  # (N, 1)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    ids = torch.multinomial(F.softmax(rows, dim=-1), 1, generator=generator)[:, 0]  # (N,)
    return unpack(ids, shape, "*")[0]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore its previous mode afterwards, even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
