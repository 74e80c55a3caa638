"""Titans neural memory: scan, chunked test-time updates against a loop reference, MAC block bypass, episodic buffer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neat_lightning.components.titans import (
    MemoryBlock,
    NeuralMemory,
    TitansConfig,
    associative_loss,
    linear_scan,
    memory_mlp,
)
from neat_lightning.components.transformer import Block, TransformerConfig, rope_angles


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
def test_linear_scan_matches_the_recurrence(n):
    torch.manual_seed(n)
    a, x, h0 = torch.rand(3, n), torch.randn(3, n, 4, 2), torch.randn(3, 4, 2)
    h, ref = linear_scan(a, x, h0), []
    for i in range(n):
        h0 = a[:, i, None, None] * h0 + x[:, i]
        ref.append(h0)
    torch.testing.assert_close(h, torch.stack(ref, dim=1))
    torch.testing.assert_close(linear_scan(a, x)[:, 0], x[:, 0])


def reference_memory(mem: NeuralMemory, x: torch.Tensor):
    """Eq. (10), (12), (13) with Python loops over chunks and autograd: the fast weights after each chunk."""
    c = mem.config.chunk_size
    _, k, v, lr = mem.project(x)  # projections (and the causal conv) are per token; the recurrence is checked here
    out = []
    for b in range(x.shape[0]):
        w0 = [w.detach().clone().requires_grad_(True) for w in mem.weights]
        weights, momentum, traj = [w.detach() for w in w0], [torch.zeros_like(w) for w in w0], []
        for start in range(0, x.shape[1], c):
            sl = slice(start, start + c)
            loss, _ = associative_loss(tuple(w0), k[b, sl], v[b, sl], lr[b, sl])
            grads = torch.autograd.grad(loss, w0)  # surprise at the call's start weights (mini-batch TTT)
            pooled = x[b, sl].mean(dim=0)
            eta = torch.sigmoid(mem.to_momentum(pooled))
            keep = torch.sigmoid(-mem.to_forget(pooled))
            momentum = [eta * m - g for m, g in zip(momentum, grads)]
            weights = [keep * w + m for w, m in zip(weights, momentum)]
            traj.append([w.detach() for w in weights])
        out.append(traj)
    return out


@pytest.mark.parametrize("depth, t", [(1, 32), (2, 32), (2, 37), (3, 9)])
def test_chunked_vectorised_updates_match_a_loop_reference(depth, t):
    torch.manual_seed(0)
    mem = NeuralMemory(16, TitansConfig(memory_depth=depth, dim_memory=8, chunk_size=8, memory_size=4))
    for lin in (mem.to_lr, mem.to_momentum, mem.to_forget):  # data-dependent gates, not constants
        torch.nn.init.normal_(lin.weight, std=0.5)
    x = torch.randn(2, t, 16)
    readout, state, stats = mem(x)
    ref = reference_memory(mem, x)
    for b in range(2):
        for w, w_ref in zip(state.weights, ref[b][-1]):
            torch.testing.assert_close(w[b], w_ref, rtol=1e-4, atol=1e-5)
    # chunk n reads the weights after chunk n - 1: the last chunk reads ref[-2]
    q = mem.project(x)[0]
    last = (t - 1) // 8 * 8
    expected = mem.to_out(memory_mlp(tuple(w[None] for w in ref[0][-2]), q[:1, last:])) if t > 8 else None
    if expected is not None:
        torch.testing.assert_close(readout[:1, last:], expected, rtol=1e-4, atol=1e-5)
    assert readout.shape == x.shape and stats.token_surprise.shape == (2, t)


def test_memory_reads_are_causal_and_the_state_continues_across_calls():
    torch.manual_seed(0)
    mem = NeuralMemory(16, TitansConfig(dim_memory=8, chunk_size=4, memory_size=4))
    x = torch.randn(1, 20, 16)
    y = mem(x)[0]
    x2 = x.clone()
    x2[:, 12:] = torch.randn(1, 8, 16)  # change the future: chunks 0..2 read the same memory
    torch.testing.assert_close(mem(x2)[0][:, :12], y[:, :12])
    _, state, _ = mem(x[:, :8])
    y_cont = mem(x[:, 8:], state)[0]
    assert not torch.allclose(y_cont, mem(x[:, 8:])[0])  # the carried state holds the first segment


def tiny_block(active: bool = True, persistent: int = 3) -> tuple[MemoryBlock, Block]:
    cfg = TransformerConfig(dim=16, heads=2, window=6, n_layers=1)
    torch.manual_seed(0)
    mb = MemoryBlock(cfg, TitansConfig(chunk_size=4, persistent_tokens=persistent, memory_size=8, dim_memory=8))
    mb.memory_active = active
    plain = Block(cfg)
    plain.load_state_dict(mb.state_dict(), strict=False)
    return mb, plain


def _rope(t: int, dim_head: int = 8):
    pos = torch.arange(t)
    return (*rope_angles(pos, dim_head), pos)


def test_switched_off_memory_block_is_exactly_the_plain_block():
    mb, plain = tiny_block(active=False)
    x = torch.randn(2, 13, 16)
    out, state, stats = mb.forward_memory(x, *_rope(13))
    assert torch.equal(out, plain(x, *_rope(13))) and torch.equal(mb(x, *_rope(13)), out)
    assert state is None and stats is None
    mb.memory_active = True
    assert not torch.allclose(mb(x, *_rope(13)), out)


@pytest.mark.parametrize("persistent", [0, 3])
def test_memory_block_is_causal_and_trains_every_part(persistent):
    mb, _ = tiny_block(persistent=persistent)
    x = torch.randn(2, 19, 16)
    out, _, stats = mb.forward_memory(x, *_rope(19))
    prefix, _, _ = mb.forward_memory(x[:, :11], *_rope(11))
    torch.testing.assert_close(prefix, out[:, :11], rtol=1e-5, atol=1e-6)
    (out.pow(2).mean() + stats.surprise).backward()
    no_grad = [n for n, p in mb.named_parameters() if p.numel() and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    with pytest.raises(ValueError, match="KV cache is not supported while the memory is active"):
        mb(x, *_rope(19), cache=object())


def test_episodic_buffer_keeps_the_most_surprising_items_and_consolidates():
    torch.manual_seed(0)
    mem = NeuralMemory(8, TitansConfig(dim_memory=4, chunk_size=4, memory_size=3, surprise_threshold=0.5,
                                       importance_decay=1.0))
    keys, values = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    surprise = torch.tensor([[0.1, 0.9, 2.0, 0.6, 1.5]])
    assert mem.record_items(keys, values, surprise) == 4
    snap = mem.snapshot()
    assert sorted(snap["importance"].tolist()) == pytest.approx([0.9, 1.5, 2.0])
    assert torch.equal(snap["keys"][snap["importance"] == 2.0][0], keys[0, 2])
    assert float(mem.utilization()) == 1.0
    loss = mem.consolidation_loss()
    loss.backward()
    assert all(w.grad is not None for w in mem.weights) and mem.to_q.weight.grad is None
    mem.clear_episodic()
    assert mem.consolidation_loss() is None and float(mem.utilization()) == 0.0
    assert mem.record_items(keys, values, surprise * 0) == 0


def test_record_during_forward_fills_the_buffer():
    mem = NeuralMemory(8, TitansConfig(dim_memory=4, chunk_size=4, memory_size=16, surprise_threshold=0.0))
    mem(torch.randn(2, 6, 8), record=True)
    assert int((mem.episodic_importance > 0).sum()) == 12


def test_causal_conv_puts_the_previous_bytes_into_a_key_and_never_the_next_ones():
    torch.manual_seed(0)
    mem = NeuralMemory(16, TitansConfig(dim_memory=8, chunk_size=4, memory_size=4, conv_kernel=3))
    x = torch.randn(1, 10, 16)
    q, k, v, _ = mem.project(x)
    x2 = x.clone()
    x2[:, 5] = torch.randn(16)  # byte 5 reaches the keys of bytes 5, 6, 7 and no others
    q2, k2, v2, _ = mem.project(x2)
    changed = [t for t in range(10) if not torch.allclose(k[0, t], k2[0, t])]
    assert changed == [5, 6, 7] and torch.allclose(q[:, :5], q2[:, :5]) and torch.allclose(v[:, 8:], v2[:, 8:])
    plain = NeuralMemory(16, TitansConfig(dim_memory=8, chunk_size=4, memory_size=4, conv_kernel=0))
    assert plain.conv is None
    assert [t for t in range(10) if not torch.allclose(plain.project(x)[1][0, t], plain.project(x2)[1][0, t])] == [5]


def test_readout_gate_adds_the_readouts_to_the_residual_stream():
    cfg = TransformerConfig(dim=16, heads=2, window=6, n_layers=1)
    tc = TitansConfig(chunk_size=4, persistent_tokens=2, memory_size=8, dim_memory=8, readout_gate=False)
    torch.manual_seed(0)
    gated = MemoryBlock(cfg, dataclasses.replace(tc, readout_gate=True))
    plain = MemoryBlock(cfg, tc)
    assert plain.readout_gate is None
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(2, 13, 16)
    assert torch.equal(gated.readout_gate, torch.ones(16))  # open from the start
    out = gated.forward_memory(x, *_rope(13))[0]
    assert not torch.allclose(out, plain.forward_memory(x, *_rope(13))[0])
    out.pow(2).mean().backward()
    assert gated.readout_gate.grad.abs().sum() > 0 and gated.memory.to_q.weight.grad.abs().sum() > 0
    with torch.no_grad():
        gated.readout_gate.zero_()  # a closed gate adds exactly nothing
    assert torch.equal(gated.forward_memory(x, *_rope(13))[0], plain.forward_memory(x, *_rope(13))[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"chunk_size": 0}, r"TitansConfig.chunk_size=0 must be >= 1"),
     ({"persistent_tokens": -1}, r"TitansConfig.persistent_tokens=-1 must be >= 0"),
     ({"importance_decay": 0.0}, r"TitansConfig.importance_decay=0.0 must be in \(0, 1\]"),
     ({"max_lr": 0}, r"TitansConfig.max_lr=0 must be > 0"),
     ({"conv_kernel": -1}, r"TitansConfig.conv_kernel=-1 must be >= 0")],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TitansConfig(**kwargs)
