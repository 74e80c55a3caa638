"""An online byte-context cache layered over a model's next-byte probabilities (prequential, as a compressor codes).

Reading a text once, left to right, the cache counts which byte followed each context of the last ``o`` bytes
(``o = 1 .. max_order``) *in the text read so far*. Its prediction of byte ``t`` chains Witten-Bell interpolation
from the model up through the orders (the model is the base distribution, the longest context the top):

    p_0(x) = p_model(x)
    p_o(x) = (c_o(x) + e · u_o · p_{o-1}(x)) / (n_o + e · u_o)        (p_o = p_{o-1} where the context is new)

with ``c_o(x)`` how often ``x`` followed this order-``o`` context before ``t``, ``n_o`` how often the context
occurred, ``u_o`` how many distinct bytes followed it, and ``e`` the escape weight. It is the cache language model
(Kuhn and De Mori 1990) in the form PPM compressors use (Witten-Bell escape; Cleary and Witten 1984), over a
neural base: the model knows the language, the cache the identifiers, numbers and phrases this particular text
repeats. Counts at ``t`` come only from bytes before ``t``, so ``-log2 p_top`` is an honest code length.

The counts depend on the text alone, so :func:`context_counts` runs once and :func:`cached_nats` applies them to
any model pass. How far to trust the counts against the model (the escape weight) is not tuned per text:
:func:`cache_nats` codes each byte with the Bayesian mixture of the model alone and the cache at several escape
weights, each expert weighted by the probability it gave the bytes before (a mixture costs at most ``log2 K``
bits over the best of its ``K`` experts in hindsight, over the whole text). Axis legend: ``k`` experts, ``o``
orders, ``n`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ESCAPES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # the escape weights cache_nats mixes


def context_counts(data: bytes, max_order: int, min_order: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache knew before each byte of ``data``, per context order ``min_order .. max_order``.

    Args:
        data: the text, read left to right.
        max_order: the longest context, in bytes.
        min_order: the shortest context, in bytes (``1 <= min_order <= max_order``).

    Returns:
        ``(hits, seen, distinct)``, each (o, n) float64 with ``o = max_order - min_order + 1``: for byte ``t`` and
        order ``r = min_order + i`` (row ``i``), how often byte ``t`` followed the ``r`` bytes before it earlier in
        the text, how often those bytes occurred (followed by anything), and how many distinct bytes followed them.
        Zero where ``t < r``.
    """
    if not 1 <= min_order <= max_order:
        raise ValueError(f"min_order={min_order}, max_order={max_order} must satisfy 1 <= min_order <= max_order")
    n = len(data)
    hits = torch.zeros(max_order - min_order + 1, n, dtype=torch.float64)
    seen = torch.zeros_like(hits)
    distinct = torch.zeros_like(hits)
    for row, order in enumerate(range(min_order, max_order + 1)):  # over orders; each one pass of dict lookups
        pair: dict[bytes, int] = {}
        ctx_total: dict[bytes, int] = {}
        ctx_distinct: dict[bytes, int] = {}
        h, s, d = [0] * n, [0] * n, [0] * n
        for t in range(order, n):
            ctx = data[t - order : t]
            key = data[t - order : t + 1]
            c = pair.get(key, 0)
            h[t], s[t], d[t] = c, ctx_total.get(ctx, 0), ctx_distinct.get(ctx, 0)
            if c == 0:
                ctx_distinct[ctx] = d[t] + 1
            pair[key] = c + 1
            ctx_total[ctx] = s[t] + 1
        hits[row], seen[row], distinct[row] = (torch.tensor(v, dtype=torch.float64) for v in (h, s, d))
    return hits, seen, distinct


def cached_nats(
    model_nats: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    escape: float = 1.0,
) -> torch.Tensor:
    """Nats of each byte under the cache chained over the model (see the module docstring).

    Args:
        model_nats: (n,) the model's nats for each byte, ``-ln p_model(x_t)``.
        counts: :func:`context_counts` of the same bytes.
        escape: the escape weight ``e`` (> 0): larger trusts the model more against the counts.

    Returns:
        (n,) float64 nats, ``-ln p_top(x_t)``.
    """
    if not escape > 0:
        raise ValueError(f"escape={escape} must be > 0")
    hits, seen, distinct = counts
    if model_nats.shape != hits.shape[1:]:
        raise ValueError(f"model_nats {tuple(model_nats.shape)} and counts {tuple(hits.shape)} cover different bytes")
    p = torch.exp(-model_nats.double())
    for c, total, u in zip(hits, seen, distinct):  # from order 1 up: each order interpolates over the one below
        w = escape * u
        p = torch.where(total > 0, (c + w * p) / (total + w).clamp_min(1e-300), p)
    return -torch.log(p)


def bayes_mixture(expert_nats: torch.Tensor) -> torch.Tensor:
    """Nats of each byte under the Bayesian mixture of ``k`` sequential predictors (uniform prior): expert ``i``'s
    weight at byte ``t`` is proportional to the probability it gave bytes ``0 .. t-1``.

    expert_nats: (k, n) each expert's nats per byte -> (n,) float64.
    """
    nats = expert_nats.double()
    log_w = torch.cat([torch.zeros_like(nats[:, :1]), -nats.cumsum(1)[:, :-1]], dim=1)  # (k, n) log-likelihood so far
    log_w = log_w - log_w.logsumexp(0)
    return -(log_w - nats).logsumexp(0)


def cache_nats(
    model_nats: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    escapes: Sequence[float] = ESCAPES,
) -> torch.Tensor:
    """Nats of each byte under the Bayesian mixture of the model alone and the cache over it at each escape weight.

    Args:
        model_nats: (n,) the model's nats per byte.
        counts: :func:`context_counts` of the same bytes.
        escapes: the escape weights of the cache experts.

    Returns:
        (n,) float64 nats.
    """
    experts = [model_nats.double()] + [cached_nats(model_nats, counts, e) for e in escapes]
    return bayes_mixture(torch.stack(experts))
