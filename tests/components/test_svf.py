"""Transformer² SVF: exact z = 1 bypass, decomposition, per-row expert mixtures, injection, dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neat_lightning.components.svf import SVFLinear, TaskDispatcher, inject_svf, svf_layers, svf_mixture


def make(rank=None, method="full", n_tasks=3, shape=(12, 20)) -> tuple[nn.Linear, SVFLinear]:
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0], bias=True)
    svf = SVFLinear.from_linear(base, n_tasks, rank, method)
    svf.decompose()
    svf.svf_active = True
    return base, svf


@pytest.mark.parametrize("rank, method", [(None, "full"), (5, "full"), (5, "randomized")])
def test_z_equal_one_reproduces_the_base_layer_exactly(rank, method):
    base, svf = make(rank, method)
    x = torch.randn(4, 7, 20)
    svf.mix = torch.eye(3)[[0, 1, 2, 1]]  # every row on some expert, all z = 1
    assert (svf(x) - base(x)).abs().max() <= 1e-5
    assert torch.equal(svf(x), base(x))
    svf.mix = None
    assert torch.equal(svf(x), base(x))


def test_decomposition_reconstructs_the_weight_and_z_scales_singular_values():
    base, svf = make()
    torch.testing.assert_close(svf.U @ torch.diag(svf.S) @ svf.Vh, base.weight.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        svf.z[1] = torch.linspace(0.5, 1.5, svf.rank)
    expected = svf.U @ torch.diag(svf.S * svf.z[1]) @ svf.Vh  # W' = U diag(σ ⊙ z) Vᵀ
    torch.testing.assert_close(svf.svf_weight(1), expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, 20)
    svf.mix = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # row 0: expert 1, row 1: the base model
    y = svf(x)
    torch.testing.assert_close(y[0], x[0] @ expected.T + base.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[1], base(x[1]))


def test_randomized_svd_finds_the_top_directions():
    _, full = make(rank=4, method="full", shape=(40, 30))
    _, rand = make(rank=4, method="randomized", shape=(40, 30))
    torch.testing.assert_close(rand.S, full.S, rtol=1e-3, atol=1e-4)


def test_a_mixture_interpolates_the_z_vectors():
    _, svf = make()
    with torch.no_grad():
        svf.z.uniform_(0.0, 2.0)
    x = torch.randn(1, 3, 20)
    svf.mix = torch.tensor([[0.25, 0.75, 0.0]])
    y = svf(x)
    z = 0.25 * svf.z[0] + 0.75 * svf.z[1]
    w = svf.weight + svf.U @ torch.diag(svf.S * (z - 1)) @ svf.Vh
    torch.testing.assert_close(y[0], x[0] @ w.T + svf.bias, rtol=1e-5, atol=1e-5)


def test_only_z_receives_gradients_through_the_expert_path():
    base, svf = make()
    svf.mix = torch.eye(3)[[2]]
    svf(torch.randn(1, 4, 20)).sum().backward()
    assert svf.z.grad[2].abs().sum() > 0 and svf.z.grad[:2].abs().sum() == 0


def test_inject_shares_parameters_and_matches_names():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    before = net[2][0].weight
    names = inject_svf(net, r"2\.\d", n_tasks=2, rank=3)
    assert names == ["2.0", "2.1"]
    assert isinstance(net[2][0], SVFLinear) and net[2][0].weight is before and type(net[0]) is nn.Linear
    assert [m.rank for m in svf_layers(net)] == [3, 2]
    layers = svf_layers(net)
    with svf_mixture(layers, torch.ones(1, 2)):
        assert all(m.mix is not None for m in layers)
    assert all(m.mix is None for m in layers)
    with pytest.raises(ValueError, match=r"svf targets='nothing' match no nn.Linear"):
        inject_svf(net, "nothing", 2)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"rank=9 must be in \[1, min\(in, out\) = 4\]"):
        SVFLinear(4, 8, 2, rank=9)
    with pytest.raises(ValueError, match=r"method='randomized' needs a rank"):
        SVFLinear(4, 8, 2, method="randomized")
    _, svf = make()
    svf.mix = torch.eye(3)[[0, 1]]
    with pytest.raises(ValueError, match=r"input batch \(3, 20\) does not match mix batch \(2, 3\)"):
        svf(torch.randn(3, 20))
    fresh = SVFLinear(4, 4, 2)
    fresh.svf_active, fresh.mix = True, torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="not decomposed"):
        fresh(torch.randn(1, 4))


def test_dispatcher_pools_the_prompt_prefix_and_picks_or_mixes():
    torch.manual_seed(0)
    d = TaskDispatcher(8, 4, "classify", prefix=3)
    nn.init.normal_(d.head.weight)
    hidden = torch.randn(2, 6, 8)
    valid = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    logits = d(hidden, valid)
    changed = hidden.clone()
    changed[0, 3:] = 100.0  # after the prefix of row 0
    changed[1, 4:] = 100.0  # after the prefix of row 1 (its first valid position is 1)
    torch.testing.assert_close(d(changed, valid), logits)
    mix = d.mix(logits)
    assert torch.equal(mix.sum(-1), torch.ones(2)) and set(mix.flatten().tolist()) <= {0.0, 1.0}
    d.mode = "mixture"
    torch.testing.assert_close(d.mix(logits), logits.softmax(-1))
    with pytest.raises(ValueError, match=r"dispatch mode='vote' must be 'classify' or 'mixture'"):
        TaskDispatcher(8, 4, "vote")
