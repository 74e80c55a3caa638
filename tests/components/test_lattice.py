import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from neat_lightning.components.lattice import (
    LatticeConfig,
    LatticeRule,
    activity_from_state,
    lattice_step,
    run_lattice,
    spectral_emergence,
)
from neat_lightning.components.lattice_stencils import sobel_laplacian_kernels
from neat_lightning.components.plasticity import neighbour_offsets

SIZE = (4, 3, 5)


def cfg(**kw):
    base = dict(depth=4, height=3, width=5, channels=3, hidden=8, steps=4, fire_rate=1.0)
    return LatticeConfig(**{**base, **kw})


def dense_message(state, connections):
    """Reference: the 26-direction shifted sum in (B, C, D, H, W) layout."""
    D, H, W = state.shape[-3:]
    padded = F.pad(state, (1, 1, 1, 1, 1, 1))
    out = torch.zeros_like(state)
    for k, (a, b, c) in enumerate(neighbour_offsets().tolist()):
        out += connections[..., k] * padded[:, :, 1 + a : 1 + a + D, 1 + b : 1 + b + H, 1 + c : 1 + c + W]
    return out / 26


def to_cells(x):
    return rearrange(x, "b c d h w -> (d h w) b c")


def test_connection_operator_matches_dense_shifts_and_its_gradient():
    torch.manual_seed(0)
    rule = LatticeRule(cfg())
    w = torch.rand(*SIZE, 26)
    x = torch.randn(2, 3, *SIZE, requires_grad=True)
    op = rule.connection_operator(w)
    got = op(rearrange(to_cells(x), "n b c -> n (b c)"))
    want = rearrange(to_cells(dense_message(x, w)), "n b c -> n (b c)")
    assert torch.allclose(got, want, atol=1e-6)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad((got * g).sum(), x)
    (gx_ref,) = torch.autograd.grad((want * g).sum(), x)
    assert torch.allclose(gx, gx_ref, atol=1e-5)


def test_sobel_stencils_match_conv3d_and_depthwise_shapes():
    torch.manual_seed(0)
    rule = LatticeRule(cfg())
    x = torch.randn(2, 3, *SIZE)
    got = rule.kernels(to_cells(x))  # (N, B, 4C) ordered (j c)
    ref = F.conv3d(x, sobel_laplacian_kernels().repeat(3, 1, 1, 1)[:, None], padding=1, groups=3)  # (B, (c j), ...)
    ref = rearrange(ref, "b (c j) d h w -> (d h w) b (j c)", j=4)
    assert torch.allclose(got, ref, atol=1e-5)
    dw = LatticeRule(cfg(perception="depthwise"))
    assert dw.kernels(to_cells(x)).shape == (60, 2, 12)


def test_step_is_pure_and_face_is_imposed():
    torch.manual_seed(0)
    rule = LatticeRule(cfg())
    w = torch.rand(*SIZE, 26)
    state = torch.randn(60, 2, 3)
    face = torch.randn(15, 2, 3)
    a = lattice_step(rule, state, w, face)
    b = lattice_step(rule, state.clone(), w.clone(), face)
    assert torch.equal(a, b)
    assert torch.equal(a[:15], face)
    assert not torch.equal(a[15:], state[15:])


def test_fire_mask_freezes_non_firing_cells_and_alive_mask_kills():
    torch.manual_seed(0)
    rule = LatticeRule(cfg(fire_rate=0.5))
    state = torch.randn(60, 2, 3)
    fire = torch.zeros(60, 2, 1)
    fire[30:] = 1
    out = lattice_step(rule, state, torch.rand(*SIZE, 26), None, fire)
    assert torch.equal(out[:30], state[:30]) and not torch.equal(out[30:], state[30:])
    dead = LatticeRule(cfg(alive_threshold=100.0))
    assert (lattice_step(dead, state, torch.rand(*SIZE, 26)) == 0).all()


