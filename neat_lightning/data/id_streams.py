"""Id streams: what the byte-window batchers of :mod:`neat_lightning.data.bytes` read windows from.

A stream is a sequence of ``len(stream)`` token ids (the codec's: byte b -> b + 4, EOS after every document) that
is only ever read by windows, so it need not exist in memory:

* :class:`TensorIds` -- a (N,) integer tensor held in RAM (the in-memory corpora, scenes);
* :class:`SegmentIds` -- segments of a byte source (e.g. a :class:`~neat_lightning.data.byte_store.ByteStore` on
  disk), each followed by EOS; only the windows asked for are read. Its RAM is four int64 per segment.

Both give the same ids for the same documents, so a batcher draws identical windows from either for the same seed.
Plain torch and numpy: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from neat_lightning.codec import EOS_ID, OFFSET, PAD_ID


class IdStream:
    """Base of the id streams: ``len()`` ids, read by :meth:`windows`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def span(self, start: int, length: int) -> np.ndarray:
        """Ids ``start .. start + length - 1`` as a (length,) int64 array, PAD past the end of the stream."""
        raise NotImplementedError

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Windows of ``length`` ids starting at ``starts``.

        Args:
            starts: (B,) int64 stream positions.
            length: ids per window (``block_size + 1`` for inputs plus shifted targets).

        Returns:
            (B, length) int64 ids; positions at or past ``len(self)`` hold PAD.
        """
        rows = [self.span(int(s), length) for s in starts.tolist()]
        if not rows:
            return torch.empty(0, length, dtype=torch.long)
        return torch.from_numpy(np.stack(rows))


class TensorIds(IdStream):
    """An id stream held in RAM as a (N,) integer tensor (int16 is enough for the 260 codec ids)."""

    def __init__(self, stream: torch.Tensor) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        positions = starts[:, None] + torch.arange(length)  # (B, length)
        inside = positions < len(self.stream)
        if bool(inside.all()):
            return self.stream[positions].long()
        ids = self.stream[positions.clamp(max=max(len(self.stream) - 1, 0))].long()
        return ids.masked_fill(~inside, PAD_ID)

    def span(self, start: int, length: int) -> np.ndarray:
        return self.windows(torch.tensor([start]), length)[0].numpy()


class SegmentIds(IdStream):
    """Segments of a byte source, each followed by EOS, read lazily.

    Segment ``i`` is bytes ``starts[i] .. starts[i] + lengths[i] - 1`` of the source; in the stream it is those bytes
    as ids (b + 4) followed by one EOS, exactly as :func:`neat_lightning.data.bytes.stream_from_documents` lays out
    documents. A window is read with one ``read`` per segment it touches (one for windows inside a document).

    Args:
        read: ``read(start, n) -> bytes``, exactly ``n`` bytes of the source from byte ``start``.
        starts: (S,) int64 byte offsets of the segments in the source.
        lengths: (S,) int64 segment lengths in bytes.
    """

    def __init__(self, read: Callable[[int, int], bytes], starts: np.ndarray, lengths: np.ndarray) -> None:
        self.read = read
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        assert self.starts.shape == self.lengths.shape, (self.starts.shape, self.lengths.shape)
        # stream position where segment i begins; the last entry is the stream length
        self.bounds = np.concatenate([[0], np.cumsum(self.lengths + 1)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def n_bytes(self) -> int:
        return int(self.lengths.sum())

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        pos = starts.numpy().astype(np.int64)  # (B,)
        if len(self.lengths) == 0:
            return torch.full((len(pos), length), PAD_ID, dtype=torch.long)
        # (B,) segment of each window's first id (the last one for windows that start past the end)
        seg = np.minimum(np.searchsorted(self.bounds, pos, side="right") - 1, len(self.lengths) - 1)
        offset = pos - self.bounds[seg]
        inside = offset + length <= self.lengths[seg]  # the whole window is bytes of one segment: one read
        out = np.empty((len(pos), length), dtype=np.int64)
        rows = np.flatnonzero(inside)
        if len(rows):
            first = (self.starts[seg[rows]] + offset[rows]).tolist()
            blob = b"".join([self.read(b, length) for b in first])
            out[rows] = np.frombuffer(blob, dtype=np.uint8).reshape(len(rows), length)
            out[rows] += OFFSET
        for row in np.flatnonzero(~inside).tolist():  # windows that cross an EOS or run past the end
            out[row] = self.span(int(pos[row]), length)
        return torch.from_numpy(out)

    def span(self, start: int, length: int) -> np.ndarray:
        out = np.full(length, PAD_ID, dtype=np.int64)
        end = min(start + length, len(self))
        pos = start
        seg = int(np.searchsorted(self.bounds, pos, side="right")) - 1
        while pos < end:
            offset = pos - int(self.bounds[seg])
            seg_len = int(self.lengths[seg])
            if offset < seg_len:  # bytes of segment `seg`
                n = min(seg_len - offset, end - pos)
                chunk = np.frombuffer(self.read(int(self.starts[seg]) + offset, n), dtype=np.uint8)
                out[pos - start : pos - start + n] = chunk
                out[pos - start : pos - start + n] += OFFSET
                pos += n
            else:  # the EOS closing segment `seg`
                out[pos - start] = EOS_ID
                pos += 1
                seg += 1
        return out


def as_id_stream(stream: torch.Tensor | IdStream) -> IdStream:
    """A tensor becomes a :class:`TensorIds`; an :class:`IdStream` is returned as it is."""
    if isinstance(stream, IdStream):
        return stream
    if isinstance(stream, torch.Tensor):
        return TensorIds(stream)
    raise TypeError(f"expected a (N,) id tensor or an IdStream, got {type(stream).__name__}")
