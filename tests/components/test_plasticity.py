import pytest
import torch

from neat_lightning.components.plasticity import (
    N_NEIGHBOURS,
    PROFILES,
    PlasticityConfig,
    PlasticityProfile,
    PlasticityState,
    bcm_delta,
    competitive_update,
    gather_neighbours,
    magnitude_prune_mask,
    naive_plasticity_update,
    neighbour_offsets,
    plasticity_update,
    profile_by_name,
    stdp_delta,
)


def test_offsets_are_the_26_unit_neighbours():
    off = neighbour_offsets()
    assert off.shape == (26, 3)
    assert len({tuple(o) for o in off.tolist()}) == 26
    assert (off.abs().max(1).values == 1).all()


@pytest.mark.parametrize("size", [(3, 4, 5), (1, 1, 2)])
def test_gather_neighbours_matches_indexing(size):
    field = torch.randn(size)
    got = gather_neighbours(field)
    D, H, W = size
    for k, (a, b, c) in enumerate(neighbour_offsets().tolist()):
        for d, h, w in [(0, 0, 0), (D - 1, H - 1, W - 1), (D // 2, H // 2, W // 2)]:
            inside = 0 <= d + a < D and 0 <= h + b < H and 0 <= w + c < W
            want = field[d + a, h + b, w + c] if inside else 0.0
            assert float(got[d, h, w, k]) == pytest.approx(float(want))


def test_gather_keeps_leading_dims():
    assert gather_neighbours(torch.zeros(2, 3, 4, 4, 4)).shape == (2, 3, 4, 4, 4, 26)


def test_profiles_thresholds_rise_and_freeze_is_off():
    names = ["discovery", "learning", "consolidation", "freeze"]
    thresholds = [PROFILES[n].activity_threshold for n in names]
    assert thresholds[0] == pytest.approx(0.01) and thresholds[-1] == pytest.approx(0.1)
    assert thresholds == sorted(thresholds)
    f = PROFILES["freeze"]
    assert f.stdp == f.bcm == f.competitive == 0.0
    with pytest.raises(ValueError, match="plasticity profile 'sleepy' is unknown"):
        profile_by_name("sleepy")


def test_stdp_pre_before_post_potentiates_and_reverse_depresses():
    # cell A at (0,0,0) and B at (0,0,1); connection B <- A has direction offset (0,0,-1)
    k_from_a = [tuple(o) for o in neighbour_offsets().tolist()].index((0, 0, -1))
    spikes = torch.zeros(2, 1, 1, 2)
    spikes[0, 0, 0, 0] = 1  # A fires first
    spikes[1, 0, 0, 1] = 1  # then B
    delta, _ = stdp_delta(spikes, torch.zeros(1, 1, 2), a_plus=1.0, a_minus=1.0, decay=0.5)
    assert delta[0, 0, 1, k_from_a] > 0  # A -> B strengthened
    k_from_b = [tuple(o) for o in neighbour_offsets().tolist()].index((0, 0, 1))
    assert delta[0, 0, 0, k_from_b] < 0  # B -> A weakened


def test_bcm_sign_follows_threshold_and_threshold_tracks_y_squared():
    pre = torch.ones(1, 1, 2, 26)
    post = torch.tensor([[[0.2, 0.8]]])
    theta = torch.full((1, 1, 2), 0.5)
    delta, new_theta = bcm_delta(pre, post, theta, rate=1.0, tau=2.0)
    assert (delta[0, 0, 0] < 0).all() and (delta[0, 0, 1] > 0).all()
    assert torch.allclose(new_theta, theta + (post**2 - theta) / 2)


def test_competitive_keeps_norm_and_boosts_winners():
    w = torch.rand(2, 2, 2, 26) + 0.1
    pre = torch.rand(2, 2, 2, 26)
    new = competitive_update(w, pre, rate=0.1, top_k=5)
    assert torch.allclose(new.sum(-1), w.sum(-1), atol=1e-5)
    winners = (w * pre).topk(5, dim=-1).indices
    ratio = new / w
    assert (ratio.gather(-1, winners).min(-1).values > ratio.max(-1).values - 1e-6).all()


def test_combined_update_matches_naive_loops():
    torch.manual_seed(0)
    size = (3, 3, 2)
    w = torch.rand(*size, 26) * 2
    act = torch.rand(3, *size) * 0.3
    state = PlasticityState(torch.rand(size), torch.rand(size) * 0.1)
    profile = PlasticityProfile("mix", stdp=1.0, bcm=0.7, competitive=0.5, activity_threshold=0.1)
    cfg = PlasticityConfig(competitive_rate=0.1, top_k=4)
    fast_w, fast_s = plasticity_update(w, act, state, profile, cfg)
    slow_w, slow_s = naive_plasticity_update(w, act, state, profile, cfg)
    assert torch.allclose(fast_w, slow_w, atol=1e-5)
    assert torch.allclose(fast_s.trace, slow_s.trace) and torch.allclose(fast_s.theta, slow_s.theta)
    assert not torch.allclose(fast_w, w)  # the rules did something


def test_update_clamps_keeps_pruned_zero_and_freeze_is_identity():
    torch.manual_seed(1)
    w = torch.rand(2, 3, 3, 26) * 2
    mask = torch.rand(2, 3, 3, 26) > 0.5
    w = w * mask
    act = torch.rand(4, 2, 3, 3)
    cfg = PlasticityConfig(a_plus=5.0, bcm_rate=5.0, w_max=1.5)
    state = PlasticityState.zeros((2, 3, 3))
    new, _ = plasticity_update(w, act, state, PROFILES["discovery"], cfg, mask)
    assert new.max() <= 1.5 and new.min() >= 0.0
    assert (new[~mask] == 0).all()
    frozen, _ = plasticity_update(w, act, state, PROFILES["freeze"], PlasticityConfig(w_max=2.0), mask)
    assert torch.equal(frozen, w)


def test_update_rejects_mismatched_activity():
    with pytest.raises(ValueError, match=r"activity shape \(2, 3, 3, 3\) must be \(T, D, H, W\)"):
        plasticity_update(torch.zeros(2, 2, 2, 26), torch.zeros(2, 3, 3, 3), PlasticityState.zeros((2, 2, 2)),
                          PROFILES["learning"], PlasticityConfig())


@pytest.mark.parametrize("bad, match", [({"top_k": 0}, "top_k=0"), ({"w_min": 2.0}, "w_min=2.0 must be < w_max"),
                                        ({"trace_decay": 1.0}, "trace_decay=1.0"), ({"a_plus": -1.0}, "a_plus=-1.0")])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        PlasticityConfig(**bad)


def test_magnitude_pruning_reaches_sparsity_only_shrinks_and_is_deterministic():
    w = torch.rand(4, 4, 4, N_NEIGHBOURS)
    mask = torch.ones_like(w, dtype=torch.bool)
    m20 = magnitude_prune_mask(w, mask, 0.2)
    assert (~m20).float().mean() == pytest.approx(0.2, abs=1e-3)
    assert w[~m20].max() <= w[m20].min()
    m10 = magnitude_prune_mask(w, m20, 0.1)
    assert torch.equal(m10, m20)  # never regrows
    m70 = magnitude_prune_mask(w, m20, 0.7)
    assert not (m70 & ~m20).any()
    assert torch.equal(m70, magnitude_prune_mask(w, m20, 0.7))
    with pytest.raises(ValueError, match="sparsity=1.0 must be in"):
        magnitude_prune_mask(w, mask, 1.0)


def test_config_names_a_known_initial_profile():
    assert PlasticityConfig().profile == "discovery" and PlasticityConfig().enabled
    with pytest.raises(ValueError, match="plasticity profile 'nap' is unknown; known profiles"):
        PlasticityConfig(profile="nap")


# -- balanced profile, per-stage thresholds, emergence feedback ------------------------------------------------------


def test_balanced_profile_and_any_threshold_is_expressible():
    from neat_lightning.components.plasticity import with_threshold

    b = profile_by_name("balanced")
    assert (b.stdp, b.bcm, b.competitive, b.activity_threshold) == (0.5, 0.5, 0.5, 0.02)
    for t in (0.01, 0.02, 0.03, 0.05, 0.1):
        p = with_threshold(PROFILES["learning"], t)
        assert p.activity_threshold == t and p.bcm == PROFILES["learning"].bcm
    assert with_threshold(b, None) is b
    with pytest.raises(ValueError, match=r"activity_threshold=1.0 must be in \[0, 1\)"):
        with_threshold(b, 1.0)
    assert PlasticityConfig(profile="balanced").profile == "balanced"


def test_local_structure_is_high_for_a_plane_wave_low_for_noise_zero_when_flat():
    from neat_lightning.components.plasticity import local_structure

    x = torch.arange(16.0)
    wave = torch.cos(x * torch.pi / 2)[None, None, :].expand(2, 8, 16)  # period 4 along w
    torch.manual_seed(0)
    noise = torch.rand(2, 8, 16)
    s_wave, s_noise = local_structure(wave, 4), local_structure(noise, 4)
    assert s_wave.shape == (2, 8, 16) and float(s_wave.min()) > 0.6
    assert float(s_noise.mean()) < 0.35
    assert float(local_structure(torch.full((2, 8, 16), 0.3), 4).abs().max()) == 0.0
    half = torch.cat([wave[:, :, :8], noise[:, :, 8:]], dim=-1)  # structure on the left half only
    s = local_structure(half, 4)
    assert float(s[:, :, :8].mean()) > float(s[:, :, 8:].mean()) + 0.3
    assert local_structure(torch.rand(1, 9, 9), 4).shape == (1, 9, 9)  # a side not a multiple of the window
    assert float(local_structure(torch.rand(1, 1, 1), 4).abs().max()) == 0.0  # too small to have a spectrum


def test_emergence_gain_amplifies_structure_and_damps_its_absence():
    from neat_lightning.components.plasticity import emergence_gain, emergence_prune_scale

    s = torch.tensor([[[0.0, 0.2, 0.8, 1.0]]])
    g = emergence_gain(s, 1.0)
    assert g[0, 0, 0] < 1.0 < g[0, 0, 3] and float(g.min()) >= 0.0
    assert torch.equal(emergence_gain(torch.full((1, 2, 2), 0.4), 3.0), torch.ones(1, 2, 2))
    assert torch.equal(emergence_gain(s, 0.0), torch.ones_like(s))
    assert torch.equal(emergence_prune_scale(s, 0.0), torch.ones_like(s))
    assert torch.allclose(emergence_prune_scale(s, 1.0), s)
    with pytest.raises(ValueError, match=r"emergence_pruning=2.0 must be in \[0, 1\]"):
        emergence_prune_scale(s, 2.0)


def test_emergence_feedback_off_is_the_plain_update_and_on_scales_it_per_cell():
    """Off (the default): bit-identical to the rule without the option. On: the change is larger where the last
    step's activity has structure than where it is noise."""
    torch.manual_seed(0)
    D, H, W = 2, 8, 16
    x = torch.arange(W, dtype=torch.float32)
    wave = (0.5 + 0.4 * torch.cos(x * torch.pi / 2))[None, None].expand(D, H, W)
    act = torch.cat([wave[..., :8], torch.rand(D, H, 8)], dim=-1)[None].repeat(3, 1, 1, 1)  # (T, D, H, W)
    w0 = torch.full((D, H, W, N_NEIGHBOURS), 1.0)
    state = PlasticityState.zeros((D, H, W))
    profile = PlasticityProfile("p", stdp=0.0, bcm=1.0, competitive=0.0, activity_threshold=0.01)
    plain, _ = plasticity_update(w0, act, state, profile, PlasticityConfig(bcm_rate=0.1))
    off, _ = plasticity_update(w0, act, state, profile, PlasticityConfig(bcm_rate=0.1, emergence_feedback=False,
                                                                         emergence_window=3))
    assert torch.equal(plain, off)
    on, _ = plasticity_update(w0, act, state, profile, PlasticityConfig(bcm_rate=0.1, emergence_feedback=True,
                                                                        emergence_strength=2.0))
    d_plain, d_on = (plain - w0).abs(), (on - w0).abs()
    left = float(d_on[:, :, :8].sum() / d_plain[:, :, :8].sum())  # the structured half
    right = float(d_on[:, :, 8:].sum() / d_plain[:, :, 8:].sum())  # the noise
    assert left > 1.2 and right < 0.8
    comp = PlasticityProfile("c", stdp=0.0, bcm=0.0, competitive=1.0)
    w1 = torch.rand(D, H, W, N_NEIGHBOURS) + 0.5
    c_plain, _ = plasticity_update(w1, act, state, comp, PlasticityConfig())
    c_on, _ = plasticity_update(w1, act, state, comp, PlasticityConfig(emergence_feedback=True))
    assert not torch.equal(c_plain, c_on)  # the competition rate is scaled per cell too


def test_pruning_scale_prunes_connections_of_unstructured_cells_first():
    w = torch.ones(1, 2, 2, N_NEIGHBOURS)
    mask = torch.ones_like(w, dtype=torch.bool)
    scale = torch.tensor([[[1.0, 0.1], [1.0, 1.0]]])
    new = magnitude_prune_mask(w, mask, 0.25, scale)
    assert int((~new).sum()) == N_NEIGHBOURS and not bool(new[0, 0, 1].any())
    assert torch.equal(magnitude_prune_mask(w, mask, 0.25), magnitude_prune_mask(w, mask, 0.25, None))


@pytest.mark.parametrize("bad, match", [
    (dict(emergence_window=1), r"emergence_window=1 must be >= 2"),
    (dict(emergence_strength=-1.0), r"emergence_strength=-1.0 must be >= 0"),
    (dict(emergence_pruning=1.5), r"emergence_pruning=1.5 must be in \[0, 1\]"),
])
def test_emergence_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        PlasticityConfig(**bad)
