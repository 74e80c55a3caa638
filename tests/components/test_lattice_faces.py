import pytest
import torch

from neat_lightning.components.lattice import LatticeConfig, LatticeRule
from neat_lightning.components.lattice_faces import (
    FaceCrossAttention,
    FaceDecoder,
    FaceEncoder,
    FaceTextConfig,
    PointwiseAdapter,
    resample_face,
    resize_face_parameter,
)


def test_encoder_spells_the_question_across_the_face():
    torch.manual_seed(0)
    enc = FaceEncoder(channels=3, height=3, width=4, dim=16, heads=2, max_len=6)  # 2 cells per byte
    ids = torch.randint(4, 260, (2, 6))
    ids[:, 4:] = 3
    face = enc(ids, pad_id=3)
    assert face.shape == (2, 12, 3)
    assert torch.equal(enc(ids[:, :4], 3), face)  # trailing PAD writes nothing
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 256 + 4
    diff = (enc(changed, 3) - face).abs().sum((0, 2))
    assert (diff[:6] == 0).all() and (diff[6:8] > 0).all()  # causal: byte 3 changes cells 6, 7 only
    with pytest.raises(ValueError, match="max_len=13 question bytes do not fit on a 3x4 face"):
        FaceEncoder(channels=3, height=3, width=4, dim=16, heads=2, max_len=13)


def test_decoder_shapes_and_causality():
    torch.manual_seed(0)
    dec = FaceDecoder(channels=3, n_cells=6, dim=16, heads=2, n_layers=1, max_len=8)
    face = torch.randn(2, 6, 3)
    logits = dec(torch.randint(0, 260, (2, 5)), dec.memory(face))
    assert logits.shape == (2, 5, 260)
    a = torch.randint(4, 260, (1, 5))
    b = a.clone()
    b[0, 4] = (b[0, 4] + 1) % 260
    mem = dec.memory(face[:1])
    assert torch.allclose(dec(a, mem)[0, :4], dec(b, mem)[0, :4], atol=1e-6)


def test_cross_attention_respects_key_mask():
    torch.manual_seed(0)
    att = FaceCrossAttention(8, 2)
    x, mem = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    keep = torch.tensor([[True, True, False, False]])
    mem2 = mem.clone()
    mem2[:, 2:] = torch.randn(1, 2, 8)
    assert torch.allclose(att(x, mem, keep), att(x, mem2, keep), atol=1e-6)


def test_pointwise_adapter_matches_parameter_count():
    rule = LatticeRule(LatticeConfig(channels=8, hidden=16))
    n = sum(p.numel() for p in rule.parameters())
    adapter = PointwiseAdapter(8, n)
    assert abs(sum(p.numel() for p in adapter.parameters()) - n) <= 17  # within one hidden unit


def test_incremental_decoding_matches_full_forward():
    torch.manual_seed(0)
    dec = FaceDecoder(channels=3, n_cells=6, dim=16, heads=2, n_layers=2, max_len=8)
    mem = dec.memory(torch.randn(2, 6, 3))
    ids = torch.randint(4, 260, (2, 5))
    full = dec(ids, mem)
    caches, kvs = dec.make_caches(2, 5), dec.cross_keys_values(mem)
    steps = torch.cat([dec(ids[:, t : t + 1], None, t, caches, kvs) for t in range(5)], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)


def test_rotary_cross_attention_sees_offsets_and_decodes_incrementally():
    torch.manual_seed(0)
    dec = FaceDecoder(channels=3, n_cells=12, dim=16, heads=2, n_layers=2, max_len=8, cell_stride=2)
    mem = dec.memory(torch.randn(2, 12, 3))
    ids = torch.randint(4, 260, (2, 5))
    full = dec(ids, mem)
    caches, kvs = dec.make_caches(2, 5), dec.cross_keys_values(mem)
    steps = torch.cat([dec(ids[:, t : t + 1], None, t, caches, kvs) for t in range(5)], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)
    cos, sin = dec.cell_rope()
    assert torch.equal(cos[2 * 3], cos[2 * 3 + 1]) and not torch.equal(cos[0], cos[2])  # 2 cells per position
    plain = FaceDecoder(channels=3, n_cells=12, dim=16, heads=2, n_layers=2, max_len=8)
    assert plain.cell_rope() is None
    with pytest.raises(ValueError, match="cell_stride=0 must be >= 1"):
        FaceDecoder(channels=3, n_cells=12, dim=16, heads=2, n_layers=1, max_len=8, cell_stride=0)


def test_face_text_config_validation():
    with pytest.raises(ValueError, match="decoder_layers=0 must be >= 1"):
        FaceTextConfig(decoder_layers=0)


def test_resample_face_keeps_corners_and_resizes_in_place():
    torch.manual_seed(0)
    values = torch.randn(3 * 4, 5)
    out = resample_face(values, (3, 4), (6, 7))
    assert out.shape == (42, 5)
    grid, new = values.reshape(3, 4, 5), out.reshape(6, 7, 5)
    assert torch.allclose(new[0, 0], grid[0, 0]) and torch.allclose(new[-1, -1], grid[-1, -1], atol=1e-6)
    p = torch.nn.Parameter(values.clone())
    p.grad = torch.ones_like(p)
    obj = p
    resize_face_parameter(p, (3, 4), (6, 7), resample=True)
    assert p is obj and torch.equal(p.data, out) and p.grad is None
    resize_face_parameter(p, (6, 7), (2, 2), resample=False)
    assert p.shape == (4, 5) and (p == 0).all()


def test_encoder_and_decoder_resize_their_face_parameters():
    enc = FaceEncoder(channels=3, height=3, width=4, dim=16, heads=2, max_len=6)  # 2 cells per byte
    dec = FaceDecoder(channels=3, n_cells=12, dim=16, heads=2, n_layers=1, max_len=8)
    bias, pos = enc.cell_bias, dec.cell_pos
    enc.resize(4, 5, resample=True)
    dec.resize((3, 4), (4, 5), resample=True)
    assert enc.cell_bias is bias and bias.shape == (20, 3) and (enc.height, enc.width) == (4, 5)
    assert dec.cell_pos is pos and pos.shape == (20, 16)
    assert enc(torch.randint(4, 260, (1, 6)), 3).shape == (1, 20, 3)
    with pytest.raises(ValueError, match="a 2x5 face cannot hold the encoder's 6 bytes x 2 cells"):
        enc.resize(2, 5, resample=False)
    assert bias.shape == (20, 3)  # refused before anything changed
