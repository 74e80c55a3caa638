"""Entropy patching: rules on hand-computed cases, length bookkeeping, entropies, calibration, adaptive control."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from neat_lightning.codec import BOS_ID, EOS_ID, VOCAB_SIZE, encode
from neat_lightning.components import entropy as entropy_module
from neat_lightning.components import patch_threshold, patching
from neat_lightning.components.entropy import entropy, next_byte_entropies
from neat_lightning.components.patch_threshold import AdaptiveEntropyThreshold, calibrate_threshold
from neat_lightning.components.patching import (
    Patcher,
    PatcherConfig,
    check_patch_lengths,
    combined_start_mask,
    global_start_mask,
    monotonic_start_mask,
    patch_ids_from_lengths,
    patch_lengths_from_start_mask,
    patch_start_ids_from_start_mask,
    patch_statistics,
    space_start_mask,
    split_long_patches,
    start_mask_from_patch_lengths,
    static_start_mask,
)
from neat_lightning.components.transformer import ByteTransformer, TransformerConfig


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Light stand-in for torch.testing.assert_close (whose first call costs seconds of imports)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().float(), expected.detach().float()
    diff = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs difference {diff}"


def mask(*rows: str) -> torch.Tensor:
    """'10010' -> bool row; several rows -> (B, T)."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


@pytest.fixture(scope="module")
def tiny_model() -> ByteTransformer:
    torch.manual_seed(0)
    return ByteTransformer(TransformerConfig(dim=16, n_layers=1, heads=2, block_size=8)).eval()


