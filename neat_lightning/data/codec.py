"""The byte codec shared by every model: UTF-8 bytes with BLT's four special ids in front.

BLT convention (``bytelatent/tokenizers/constants.py``): BOE=0, BOS=1, EOS=2, PAD=3 and byte ``b`` -> ``b + 4``,
so the vocabulary has 260 entries and no tokenizer file is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

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
