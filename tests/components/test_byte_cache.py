import math

import pytest
import torch

from neat_lightning.components.byte_cache import ESCAPES, bayes_mixture, cache_nats, cached_nats, context_counts

TEXT = b"the cat sat on the mat; the cat sat on the hat. "


def test_counts_are_what_came_before_each_byte():
    hits, seen, distinct = context_counts(b"abab", max_order=2)
    # order 1: before byte 2 ('a' after 'b'), context 'b' never seen; before byte 3 ('b' after 'a'), 'a' -> 'b' once
    assert hits[0].tolist() == [0, 0, 0, 1]
    assert seen[0].tolist() == [0, 0, 0, 1]
    assert distinct[0].tolist() == [0, 0, 0, 1]
    # order 2: context 'ab' before byte 2 is new; 'ba' before byte 3 is new
    assert seen[1].tolist() == [0, 0, 0, 0]
    upper = context_counts(b"abab", max_order=2, min_order=2)  # only the order-2 row
    assert all(torch.equal(u, c[1:]) for u, c in zip(upper, (hits, seen, distinct)))


def test_the_cache_is_a_distribution_over_the_next_byte():
    """Summed over all 256 candidates for byte t, the cached probabilities are 1 (a uniform model as the base): the
    code length is honest."""
    prefix = TEXT[:30]
    total = 0.0
    for b in range(256):
        data = prefix + bytes([b])
        base = torch.full((len(data),), math.log(256), dtype=torch.float64)
        total += math.exp(-float(cached_nats(base, context_counts(data, 4), escape=0.7)[-1]))
    assert total == pytest.approx(1.0, abs=1e-9)


def test_a_byte_is_scored_only_from_the_bytes_before_it():
    a, b = TEXT, TEXT[:20] + b"zzzzzzzzzzzzzzzzzzzzzzzzzzzz"
    base_a = torch.full((len(a),), 3.0, dtype=torch.float64)
    base_b = torch.full((len(b),), 3.0, dtype=torch.float64)
    na, nb = cached_nats(base_a, context_counts(a, 6)), cached_nats(base_b, context_counts(b, 6))
    assert torch.equal(na[:21], nb[:21])  # byte 20 differs; everything up to it was scored alike
    assert not torch.equal(na[21:], nb[21:len(a)])


def test_repeated_text_costs_less_the_second_time():
    data = TEXT * 3
    base = torch.full((len(data),), math.log(256), dtype=torch.float64)
    nats = cached_nats(base, context_counts(data, 6))
    first, third = nats[: len(TEXT)].sum(), nats[2 * len(TEXT) :].sum()
    assert third < 0.2 * first
    assert torch.equal(nats[0], base[0])  # nothing read yet: the model's own number


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="max_order=0"):
        context_counts(TEXT, 0)
    with pytest.raises(ValueError, match=r"min_order=4, max_order=3 must satisfy"):
        context_counts(TEXT, 3, 4)
    with pytest.raises(ValueError, match="escape=0"):
        cached_nats(torch.zeros(len(TEXT)), context_counts(TEXT, 2), escape=0)
    with pytest.raises(ValueError, match="different bytes"):
        cached_nats(torch.zeros(3), context_counts(TEXT, 2))


def test_the_mixture_costs_at_most_log_k_over_its_best_expert():
    data = TEXT * 4
    model = torch.linspace(2.0, 4.0, len(data), dtype=torch.float64)
    counts = context_counts(data, 6)
    experts = torch.stack([model] + [cached_nats(model, counts, e) for e in ESCAPES])
    mixed = bayes_mixture(experts)
    best = experts.sum(1).min()
    assert best <= mixed.sum() <= best + math.log(len(experts)) + 1e-9
    assert torch.allclose(cache_nats(model, counts), mixed)
    assert torch.equal(bayes_mixture(model[None]), model)  # one expert: itself