def reference_entropies(model, ids: torch.Tensor, block: int, overlap: int, reset: bool = False) -> torch.Tensor:
    """Slow, obvious version: one forward per byte over the context the windowing rule gives it."""
    out = torch.empty(ids.shape)
    stride = block - overlap
    newline = ord("\n") + 4
    for b, row in enumerate(ids.tolist()):
        cuts = [0] + [j for j in range(1, len(row)) if reset and row[j - 1] == newline] + [len(row)]
        for s, e in zip(cuts[:-1], cuts[1:]):
            inputs = [BOS_ID] + row[s : e - 1]
            for j in range(e - s):
                start = 0 if j < block else ((j - block) // stride + 1) * stride
                with torch.no_grad():
                    out[b, s + j] = entropy(model(torch.tensor([inputs[start : j + 1]])))[0, -1]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# entropy


def test_entropy_in_nats_float32():
    logits = torch.zeros(2, 3, VOCAB_SIZE, dtype=torch.bfloat16)
    logits[1, :, 7] = 100.0  # certain
    h = entropy(logits)
    assert h.dtype == torch.float32 and h.shape == (2, 3)
    assert_close(h[0], torch.full((3,), math.log(VOCAB_SIZE)))
    assert h[1].abs().max() < 1e-6
    p = torch.tensor([0.5, 0.25, 0.25])
    assert_close(entropy(p.log()[None, None])[0, 0], -(p * p.log()).sum())


# ----------------------------------------------------------------------------------------------------------------------
# rules, written out by hand

H = torch.tensor([[0.1, 2.0, 0.5, 3.0, 2.9, 0.2, 1.0, 2.5]])


def test_global_rule_hand_computed():
    # strict >: 1.0 is not above 1.0; byte 0 starts although 0.1 < 1.0
    assert torch.equal(global_start_mask(H, 1.0), mask("11011001"))
    assert torch.equal(global_start_mask(H, 2.9), mask("10010000"))
    assert torch.equal(global_start_mask(H, 100.0), mask("10000000"))


def test_monotonic_rule_hand_computed():
    # rises: 1.9, -1.5, 2.5, -0.1, -2.7, 0.8, 1.5
    assert torch.equal(monotonic_start_mask(H, 1.0), mask("11010001"))
    assert torch.equal(monotonic_start_mask(H, 0.5), mask("11010011"))
    assert torch.equal(monotonic_start_mask(H, 1.5), mask("11010000"))  # 1.5 is not > 1.5


def test_combined_rules_hand_computed():
    # global > 2.6: bytes 3, 4; monotonic > 1.0: bytes 1, 3, 7
    assert torch.equal(combined_start_mask(H, 2.6, 1.0, "or"), mask("11011001"))
    assert torch.equal(combined_start_mask(H, 2.6, 1.0, "and"), mask("10010000"))
    with pytest.raises(ValueError, match="combine='xor' must be 'or' or 'and'"):
        combined_start_mask(H, 2.6, 1.0, "xor")


def test_first_byte_always_starts():
    h = torch.zeros(3, 5)
    for m in (global_start_mask(h, 1.0), monotonic_start_mask(h, 1.0), combined_start_mask(h, 1.0, 1.0, "and")):
        assert torch.equal(m, mask("10000", "10000", "10000"))


@pytest.mark.parametrize(
    "lengths, m, expected",
    [([10], 4, [4, 4, 2]), ([8], 4, [4, 4]), ([3, 9, 1], 4, [3, 4, 4, 1, 1]), ([5, 2], 1, [1] * 7), ([4], 9, [4])],
)
def test_split_long_patches(lengths, m, expected):
    t = sum(lengths)
    start = start_mask_from_patch_lengths(torch.tensor([lengths]), t)
    assert patch_lengths_from_start_mask(split_long_patches(start, m)).tolist() == [expected]


def test_split_long_patches_batch_and_bad_length():
    start = mask("1000000000", "1001000000")
    assert patch_lengths_from_start_mask(split_long_patches(start, 4)).tolist() == [[4, 4, 2], [3, 4, 3]]
    with pytest.raises(ValueError, match="max_patch_length=0 must be >= 1"):
        split_long_patches(start, 0)


# ----------------------------------------------------------------------------------------------------------------------
# bookkeeping


def test_lengths_start_ids_and_patch_ids_for_a_ragged_batch():
    start = mask("10010001", "11111111", "10000000")
    assert patch_start_ids_from_start_mask(start).tolist() == [
        [0, 3, 7, 8, 8, 8, 8, 8], [0, 1, 2, 3, 4, 5, 6, 7], [0, 8, 8, 8, 8, 8, 8, 8],
    ]
    lengths = patch_lengths_from_start_mask(start)
    assert lengths.tolist() == [[3, 4, 1, 0, 0, 0, 0, 0], [1] * 8, [8, 0, 0, 0, 0, 0, 0, 0]]
    assert patch_ids_from_lengths(lengths, 8).tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7], [0] * 8,
    ]
    assert torch.equal(start_mask_from_patch_lengths(lengths, 8), start)


@pytest.mark.parametrize("t", [1, 2, 7, 64])
def test_random_masks_round_trip(t):
    g = torch.Generator().manual_seed(t)
    start = torch.rand(5, t, generator=g) < 0.3
    start[:, 0] = True
    lengths = patch_lengths_from_start_mask(start)
    assert (lengths.sum(1) == t).all()
    assert torch.equal(start_mask_from_patch_lengths(lengths, t), start)
    ids = patch_ids_from_lengths(lengths, t)
    assert torch.equal(ids, start.long().cumsum(1) - 1)  # patch id = starts seen so far - 1


def test_invariants_are_asserted_with_both_numbers():
    with pytest.raises(AssertionError, match="sum to 9, expected 10"):
        check_patch_lengths(torch.tensor([[4, 5]]), 10)
    with pytest.raises(AssertionError, match="non-zero patch length 3 at patch 2 after a zero"):
        check_patch_lengths(torch.tensor([[7, 0, 3]]), 10)
    with pytest.raises(ValueError, match=r"start_mask\[:, 0\] must be True"):
        patch_lengths_from_start_mask(mask("0100"))