def test_information_crosses_the_lattice_only_with_enough_steps():
    torch.manual_seed(0)
    rule = LatticeRule(cfg())
    w = torch.rand(*SIZE, 26)
    face = torch.randn(15, 1, 3, requires_grad=True)
    for steps, reaches in [(2, False), (3, True)]:  # depth 4: the output face is 3 hops away
        state, act = run_lattice(rule, face, w, steps, stochastic=False)
        assert act.shape == (steps, *SIZE)
        out = state[-15:].sum()
        (g,) = torch.autograd.grad(out, face, allow_unused=True)
        assert (g is not None and g.abs().sum() > 0) == reaches


def test_run_lattice_stochastic_is_seeded():
    rule = LatticeRule(cfg(fire_rate=0.5))
    face = torch.randn(15, 2, 3)
    w = torch.rand(*SIZE, 26)
    a, _ = run_lattice(rule, face, w, 4, True, generator=torch.Generator().manual_seed(3))
    b, _ = run_lattice(rule, face, w, 4, True, generator=torch.Generator().manual_seed(3))
    c, _ = run_lattice(rule, face, w, 4, True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rule_rejects_wrong_connection_shape():
    with pytest.raises(ValueError, match=r"connections shape \(4, 3, 4, 26\) does not match lattice size \(4, 3, 5\)"):
        LatticeRule(cfg()).connection_operator(torch.rand(4, 3, 4, 26))


@pytest.mark.parametrize("kw, match", [({"fire_rate": 0.0}, "fire_rate=0.0"), ({"depth": 0}, "depth=0"),
                                       ({"perception": "fft"}, "perception='fft'")])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_activity_is_in_unit_interval():
    a = activity_from_state(torch.randn(10, 2, 3) * 100)
    assert a.shape == (10, 2) and (a >= 0).all() and (a < 1 + 1e-6).all()


def test_spectral_emergence_plane_wave_vs_noise():
    z = torch.arange(8).float()
    wave = torch.cos(2 * torch.pi * z / 4)[:, None, None].expand(8, 8, 8)
    ent_wave, lam = spectral_emergence(wave)
    ent_noise, _ = spectral_emergence(torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert lam == pytest.approx(4.0)
    assert ent_wave < 0.2 < 0.8 < ent_noise <= 1.0
    assert spectral_emergence(torch.ones(4, 4, 4)) == (0.0, 0.0)


def test_transport_init_carries_the_input_face_to_the_output_face():
    """With the copy rule the question reaches depth D - 1 intact (and its gradient flows back); the default init
    lets the update's biases wash it out."""
    torch.manual_seed(0)
    face = torch.randn(15, 2, 3)  # (H·W, B, C)
    w = torch.rand(*SIZE, 26)
    rule = LatticeRule(cfg(depth_taps=True, rule_init="transport", hidden=8, steps=3))
    state, _ = run_lattice(rule, face, w, 3, stochastic=False)
    assert torch.allclose(state[-15:], face, atol=1e-5)  # fire_rate 1: one plane per step, exact
    assert torch.allclose(lattice_step(rule, state, w, face), state, atol=1e-5)  # a fixed point once through
    stochastic = LatticeRule(cfg(depth_taps=True, rule_init="transport", hidden=8, fire_rate=0.5))
    late, _ = run_lattice(stochastic, face.requires_grad_(), w, 40, True, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(late[-15:].sum(), face)
    assert torch.allclose(late[-15:], face, atol=1e-3) and g.abs().min() > 0.5


def test_depth_taps_are_the_depth_neighbours():
    torch.manual_seed(0)
    rule = LatticeRule(cfg(depth_taps=True))
    x = torch.randn(2, 3, *SIZE)
    p = rule.perceive(to_cells(x), rule.connection_operator(torch.rand(*SIZE, 26)))
    assert p.shape == (60, 2, 8 * 3)
    prev, nxt = F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], F.pad(x, (0, 0, 0, 0, 0, 1))[:, :, 1:]
    assert torch.equal(p[..., 18:21], to_cells(prev)) and torch.equal(p[..., 21:24], to_cells(nxt))


@pytest.mark.parametrize("kw, match", [
    ({"rule_init": "transport"}, "rule_init='transport' needs depth_taps=True"),
    ({"rule_init": "transport", "depth_taps": True, "hidden": 5}, r"needs hidden=5 >= 2 \* channels = 6"),
    ({"rule_init": "zeros"}, "rule_init='zeros' must be"),
])
def test_transport_init_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)
