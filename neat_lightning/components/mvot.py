"""MVoT: visual tokens in the byte stream (Li et al. 2025, "Imagine while Reasoning in Space: Multimodal
Visualization-of-Thought", arXiv 2501.07542).

Images enter the byte stream as VQ-VAE codes in their own id range after the 260 byte-codec ids::

    0..259              byte codec (BOE, BOS, EOS, PAD, bytes)
    260                 BOI  begin of image
    261                 EOI  end of image
    262..262 + K - 1    visual tokens: VQ-VAE code c is id 262 + c

An image is ``BOI`` + its ``h * w`` codes in raster order + ``EOI``. This file holds the layout
(:class:`~neat_lightning.codec.VisualVocab`), the token discrepancy loss (:func:`token_discrepancy_loss`), the visualization-decision
head, constrained decoding inside images (:func:`constrain_logits`, :func:`advance`) and :class:`MVoTPath`, the
``nn.Module`` a model carries: the frozen VQ-VAE, the codebook distances and the decision head. Plain ``torch``;
the VQ-VAE is any module with ``encode`` / ``decode`` / ``codebook_distances`` (``modules.VQVAE``).

Axis legend: ``b`` batch, ``t`` positions, ``v`` vocabulary, ``k`` / ``j`` codes, ``h`` ``w`` token grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neat_lightning.codec import PAD_ID, VisualVocab

NO_IMAGE = -1  # decoding state of a row that is writing text (see :func:`advance`)


class MVoTLosses(NamedTuple):
    """What :meth:`MVoTPath.losses` returns: the two losses and detached counts for accuracies."""

    loss_d: torch.Tensor  # () token discrepancy loss L_D over visual targets
    decision_loss: torch.Tensor  # () the decision head's binary cross-entropy
    visual_correct: torch.Tensor  # () int64 argmax hits over visual targets
    visual_total: torch.Tensor  # () int64 visual targets
    decision_correct: torch.Tensor  # () int64 right "image next?" decisions
    decision_total: torch.Tensor  # () int64 positions the decision head is trained on


def token_discrepancy_loss(
    logits: torch.Tensor, targets: torch.Tensor, distances: torch.Tensor, vocab: VisualVocab
) -> torch.Tensor:
    """MVoT's token discrepancy loss over the positions whose target is a visual token.

    ``L_D = mean_i sum_j D[t_i, j] softmax(logits_i over visual tokens)_j`` (MVoT eq. 3): the expected codebook
    distance between the target code and the predicted code distribution, so a near-miss costs less than a far one.

    Args:
        logits: (B, T, V) next-token logits over the whole vocabulary.
        targets: (B, T) target ids.
        distances: (K, K) distances between codebook embeddings (``VQVAE.codebook_distances()``).
        vocab: the id layout.

    Returns:
        () float; 0 (still differentiable) when no target is visual.
    """
    visual = vocab.is_visual(targets)  # (B, T)
    lo, hi = vocab.offset, vocab.vocab_size
    probs = F.softmax(logits[visual][:, lo:hi].float(), dim=-1)  # (N, K)
    rows = distances[targets[visual] - lo]  # (N, K) D[t_i, :]
    per_position = (rows * probs).sum(-1)  # (N,)
    if per_position.numel() == 0:
        return logits.sum() * 0.0
    return per_position.mean()


def decision_targets(targets: torch.Tensor, vocab: VisualVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the visualization-decision head: at every position that writes text (target a byte-codec id
    other than PAD, or BOI), ``1`` when the next token is BOI. Returns (B, T) float targets and (B, T) bool mask."""
    text = (targets < vocab.text_vocab) & (targets != PAD_ID)
    boi = targets == vocab.boi
    return boi.float(), text | boi


