"""The byte codec shared by every model: UTF-8 bytes with BLT's four special ids in front.

BLT convention (``bytelatent/tokenizers/constants.py``): BOE=0, BOS=1, EOS=2, PAD=3 and byte ``b`` -> ``b + 4``,
so the vocabulary has 260 entries and no tokenizer file is ever downloaded.

MVoT images extend the id space after the byte codec (:class:`VisualVocab`)::

    0..259              byte codec (BOE, BOS, EOS, PAD, bytes)
    260                 BOI  begin of image
    261                 EOI  end of image
    262..262 + K - 1    visual tokens: VQ-VAE code c is id 262 + c

Pure id arithmetic: the bottom layer of the package, importing nothing from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 3
OFFSET = 4  # byte value b is token id b + OFFSET
VOCAB_SIZE = 256 + OFFSET  # 260

SPECIAL_NAMES = {BOE_ID: "<boe>", BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}


def ids_from_bytes(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Raw bytes -> ``(N,)`` int64 token ids (byte + 4). Any byte sequence is valid input."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return raw.long() + OFFSET


def encode(text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """UTF-8 encode ``text`` into ``(N,)`` int64 ids, optionally framed by BOS/EOS.

    Lone surrogates (which are not valid UTF-8) are written with ``surrogatepass`` so nothing is dropped.
    """
    ids = ids_from_bytes(text.encode("utf-8", errors="surrogatepass"))
    parts = [torch.tensor([BOS_ID])] if bos else []
    parts.append(ids)
    if eos:
        parts.append(torch.tensor([EOS_ID]))
    return torch.cat(parts) if len(parts) > 1 else ids


def bytes_from_ids(ids: torch.Tensor | Sequence[int] | Iterable[int]) -> bytes:
    """Token ids -> raw bytes. Special ids and out-of-range ids are dropped (they are not bytes)."""
    t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids).reshape(-1).long()
    t = t[(t >= OFFSET) & (t < VOCAB_SIZE)] - OFFSET
    return bytes(t.to(torch.uint8).tolist())


def decode(ids: torch.Tensor | Sequence[int] | Iterable[int], stop_at_eos: bool = True) -> str:
    """Token ids -> text. Never raises: invalid UTF-8 becomes U+FFFD, specials are skipped.

    Args:
        ids: ``(N,)`` integer ids (a tensor, list or any iterable).
        stop_at_eos: cut the sequence at the first EOS id, as generation does.
    """
    t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids).reshape(-1).long()
    if stop_at_eos:
        eos = (t == EOS_ID).nonzero()
        if len(eos):
            t = t[: eos[0, 0]]
    return bytes_from_ids(t).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class VisualVocab:
    """The id layout of a byte stream with images of ``grid = (h, w)`` codes from a codebook of ``codebook_size``."""

    codebook_size: int
    grid: tuple[int, int] = (8, 8)
    text_vocab: int = VOCAB_SIZE  # the byte codec's ids come first, unchanged

    def __post_init__(self) -> None:
        if self.codebook_size < 1:
            raise ValueError(f"visual_vocab_size={self.codebook_size} must be >= 1")
        h, w = self.grid
        if h < 1 or w < 1:
            raise ValueError(f"image token grid (h, w)={tuple(self.grid)} must be positive")

    @property
    def boi(self) -> int:
        return self.text_vocab

    @property
    def eoi(self) -> int:
        return self.text_vocab + 1

    @property
    def offset(self) -> int:
        """Id of code 0."""
        return self.text_vocab + 2

    @property
    def vocab_size(self) -> int:
        return self.offset + self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_length(self) -> int:
        """Ids of one image in the stream: BOI + h w codes + EOI."""
        return self.tokens_per_image + 2

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.offset) & (ids < self.vocab_size)

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, h w + 2) ids: BOI, the codes in raster order, EOI."""
        b = codes.shape[0]
        flat = rearrange(codes, "b h w -> b (h w)") + self.offset
        boi = torch.full((b, 1), self.boi, dtype=torch.long, device=codes.device)
        eoi = torch.full((b, 1), self.eoi, dtype=torch.long, device=codes.device)
        return torch.cat([boi, flat.long(), eoi], dim=1)

    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h w) visual ids -> (B, h, w) codes (ids outside the visual range are clamped into it)."""
        h, w = self.grid
        codes = (ids - self.offset).clamp(0, self.codebook_size - 1)
        return rearrange(codes, "b (h w) -> b h w", h=h, w=w)

    def segments(self, ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Split one stream (T,) into ``("text", ids)`` and ``("image", (h, w) codes)`` pieces, in order. An image
        that is not exactly ``h w`` visual ids between BOI and EOI (e.g. cut off) is returned as ``("broken", ids)``.
        A loop over the few images of one sequence (post-processing, not a forward pass)."""
        ids = ids.reshape(-1).cpu()
        marks = torch.nonzero((ids == self.boi) | (ids == self.eoi)).flatten().tolist()
        out: list[tuple[str, torch.Tensor]] = []
        pos, inside = 0, False
        for m in marks + [len(ids)]:
            piece = ids[pos:m]
            if inside:
                closed = m < len(ids) and int(ids[m]) == self.eoi
                if closed and len(piece) == self.tokens_per_image and bool(self.is_visual(piece).all()):
                    out.append(("image", self.codes_from_ids(piece[None])[0]))
                else:
                    out.append(("broken", piece))
            elif len(piece):
                out.append(("text", piece))
            if m < len(ids):
                inside = int(ids[m]) == self.boi
            pos = m + 1
        return out