def test_patch_statistics():
    s = patch_statistics(torch.tensor([[3, 4, 1, 0], [2, 2, 0, 0]]))
    assert s["n_bytes"] == 12 and s["n_patches"] == 5 and s["max_size"] == 4
    assert s["mean_size"] == pytest.approx(12 / 5) and s["boundary_ratio"] == pytest.approx(5 / 12)
    assert s["p50"] == 2 and s["p99"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# baselines


def test_static_patching():
    ids = torch.zeros(2, 10, dtype=torch.long)
    assert patch_lengths_from_start_mask(static_start_mask(ids, 4)).tolist() == [[4, 4, 2]] * 2
    assert Patcher(PatcherConfig(mode="static", patch_size=3))(ids).tolist() == [[3, 3, 3, 1]] * 2


def test_space_patching_hand_computed():
    text = "hi  you, é!"
    ids = encode(text)[None]
    # bytes: h i ' ' ' ' y o u , ' ' 0xC3 0xA9 !   (é is two bytes; its lead byte is space-like, as in SpaceByte)
    # ends (first space-like byte of a run): byte 2 (' '), byte 7 (','), byte 11 ('!') -> starts at 3, 8
    assert torch.equal(space_start_mask(ids), mask("100100001000"))
    lengths = Patcher(PatcherConfig(mode="space"))(ids)[0].tolist()
    pieces, at = [], 0
    data = text.encode()
    for n in lengths:
        pieces.append(data[at : at + n])
        at += n
    assert pieces == [b"hi ", b" you,", " é!".encode()]


def test_space_patching_batch_with_different_patterns():
    ids = torch.stack([encode("a b c d "), encode("abcdefgh")])
    assert patch_lengths_from_start_mask(space_start_mask(ids)).tolist() == [[2, 2, 2, 2], [8, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------------------------------
# next-byte entropies


@pytest.mark.parametrize("t, overlap", [(5, 0), (8, 0), (29, 0), (29, 3), (17, 7)])
def test_next_byte_entropies_match_a_per_byte_reference(tiny_model, t, overlap):
    ids = torch.randint(4, 260, (3, t), generator=torch.Generator().manual_seed(t))
    got = next_byte_entropies(tiny_model, ids, context_overlap=overlap, batch_windows=4)
    assert got.shape == (3, t) and got.dtype == torch.float32 and not got.is_inference()
    assert_close(got, reference_entropies(tiny_model, ids, 8, overlap))


def test_byte_zero_is_predicted_from_bos(tiny_model):
    ids = encode("xyz")[None]
    expected = entropy(tiny_model(torch.tensor([[BOS_ID]])))[0, 0]
    assert_close(next_byte_entropies(tiny_model, ids)[0, 0], expected)
    after_eos = entropy(tiny_model(torch.tensor([[EOS_ID]])))[0, 0]
    assert_close(Patcher(PatcherConfig(bos_id=EOS_ID), tiny_model).entropies(ids)[0, 0], after_eos)


def test_reset_at_newline_changes_entropies_only_after_newlines(tiny_model):
    text = "first line\nsecond\nthird one here"
    ids = encode(text)[None]
    plain = next_byte_entropies(tiny_model, ids, block_size=64)
    reset = next_byte_entropies(tiny_model, ids, block_size=64, reset_at_newline=True)
    first_newline = text.index("\n")
    assert_close(reset[0, : first_newline + 1], plain[0, : first_newline + 1])
    assert (reset[0, first_newline + 1 :] - plain[0, first_newline + 1 :]).abs().max() > 1e-4
    # each line behaves as its own document
    for line, start in (("second\n", first_newline + 1), ("third one here", text.index("third"))):
        alone = next_byte_entropies(tiny_model, encode(line)[None], block_size=64)
        assert_close(reset[0, start : start + len(line)], alone[0])
    # windowed too
    long = encode("ab\ncdefghijklm\nn\n\nxyz0123456789")[None].repeat(2, 1)
    got = next_byte_entropies(tiny_model, long, context_overlap=2, reset_at_newline=True, batch_windows=3)
    assert_close(got, reference_entropies(tiny_model, long, 8, 2, reset=True))


def test_next_byte_entropies_restore_training_mode_and_validate(tiny_model):
    tiny_model.train()
    next_byte_entropies(tiny_model, encode("abc")[None])
    assert tiny_model.training
    tiny_model.eval()
    with pytest.raises(ValueError, match=r"context_overlap=8 must be in \[0, block_size=8\)"):
        next_byte_entropies(tiny_model, encode("abc")[None], context_overlap=8)
    with pytest.raises(ValueError, match=r"ids must be a \(B, T\) tensor, got shape \(3,\)"):
        next_byte_entropies(tiny_model, encode("abc"))
    with pytest.raises(ValueError, match="block_size=None and the model has no config.block_size"):
        next_byte_entropies(lambda x: torch.zeros(*x.shape, 260), encode("abc")[None])


# ----------------------------------------------------------------------------------------------------------------------
# Patcher and its config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "bpe", r"mode='bpe' must be 'entropy', 'static' or 'space'"),
        ("rule", "max", "rule='max' must be 'global', 'monotonic' or 'both'"),
        ("combine", "xor", "combine='xor' must be 'or' or 'and'"),
        ("threshold", float("nan"), "threshold=nan must be a finite number"),
        ("max_patch_length", 0, "max_patch_length=0 must be >= 1 or None"),
        ("patch_size", 0, "patch_size=0 must be >= 1"),
        ("context_overlap", -1, "context_overlap=-1 must be >= 0"),
        ("batch_windows", 0, "batch_windows=0 must be >= 1"),
        ("bos_id", 7, r"bos_id=7 must be a special id in \[0, 4\)"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        PatcherConfig(**{field: value})


def test_config_overlap_must_fit_block():
    with pytest.raises(ValueError, match="context_overlap=16 must be >= 0 and < block_size=16"):
        PatcherConfig(block_size=16, context_overlap=16)


def test_patcher_entropy_mode(tiny_model):
    ids = torch.randint(4, 260, (2, 20), generator=torch.Generator().manual_seed(1))
    h = next_byte_entropies(tiny_model, ids)
    theta = float(h.median())
    patcher = Patcher(PatcherConfig(threshold=theta, max_patch_length=3), tiny_model)
    expected = patch_lengths_from_start_mask(split_long_patches(global_start_mask(h, theta), 3))
    assert torch.equal(patcher(ids), expected)
    assert torch.equal(patcher(ids, entropies=h), expected)
    assert (patcher(ids, threshold=100.0) <= 3).all()
    both = Patcher(PatcherConfig(rule="both", threshold=theta, monotonic_threshold=0.0, combine="and"))
    assert torch.equal(both.start_mask(ids, h), combined_start_mask(h, theta, 0.0, "and"))
    with pytest.raises(ValueError, match="entropy mode needs an entropy_model"):
        Patcher()(ids)
    with pytest.raises(TypeError, match="config must be a PatcherConfig, got dict"):
        Patcher({"mode": "static"})


@pytest.mark.parametrize("module", [entropy_module, patching, patch_threshold], ids=lambda m: m.__name__)
def test_components_do_not_import_lightning(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"lightning", "pytorch_lightning"}


# ----------------------------------------------------------------------------------------------------------------------
# calibration and the adaptive controller


def synthetic_entropies(n_rows: int, t: int, seed: int) -> torch.Tensor:
    """Correlated, skewed 'entropies': smooth background plus sparse spikes, like a byte LM's on text."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n_rows, t, generator=g).cumsum(1)
    smooth = (base - torch.roll(base, 4, dims=1)).abs() / 4  # local average of uniforms
    spikes = (torch.rand(n_rows, t, generator=g) < 0.15) * torch.rand(n_rows, t, generator=g) * 3
    return smooth + spikes


@pytest.mark.parametrize("target, m", [(4.5, None), (2.0, None), (8.0, None), (4.5, 6), (3.0, 4)])
def test_calibrate_threshold_hits_target_on_held_out(target, m):
    fit, held_out = synthetic_entropies(64, 2048, 0), synthetic_entropies(64, 2048, 1)
    theta = calibrate_threshold(fit, target, max_patch_length=m)
    patcher = Patcher(PatcherConfig(threshold=theta, max_patch_length=m))
    dummy = torch.zeros_like(fit, dtype=torch.long)
    on_fit = patch_statistics(patcher(dummy, entropies=fit))["mean_size"]
    on_held_out = patch_statistics(patcher(dummy, entropies=held_out))["mean_size"]
    assert on_fit == pytest.approx(target, rel=1e-3)  # exact up to whole patches
    assert on_held_out == pytest.approx(target, rel=0.01)


def test_calibrate_threshold_rejects_impossible_targets():
    h = synthetic_entropies(2, 100, 0)
    with pytest.raises(ValueError, match="target_mean_patch_size=0.5 must be >= 1"):
        calibrate_threshold(h, 0.5)
    with pytest.raises(ValueError, match=r"target_mean_patch_size=6 is unreachable: the largest mean patch size is 4"):
        calibrate_threshold(h, 6, max_patch_length=4)
    assert patch_statistics(patch_lengths_from_start_mask(global_start_mask(h, calibrate_threshold(h, 1.0))))[
        "mean_size"
    ] == 1.0


def stream_batches(n: int, seed: int) -> list[torch.Tensor]:
    """A stream whose entropy scale drifts by ±25%, so a fixed threshold would not hold the ratio."""
    return [synthetic_entropies(8, 256, seed + i) * (1.0 + 0.25 * math.sin(i / 40)) for i in range(n)]


def test_adaptive_threshold_holds_target_ratio():
    batches = stream_batches(240, 0)
    ctrl = AdaptiveEntropyThreshold(target_boundary_ratio=0.1, initial_threshold=0.3)
    ratios = torch.tensor([float(ctrl.step(h).float().mean()) for h in batches])
    windows = ratios[48:].reshape(12, 16).mean(dim=1)  # after warm-up, the ratio over every 16 batches (32 KB)
    assert (windows - 0.1).abs().max() < 0.01, windows
    assert abs(float(ratios[48:].mean()) - 0.1) < 0.005
    assert ctrl.steps == 240
    # the drift is real: the best fixed threshold for the whole stream misses by more than a point
    fixed = calibrate_threshold(torch.cat(batches), 10.0)
    fixed_windows = torch.stack([global_start_mask(h, fixed).float().mean() for h in batches])[48:].reshape(12, 16)
    assert (fixed_windows.mean(dim=1) - 0.1).abs().max() > 0.01


def test_adaptive_threshold_state_dict_round_trip():
    batches = stream_batches(30, 7)
    a = AdaptiveEntropyThreshold(target_boundary_ratio=0.2, max_patch_length=12)
    for h in batches[:15]:
        a.step(h)
    state = a.state_dict()
    assert all(isinstance(v, (int, float, type(None))) for v in state.values())
    b = AdaptiveEntropyThreshold(target_boundary_ratio=0.2, max_patch_length=12)
    b.load_state_dict(state)
    for h in batches[15:]:
        assert torch.equal(a.step(h), b.step(h))
        assert a.threshold == b.threshold and a.ema_ratio == b.ema_ratio
    assert b.steps == 30


def test_adaptive_threshold_validation():
    with pytest.raises(ValueError, match=r"target_boundary_ratio=0 must be in \(0, 1\]"):
        AdaptiveEntropyThreshold(target_boundary_ratio=0)
    with pytest.raises(ValueError, match="initial_threshold=0.0"):
        AdaptiveEntropyThreshold(initial_threshold=0.0)
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        AdaptiveEntropyThreshold(ema_decay=1.0)
