"""MVoT pieces: the id layout, L_D against its definition, the decision targets, constrained decoding states."""

from __future__ import annotations

import pytest
import torch

from neat_lightning.components.mvot import (
    NO_IMAGE,
    VisualVocab,
    advance,
    constrain_logits,
    decision_targets,
    image_counts,
    token_discrepancy_loss,
)
from neat_lightning.codec import PAD_ID, VOCAB_SIZE, encode

VOCAB = VisualVocab(codebook_size=6, grid=(2, 2))


def test_layout_follows_the_byte_codec():
    assert (VOCAB.boi, VOCAB.eoi, VOCAB.offset, VOCAB.vocab_size) == (VOCAB_SIZE, VOCAB_SIZE + 1, 262, 268)
    codes = torch.randint(0, 6, (3, 2, 2))
    ids = VOCAB.image_ids(codes)
    assert ids.shape == (3, VOCAB.image_length) and VOCAB.is_visual(ids[:, 1:-1]).all()
    assert (ids[:, 0] == VOCAB.boi).all() and (ids[:, -1] == VOCAB.eoi).all()
    assert torch.equal(VOCAB.codes_from_ids(ids[:, 1:-1]), codes)
    with pytest.raises(ValueError, match=r"visual_vocab_size=0 must be >= 1"):
        VisualVocab(0)


def test_segments_split_text_and_images_and_flag_broken_ones():
    codes = torch.tensor([[[1, 2], [3, 4]]])
    stream = torch.cat([encode("go"), VOCAB.image_ids(codes)[0], encode("!"), VOCAB.image_ids(codes)[0][:3]])
    kinds = [(k, v.tolist()) for k, v in VOCAB.segments(stream)]
    assert kinds == [("text", encode("go").tolist()), ("image", codes[0].tolist()), ("text", encode("!").tolist()),
                     ("broken", (codes[0].flatten()[:2] + VOCAB.offset).tolist())]


def test_token_discrepancy_loss_matches_its_definition():
    torch.manual_seed(0)
    k = VOCAB.codebook_size
    emb = torch.randn(k, 3)
    dist = torch.cdist(emb, emb)
    logits = torch.randn(2, 5, VOCAB.vocab_size, requires_grad=True)
    targets = torch.tensor([[VOCAB.offset + 1, 7, VOCAB.offset + 5, VOCAB.boi, PAD_ID],
                            [VOCAB.offset, VOCAB.offset + 2, VOCAB.eoi, 9, VOCAB.offset + 3]])
    loss = token_discrepancy_loss(logits, targets, dist, VOCAB)
    terms = []  # the formula, position by position
    for b in range(2):
        for t in range(5):
            tgt = int(targets[b, t])
            if VOCAB.offset <= tgt < VOCAB.vocab_size:
                p = torch.softmax(logits[b, t, VOCAB.offset :], -1)
                terms.append((dist[tgt - VOCAB.offset] * p).sum())
    assert torch.allclose(loss, torch.stack(terms).mean())
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # text positions get no L_D gradient
    # all mass on the target code costs nothing; a far code costs more than a near one
    sharp = torch.full((1, 1, VOCAB.vocab_size), -1e4)
    sharp[0, 0, VOCAB.offset + 2] = 0.0
    target = torch.tensor([[VOCAB.offset + 2]])
    assert token_discrepancy_loss(sharp, target, dist, VOCAB) < 1e-6
    line = torch.arange(k, dtype=torch.float)[:, None]
    dline = torch.cdist(line, line)
    near, far = sharp.clone(), sharp.clone()
    near[0, 0, VOCAB.offset + 2], near[0, 0, VOCAB.offset + 3] = -1e4, 0.0
    far[0, 0, VOCAB.offset + 2], far[0, 0, VOCAB.offset + 5] = -1e4, 0.0
    assert token_discrepancy_loss(near, target, dline, VOCAB) < token_discrepancy_loss(far, target, dline, VOCAB)
    none = token_discrepancy_loss(logits, torch.full((2, 5), 7), dist, VOCAB)
    assert none == 0 and none.requires_grad


def test_decision_targets_mark_boi_among_text_positions():
    targets = torch.tensor([[7, VOCAB.boi, VOCAB.offset, VOCAB.eoi, PAD_ID, 8]])
    want, mask = decision_targets(targets, VOCAB)
    assert want.tolist() == [[0, 1, 0, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False, False, True]]


def test_constrained_decoding_writes_whole_images():
    """Whatever the logits say, BOI is followed by exactly h w visual tokens and EOI."""
    torch.manual_seed(1)
    count = torch.tensor([NO_IMAGE, NO_IMAGE])
    decide = torch.tensor([True, False])
    written = []
    for step in range(2 * (VOCAB.tokens_per_image + 2)):
        logits = torch.randn(2, VOCAB.vocab_size)
        logits[:, VOCAB.eoi] = 50.0  # a model that always wants to close images
        token = constrain_logits(logits, count, decide, VOCAB).argmax(-1)
        written.append(token)
        count = advance(count, token, VOCAB)
    rows = torch.stack(written, 1)
    first = rows[0, : VOCAB.image_length]
    assert first[0] == VOCAB.boi and VOCAB.is_visual(first[1:-1]).all() and first[-1] == VOCAB.eoi
    assert (rows[1] < VOCAB_SIZE).all()  # no decision: text only
    assert image_counts(rows[:, :3], VOCAB).tolist() == [2, NO_IMAGE]
    assert image_counts(rows[:, : VOCAB.image_length], VOCAB).tolist() == [NO_IMAGE, NO_IMAGE]


def test_codebook_distances_are_rebuilt_from_the_loaded_codebook_not_saved():
    from neat_lightning.components.mvot import MVoTPath
    from neat_lightning.modules import VQVAE

    def path(seed: int) -> MVoTPath:
        torch.manual_seed(seed)
        vq = VQVAE(channels=8, n_res_blocks=0, stem="patch", codebook_size=16, embed_dim=4, kmeans_init=False)
        return MVoTPath(vq, dim=8, grid=vq.grid_shape(32))

    source, target = path(0), path(0)
    state = source.state_dict()
    assert "distances" not in state
    state["frozen.module.quantizer.embed"] = 2 * state["frozen.module.quantizer.embed"]  # a different codebook
    target.load_state_dict(state)
    assert torch.allclose(target.distances, 2 * source.distances)
    assert torch.equal(target.distances, target.vqvae.codebook_distances())
