import pytest
import torch

from neat_lightning.components.transformer import ByteTransformer, TransformerConfig, attention_mask


def model(**kw) -> ByteTransformer:
    torch.manual_seed(0)
    return ByteTransformer(TransformerConfig(dim=32, n_layers=2, heads=4, block_size=64, **kw)).eval()


@pytest.mark.parametrize("window", [None, 5])
def test_causal_future_does_not_leak(window):
    m = model(window=window)
    ids = torch.randint(4, 260, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(4, 260, (2, 8))
    a, b = m(ids), m(changed)
    assert a.shape == (2, 20, 260)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_sliding_window_ignores_bytes_beyond_the_window():
    # with one layer, position t sees exactly ids[t - window + 1 .. t]
    torch.manual_seed(0)
    m = ByteTransformer(TransformerConfig(dim=32, n_layers=1, heads=4, block_size=64, window=4)).eval()
    ids = torch.randint(4, 260, (1, 16))
    changed = ids.clone()
    changed[:, 0:3] = torch.randint(4, 260, (1, 3))
    a, b = m(ids), m(changed)
    torch.testing.assert_close(a[:, 6:], b[:, 6:])  # positions >= 6 cannot see 0..2
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_attention_mask_rule():
    mask = attention_mask(torch.arange(4), torch.arange(4), window=2)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("window", [None, 6])
def test_kv_cache_matches_full_forward(window):
    m = model(window=window)
    ids = torch.randint(4, 260, (1, 24))
    full = m(ids)
    caches = m.make_caches(1, 32)
    step_logits = [m(ids[:, :10], 0, caches)]
    for t in range(10, 24):
        step_logits.append(m(ids[:, t : t + 1], t, caches))
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_weight_tying_and_param_count():
    tied, untied = model(tie_weights=True), model(tie_weights=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 260 * 32


@pytest.mark.parametrize(
    "kw, match",
    [({"dim": 30, "heads": 4}, "dim=30 must be divisible by heads=4"), ({"dim": 12, "heads": 4}, "must be even"),
     ({"window": 0}, "window=0"), ({"n_layers": 0}, "n_layers=0"), ({"dropout": 1.0}, "dropout=1.0")],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kw)
