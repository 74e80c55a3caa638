"""VectorQuantizer: nearest-code lookup, straight-through gradient, EMA update, restarts, k-means init, cosine."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.components.quantizer import (
    VectorQuantizer,
    kmeans,
    perplexity_from_counts,
    squared_distances,
    step_generator,
)


def _data(n: int = 256, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_lookup_is_the_nearest_code() -> None:
    vq = VectorQuantizer(16, 8, kmeans_init=False).eval()
    z = _data(50)
    out = vq(z)
    brute = torch.cdist(z, vq.codebook).argmin(-1)
    assert torch.equal(out.indices, brute)
    assert torch.allclose(out.quantized, vq.codebook[brute])
    assert torch.equal(vq.indices_from_vectors(z), brute)
    assert torch.equal(vq.vectors_from_indices(brute), vq.codebook[brute])


def test_any_leading_shape_round_trips() -> None:
    vq = VectorQuantizer(16, 8, kmeans_init=False).eval()
    z = torch.randn(2, 3, 5, 8)
    out = vq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5)
    assert torch.allclose(vq.vectors_from_indices(out.indices), out.quantized, atol=1e-6)  # z + (q - z) rounds


def test_straight_through_gradient_and_commitment() -> None:
    vq = VectorQuantizer(16, 8, commitment=0.25, kmeans_init=False).eval()
    z = _data(40).requires_grad_(True)
    out = vq(z)
    (out.quantized * 3.0).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))  # identity gradient through the quantizer
    expected = 0.25 * ((z.detach() - vq.codebook[out.indices]) ** 2).mean()
    assert torch.allclose(out.commit_loss, expected)


def test_eval_and_no_grad_never_change_state() -> None:
    vq = VectorQuantizer(16, 8)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()(_data())
    with torch.no_grad():
        vq.train()(_data())
    vq.indices_from_vectors(_data())
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_update_matches_the_formula() -> None:
    decay, eps, K = 0.9, 1e-5, 4
    vq = VectorQuantizer(K, 2, decay=decay, eps=eps, kmeans_init=False, dead_code_threshold=0.0)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vq.embed_avg.copy_(vq.embed)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0], [0.5, 9.5]])
    cs0, avg0 = vq.cluster_size.clone(), vq.embed_avg.clone()
    out = vq.train()(z)
    assert out.indices.tolist() == [0, 0, 1, 2]
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])
    sums = torch.tensor([[1.0, 1.0], [9.0, 0.0], [0.5, 9.5], [0.0, 0.0]])
    cs = decay * cs0 + (1 - decay) * counts
    avg = decay * avg0 + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    assert torch.allclose(vq.cluster_size, cs)
    assert torch.allclose(vq.embed, avg / smoothed[:, None], atol=1e-6)
    assert vq.usage.tolist() == [2, 1, 1, 0] and int(vq.step) == 1


def test_dead_codes_restart_to_batch_vectors() -> None:
    vq = VectorQuantizer(8, 4, kmeans_init=False, dead_code_threshold=0.5)
    vq.embed.copy_(torch.full((8, 4), 100.0))  # far from everything...
    vq.embed[0] = 0.0  # ...except code 0, which takes every vector
    z = _data(64, 4)
    out = vq.train()(z)
    assert int(out.restarted) == 7
    restarted = vq.embed[1:]
    # every restarted code is one of this batch's encodings
    assert (restarted[:, None] == z[None]).all(-1).any(-1).all()
    assert (vq.cluster_size >= 0.5 - 1e-6).all()  # none below the threshold after the restart
    # and the next lookup spreads the batch over several codes
    assert len(vq.eval()(z).indices.unique()) > 3


def test_distinct_restarts_use_each_batch_vector_at_most_once() -> None:
    z = _data(6, 4)  # fewer vectors than dead codes: 6 codes restart now, the rest wait for the next batch
    vq = VectorQuantizer(16, 4, kmeans_init=False, dead_code_threshold=0.5, restart_distinct=True)
    vq.embed.copy_(torch.full((16, 4), 100.0))
    vq.embed[0] = 0.0
    out = vq.train()(z)
    assert int(out.restarted) == 6
    match = (vq.embed[:, None] == z[None]).all(-1)  # (16, 6): code i sits exactly on batch vector j
    assert match.sum(0).tolist() == [1] * 6  # every batch vector took exactly one code: no duplicates
    assert int(match.any(1).sum()) == 6
    assert int((vq.cluster_size < 0.5).sum()) == 16 - 1 - 6  # still dead, restarted from the next batch
    with_replacement = VectorQuantizer(16, 4, kmeans_init=False, dead_code_threshold=0.5)
    with_replacement.embed.copy_(vq.embed.new_full((16, 4), 100.0))
    with_replacement.embed[0] = 0.0
    assert int(with_replacement.train()(z).restarted) == 15  # every dead code, so some share a vector


def test_restart_count_gives_restarted_codes_time() -> None:
    def steps_until_restart(restart_count: float | None) -> int:
        vq = VectorQuantizer(4, 2, kmeans_init=False, dead_code_threshold=0.1, decay=0.9,
                             restart_count=restart_count)
        vq.embed.copy_(torch.tensor([[-1000.0, -1000.0], [60.0, 60.0], [70.0, 70.0], [80.0, 80.0]]))
        # code 0 was just restarted (count at its start value) and nothing will hit it again
        vq.cluster_size.copy_(torch.tensor([0.1 if restart_count is None else restart_count, 1.0, 1.0, 1.0]))
        vq.embed_avg.copy_(vq.embed * vq.cluster_size[:, None])
        for i in range(1, 100):
            if int(vq.train()(torch.tensor([[60.0, 60.0], [70.0, 70.0], [80.0, 80.0]])).restarted):
                return i
        return 100

    assert steps_until_restart(None) == 1  # restarted at the threshold, it dies the first step it is not hit
    assert steps_until_restart(0.4) == 14  # 0.4 * 0.9^k < 0.1 from k = 14: that many steps of grace


def test_factorised_lookup_runs_in_the_low_dimensional_space() -> None:
    vq = VectorQuantizer(16, 8, lookup_dim=3, kmeans_init=False, cosine=True).eval()
    assert vq.embed.shape == (16, 3) and vq.codebook.shape == (16, 8)
    z = _data(50)
    out = vq(z)
    low = torch.nn.functional.normalize(vq.project_in(z), dim=-1)
    assert torch.equal(out.indices, torch.cdist(low, vq.lookup_codebook).argmin(-1))
    assert torch.equal(vq.indices_from_vectors(z), out.indices)
    assert torch.allclose(out.quantized, vq.codebook[out.indices], atol=1e-6)
    assert torch.allclose(vq.vectors_from_indices(out.indices), out.quantized, atol=1e-6)
    z.requires_grad_(True)
    vq(z).quantized.sum().backward()  # the straight-through gradient reaches the encoder through both projections
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vq.project_out.weight.grad is not None
    plain = VectorQuantizer(16, 8)
    assert not any(k.startswith("project") for k in plain.state_dict())  # unfactorised checkpoints unchanged


@pytest.mark.parametrize("sampling", ["uniform", "error"])
def test_restarts_are_deterministic_from_seed_and_step(sampling: str) -> None:
    def run(seed: int) -> torch.Tensor:
        vq = VectorQuantizer(32, 4, seed=seed, dead_code_threshold=2.0, restart_sampling=sampling)
        for i in range(3):
            vq.train()(_data(64, 4, seed=i))
        return vq.embed.clone()

    torch.manual_seed(0)
    a = run(1)
    torch.manual_seed(123)  # the global RNG plays no part
    b = run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(2))


def test_kmeans_init_on_first_batch() -> None:
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    z = centres.repeat_interleave(50, 0) + 0.3 * torch.randn(200, 2, generator=g)
    sampled = VectorQuantizer(8, 2, kmeans_init=True, kmeans_iters=0, dead_code_threshold=0.0)
    fitted = VectorQuantizer(8, 2, kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.0)
    assert not bool(fitted.initted)
    with torch.no_grad():
        fitted.eval()(z)
    assert not bool(fitted.initted)  # only a training step initialises
    sampled.train()(z)
    fitted.train()(z)
    assert bool(fitted.initted)

    def error(vq: VectorQuantizer) -> float:
        return float(squared_distances(z, vq.codebook).min(-1).values.mean())

    assert error(fitted) < error(sampled)  # Lloyd iterations improve on the sampled start
    # and the codes sit on the data: every cluster centre has a code nearby
    assert (torch.cdist(centres, fitted.codebook).min(-1).values < 1.0).all()


def test_kmeans_with_fewer_vectors_than_codes() -> None:
    x = _data(5, 3)
    centres, counts = kmeans(x, 12, 5, step_generator(0, 0, x.device))
    assert centres.shape == (12, 3) and int(counts.sum()) == 5


def test_cosine_codes_are_unit_vectors() -> None:
    vq = VectorQuantizer(16, 8, cosine=True)
    vq.train()(_data() * 7.0)
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    out = vq.eval()(_data() * 3.0)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(256), atol=1e-5)


def test_perplexity_bounds() -> None:
    assert torch.isclose(perplexity_from_counts(torch.tensor([5.0, 0, 0, 0])), torch.tensor(1.0))
    assert torch.isclose(perplexity_from_counts(torch.ones(16)), torch.tensor(16.0))


def test_squared_distances_match_cdist() -> None:
    x, c = _data(30, 5), _data(7, 5, seed=1)
    assert torch.allclose(squared_distances(x, c), torch.cdist(x, c) ** 2, atol=1e-4)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="codebook_size=1 must be >= 2"):
        VectorQuantizer(1, 4)
    with pytest.raises(ValueError, match="decay=1.0 must be in"):
        VectorQuantizer(8, 4, decay=1.0)
    with pytest.raises(ValueError, match="restart_sampling='often'"):
        VectorQuantizer(8, 4, restart_sampling="often")
    with pytest.raises(ValueError, match="lookup_dim=0 must be >= 1"):
        VectorQuantizer(8, 4, lookup_dim=0)
    with pytest.raises(ValueError, match="restart_count=0.1 must be >= dead_code_threshold=0.5"):
        VectorQuantizer(8, 4, dead_code_threshold=0.5, restart_count=0.1)
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match=r"z must end in dim=4; got shape \(2, 5\)"):
        vq(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\); got min 0, max 8"):
        vq.vectors_from_indices(torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="integer tensor"):
        vq.vectors_from_indices(torch.tensor([0.0]))
