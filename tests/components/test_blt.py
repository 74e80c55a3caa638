"""BLT processor: hash n-grams, patch-to-own-bytes pooling, causality, batching with padding, controller state."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
from torch import nn

from neat_lightning.codec import encode
from neat_lightning.components.blt import (
    BLTConfig,
    BLTProcessor,
    PatchCrossAttention,
    decoder_mask,
    default_patcher,
    encoder_mask,
    hash_ngram_ids,
    mean_pool,
    rolling_polynomial_hash,
)
from neat_lightning.components.entropy import next_byte_entropies
from neat_lightning.components.patch_threshold import calibrate_threshold
from neat_lightning.components.patching import PatcherConfig, patch_ids_from_lengths
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig

TEXT = "the cat sat on the mat; the dog ate 42 bones!! then it slept."
LOCAL = dict(dim_local=16, heads_local=2, cross_heads=2, hash_vocab=61, window_local=8)


def entropy_lm() -> ByteTransformer:
    torch.manual_seed(0)
    return ByteTransformer(TransformerConfig(dim=16, n_layers=1, heads=2, block_size=32))


PATCHER_FIELDS = {f.name for f in fields(PatcherConfig)}


def config(patching: str = "static", **kw) -> BLTConfig:
    """A BLTConfig from flat keywords: PatcherConfig fields go to ``patcher`` (over BLT's defaults), the rest to BLT."""
    patcher = {k: v for k, v in kw.items() if k in PATCHER_FIELDS}
    rest = {k: v for k, v in kw.items() if k not in PATCHER_FIELDS}
    return BLTConfig(patcher=replace(default_patcher(), mode=patching, **patcher), **rest)


def processor(patching: str = "static", seed: int = 0, **kw) -> BLTProcessor:
    lm = entropy_lm() if patching == "entropy" else None
    torch.manual_seed(seed)
    return BLTProcessor(config(patching, **{**LOCAL, **kw}), vocab_size=260, dim=32, entropy_model=lm)


class CausalLatent(nn.Module):
    """A tiny causal latent model: running mean over patches + a linear map."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        return self.lin(x.cumsum(1) / steps)


def text_ids(n_rows: int = 1) -> torch.Tensor:
    return encode(TEXT)[None].repeat(n_rows, 1)


def test_hash_matches_the_reference_formula_and_only_sees_the_ngram():
    ids = torch.randint(4, 260, (2, 20))
    n, vocab, prime = 4, 997, 1000000007
    got = hash_ngram_ids(ids, n, vocab, prime)
    padded = [[0] * (n - 1) + row for row in ids.tolist()]
    for b in range(2):
        for t in range(20):  # Python big ints wrapped to int64, as torch's int64 arithmetic wraps
            h = sum(padded[b][t + i] * prime**i for i in range(n)) % 2**64
            h = h - 2**64 if h >= 2**63 else h
            assert int(got[b, t]) == h % vocab
    # equal n-grams hash equally wherever they are; a change at t only moves hashes t .. t+n-1
    same = torch.tensor([[10, 11, 12, 13, 99, 10, 11, 12, 13]])
    h = hash_ngram_ids(same, n, vocab)
    assert h[0, 3] == h[0, 8]
    changed = ids.clone()
    changed[0, 7] += 1
    diff = (hash_ngram_ids(changed, n, vocab) != got)[0].nonzero().squeeze(1).tolist()
    assert set(diff) <= set(range(7, 7 + n)) and diff
    assert rolling_polynomial_hash(torch.tensor([[5]])).item() == 5


def test_masks_pool_each_patch_over_its_own_bytes_only():
    lengths = torch.tensor([[3, 2, 0], [1, 1, 3]])
    pid = patch_ids_from_lengths(lengths, 5)
    mask = encoder_mask(pid, 3)
    assert mask.sum(-1).tolist() == lengths.tolist()
    x = torch.randn(2, 5, 4)
    pooled = mean_pool(x, pid, 3)
    torch.testing.assert_close(pooled[0, 0], x[0, :3].mean(0))
    assert torch.equal(pooled[0, 2], torch.zeros(4))  # padding patch
    dmask = decoder_mask(pid, 3)
    assert dmask[0].tolist() == [[True, False, False]] * 3 + [[True, True, False]] * 2
    assert decoder_mask(pid, 3, window=1)[1, 4].tolist() == [False, False, True]


def test_changing_a_byte_of_one_patch_changes_only_that_patch_embedding():
    blt = processor(window_local=None, encoder_layers=0)  # no local self-attention: pooling alone mixes bytes
    ids = text_ids()
    lengths = torch.tensor([[8] * 7 + [len(TEXT) - 56]])
    _, base, _ = blt.encode(ids, lengths)
    changed = ids.clone()
    changed[0, 19] += 1  # patch 2 (bytes 16..23); hash n-grams reach into patch 3 (up to byte 26)
    _, out, _ = blt.encode(changed, lengths)
    moved = (out - base).abs().amax(-1)[0] > 0
    assert moved.tolist() == [False, False, True, True, False, False, False, False]


@pytest.mark.parametrize("patching", ["entropy", "static", "space"])
def test_logits_at_a_position_never_depend_on_later_bytes(patching):
    kw = {}
    if patching == "entropy":  # a threshold giving ~4-byte patches on this text
        h = next_byte_entropies(entropy_lm(), text_ids())
        kw = dict(adaptive=False, threshold=calibrate_threshold(h, 4.0))
    blt = processor(patching, patch_size=3, **kw).eval()
    latent = CausalLatent()
    ids = text_ids()
    lengths = blt.patch_lengths(ids)
    assert 2 < int((lengths > 0).sum()) < ids.shape[1]  # real patches, not one per byte
    base = blt(ids, latent).logits
    for t in range(0, ids.shape[1], 5):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] - 4 + 37) % 256 + 4
        out = blt(changed, latent).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_a_batch_equals_its_rows_run_alone():
    blt = processor("space").eval()
    latent = CausalLatent()
    rows = [encode(TEXT), encode("x" * 19 + " y" * 21)]  # 14 vs 22 patches: padding patches in row 0
    ids = torch.stack(rows)
    lengths = blt.patch_lengths(ids)
    assert (lengths > 0).sum(1).tolist()[0] != (lengths > 0).sum(1).tolist()[1]
    batched = blt(ids, latent).logits
    for i in range(2):
        torch.testing.assert_close(batched[i], blt(ids[i : i + 1], latent).logits[0], rtol=1e-5, atol=1e-5)


def test_adaptive_threshold_moves_only_when_asked_and_travels_in_the_state_dict():
    blt = processor("entropy", threshold=1.0)
    ids = text_ids(2)
    before = blt.threshold
    blt.patch_lengths(ids)
    assert blt.threshold == before  # evaluation: no update
    blt.patch_lengths(ids, update=True)
    assert blt.threshold > before  # an untrained model's entropies (~5.5 nats) are all above 1.0: too many starts
    other = processor("entropy", threshold=1.0)
    other.load_state_dict(blt.state_dict())
    assert other.controller.state_dict() == blt.controller.state_dict()
    seen = []
    pooled = torch.tensor([1.0, 10.0])  # what other ranks would make of it: 1 start in 10 positions
    blt.patch_lengths(ids, update=True, reduce_mean=lambda counts: seen.append(counts) or pooled)
    assert len(seen) == 1 and blt.controller.last_ratio == pytest.approx(0.1)
    assert seen[0].shape == (2,) and seen[0][1] == ids.numel()  # (starts, positions): ranks pool, then divide


def test_adaptive_threshold_observes_the_ratio_over_byte_positions_only():
    """Image ids (>= 260) and the byte after each are forced patch starts; the controller must not count them."""
    blt = processor("entropy", threshold=6.0)  # untrained entropies ~5.5 nats: few entropy starts at 6.0
    ids = text_ids(1)
    T = ids.shape[1]
    blt.patch_lengths(ids, update=True)
    bytes_only = blt.controller.last_ratio
    mixed = ids.clone()
    mixed[0, 10:30] = 262 + torch.arange(20)  # an image-like run of visual ids
    blt2 = processor("entropy", threshold=6.0)
    lengths = blt2.patch_lengths(mixed, update=True)
    starts = (lengths > 0).sum().item()
    assert starts / T > bytes_only + 20 / T - 1e-6  # the image run itself adds >= 20 starts to the patching ...
    ruled = torch.ones(T, dtype=torch.bool)
    ruled[10:31] = False  # ... but the ratio is over the 41 byte positions the entropy rule decides
    entropy_starts = starts - 21
    assert blt2.controller.last_ratio == pytest.approx(entropy_starts / int(ruled.sum()))
    assert blt2.controller.last_ratio < 0.5 * starts / T
    all_image = torch.full((1, 12), 300)
    before = blt2.controller.state_dict()
    blt2.patch_lengths(all_image, update=True)  # no byte position: nothing to observe, θ holds
    assert blt2.controller.state_dict() == before


def test_static_patches_and_padding_patches_give_finite_outputs():
    blt = processor("static", patch_size=8)
    ids = text_ids(2)
    out = blt(ids, CausalLatent())
    assert out.lengths[0].tolist() == [8] * 7 + [len(TEXT) - 56]
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert blt.embed.hash_embed.weight.grad is not None and blt.start.grad is not None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(target_boundary_ratio=0.5), r"target_boundary_ratio=0.5 must be in \[1/128, 1/8\]"),
        (dict(max_patch_length=200), r"max_patch_length=200 must be in \[1, 128\]"),
        (dict(max_patch_length=6), r"max_patch_length=6 is below the target mean patch size .*=10"),
        (dict(mode="bpe"), r"mode='bpe' must be 'entropy', 'static' or 'space'"),
        (dict(dim_local=18, heads_local=4), r"dim_local=18 must split into heads_local=4"),
        (dict(ngram_sizes=(3, 3)), r"ngram_sizes=\[3, 3\] must be distinct"),
        (dict(threshold=-1.0), r"threshold=-1.0 must be a finite number > 0"),
        (dict(decoder_patch_window=0), r"decoder_patch_window=0 must be >= 1"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        config(kw.pop("mode", "entropy"), **kw)


def test_entropy_patching_without_a_model_is_refused():
    with pytest.raises(ValueError, match=r"mode='entropy' needs an entropy_model"):
        BLTProcessor(BLTConfig(), vocab_size=260, dim=32)
    with pytest.raises(TypeError, match=r"config must be a BLTConfig, got dict"):
        BLTProcessor({"patching": "static"}, vocab_size=260, dim=32)


def test_ids_beyond_the_byte_codec_are_patches_of_their_own_and_stay_causal():
    """MVoT's image markers and visual codes (ids >= 260) never reach the 260-id entropy model."""
    lm = entropy_lm()
    torch.manual_seed(0)
    cfg = config("entropy", adaptive=False, threshold=50.0, **LOCAL)  # no entropy starts at all
    blt = BLTProcessor(cfg, vocab_size=270, dim=32, entropy_model=lm).eval()
    ids = text_ids()
    ids[0, 20:24] = torch.tensor([260, 265, 269, 261])  # BOI, two codes, EOI
    lengths = blt.patch_lengths(ids)
    assert lengths[0][lengths[0] > 0].tolist() == [20, 1, 1, 1, 1, len(TEXT) - 24]
    latent = CausalLatent()
    base = blt(ids, latent).logits
    assert base.shape[-1] == 270
    changed = ids.clone()
    changed[0, 22] = 262
    torch.testing.assert_close(blt(changed, latent).logits[:, :22], base[:, :22], rtol=0, atol=1e-6)


def test_blt_config_holds_a_patcher_config_with_the_one_default_threshold():
    cfg = BLTConfig()
    assert isinstance(cfg.patcher, PatcherConfig) and cfg.patcher.threshold == PatcherConfig().threshold
    assert (cfg.patcher.mode, cfg.patcher.max_patch_length, cfg.patcher.patch_size) == ("entropy", 128, 8)
    from dataclasses import asdict

    stored = asdict(config("space", threshold=2.5, **LOCAL))  # checkpoints hold plain nested dicts
    assert BLTConfig(**stored) == config("space", threshold=2.5, **LOCAL)
    with pytest.raises(TypeError, match=r"BLTConfig.patcher must be a PatcherConfig, got int"):
        BLTConfig(patcher=3)
    with pytest.raises(ValueError, match=r"adaptive=True controls the global threshold, but patcher.rule='monotonic'"):
        config("entropy", rule="monotonic")
    blt = processor("static")
    assert isinstance(blt.pool, PatchCrossAttention)
    assert all(isinstance(c, PatchCrossAttention) for c in blt.decoder_cross)