def constrain_logits(
    logits: torch.Tensor, count: torch.Tensor, decide: torch.Tensor, vocab: VisualVocab
) -> torch.Tensor:
    """Mask next-token logits to what the grammar allows (MVoT's interleaved decoding).

    * writing text (``count == NO_IMAGE``): BOI when the decision head says so (``decide``), else a byte-codec id;
    * inside an image with ``count < h w`` codes written: a visual token;
    * inside an image with all ``h w`` codes written: EOI.

    Args:
        logits: (B, V) next-token logits.
        count: (B,) int64 codes written in the current image, or ``NO_IMAGE``.
        decide: (B,) bool, the decision head's "emit an image now".
        vocab: the id layout.

    Returns:
        (B, V) logits with disallowed ids at ``-inf``.
    """
    v = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
    text_ids = v < vocab.text_vocab
    in_text = (count == NO_IMAGE)[:, None]
    allowed = torch.where(
        in_text,
        torch.where(decide[:, None], v == vocab.boi, text_ids),
        torch.where((count < vocab.tokens_per_image)[:, None], vocab.is_visual(v), v == vocab.eoi),
    )  # (B, V)
    return logits.masked_fill(~allowed, float("-inf"))


def advance(count: torch.Tensor, token: torch.Tensor, vocab: VisualVocab) -> torch.Tensor:
    """Decoding state after ``token`` (B,): BOI opens an image (count 0), a visual token counts, EOI closes it."""
    count = torch.where(vocab.is_visual(token) & (count >= 0), count + 1, count)
    count = torch.where(token == vocab.boi, torch.zeros_like(count), count)
    return torch.where(token == vocab.eoi, torch.full_like(count, NO_IMAGE), count)


def image_counts(ids: torch.Tensor, vocab: VisualVocab) -> torch.Tensor:
    """Decoding state at the end of prompts (B, T): codes written in the open image, or ``NO_IMAGE``."""
    t = ids.shape[1]
    pos = torch.arange(t, device=ids.device)
    last_boi = torch.where(ids == vocab.boi, pos, -1).amax(dim=1)  # (B,)
    last_eoi = torch.where(ids == vocab.eoi, pos, -1).amax(dim=1)
    inside = last_boi > last_eoi
    return torch.where(inside, t - 1 - last_boi, torch.full_like(last_boi, NO_IMAGE))


class FrozenModule(nn.Module):
    """Holds a module that stays frozen and in eval mode whatever ``train()`` the parent calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenModule:
        super().train(False)
        return self


class MVoTPath(nn.Module):
    """The visual-token path of a byte model: frozen VQ-VAE, codebook distances, visualization-decision head.

    Args:
        vqvae: a trained VQ-VAE (``encode``, ``decode``, ``codebook_distances``, ``codebook_size``); frozen here.
        dim: the model width the decision head reads.
        grid: (h, w) tokens per image.
    """

    def __init__(self, vqvae: nn.Module, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.vocab = VisualVocab(int(vqvae.codebook_size), tuple(grid))
        self.frozen = FrozenModule(vqvae)
        # (K, K) is 268 MB at K = 8192: not saved, but recomputed from the frozen codebook the checkpoint does carry
        self.register_buffer("distances", vqvae.codebook_distances().float().clone(), persistent=False)
        self.decision = nn.Linear(dim, 1)  # hidden (B, T, C) -> logit of "the next token is BOI"
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_distances())

    @torch.no_grad()
    def _refresh_distances(self) -> None:
        self.distances.copy_(self.vqvae.codebook_distances().float())

    @property
    def vqvae(self) -> nn.Module:
        return self.frozen.module

    def losses(self, logits: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> MVoTLosses:
        """L_D, the decision head's BCE, and (detached) counts for accuracies.

        Args:
            logits: (B, T, V) next-token logits; hidden: (B, T, C) final hidden states; targets: (B, T) ids.

        Returns:
            :class:`MVoTLosses`.
        """
        loss_d = token_discrepancy_loss(logits, targets, self.distances, self.vocab)
        decision_logits = self.decision(hidden).squeeze(-1)  # (B, T)
        want, mask = decision_targets(targets, self.vocab)
        n = mask.sum()
        bce = F.binary_cross_entropy_with_logits(decision_logits.float(), want, reduction="none")
        decision_loss = (bce * mask).sum() / n.clamp_min(1)
        visual = self.vocab.is_visual(targets)
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets) & visual
            decided = ((decision_logits > 0) == want.bool()) & mask
        return MVoTLosses(loss_d, decision_loss, hit.sum(), visual.sum(), decided.sum(), n)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W) images in [0, 1] through the frozen VQ-VAE."""
        return self.vqvae.decode(codes)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, h w + 2) image ids (BOI, codes, EOI)."""
        return self.vocab.image_ids(self.vqvae.encode(images))
