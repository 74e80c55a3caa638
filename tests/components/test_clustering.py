import pytest
import torch
import torch.nn.functional as F

from neat_lightning.components.clustering import ClusteringConfig, CosineKMeans, cluster_count, coordination_loss


def blobs(n_per=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(4)[:3] * 5  # three orthogonal directions
    x = torch.cat([c + 0.3 * torch.randn(n_per, 4, generator=g) for c in centres])
    return x, torch.arange(3).repeat_interleave(n_per)


def test_recovers_direction_clusters():
    x, truth = blobs()
    km = CosineKMeans(3, 4, sample_size=256)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = km.update(x, generator=g)
    # each true cluster maps to one predicted cluster (purity 1)
    for c in range(3):
        assert ids[truth == c].unique().numel() == 1
    assert cluster_count(ids, 3) == 3
    assert torch.allclose(km.centroids.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_cosine_not_euclidean():
    km = CosineKMeans(2, 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    km.update(x, generator=torch.Generator().manual_seed(0))
    far_same_direction = torch.tensor([[100.0, 0.0], [0.0, 0.01]])
    assert torch.equal(km.assign(far_same_direction), km.assign(x))


def test_state_is_in_buffers_and_assign_before_init():
    km = CosineKMeans(4, 3)
    assert set(km.state_dict()) == {"centroids", "counts", "initted"}
    assert (km.assign(torch.randn(5, 3)) == 0).all()
    km.update(torch.randn(2, 3), generator=torch.Generator().manual_seed(0))  # fewer cells than clusters
    assert bool(km.initted) and torch.isfinite(km.centroids).all()


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="n_clusters=0"):
        CosineKMeans(0, 3)
    with pytest.raises(ValueError, match=r"x shape \(5, 2\) must be \(N, 3\)"):
        CosineKMeans(2, 3).update(torch.randn(5, 2))


def test_coordination_loss_zero_when_aligned():
    c = F.normalize(torch.randn(3, 4), dim=-1)
    ids = torch.tensor([0, 1, 2, 1])
    assert coordination_loss(c[ids] * 7, ids, c) == pytest.approx(0.0, abs=1e-6)
    assert coordination_loss(-c[ids], ids, c) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("kw, match", [({"n_clusters": 0}, "n_clusters=0 must be >= 1"),
                                       ({"sample_size": 0}, "sample_size=0 must be >= 1"),
                                       ({"coordination": -0.5}, "coordination=-0.5 must be >= 0")])
def test_clustering_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ClusteringConfig(**kw)
