"""Id streams (`data/id_streams.py`): a store read by segments gives exactly the ids of the in-memory stream."""

import numpy as np
import pytest
import torch

from neat_lightning.codec import EOS_ID, PAD_ID
from neat_lightning.data.bytes import stream_from_documents
from neat_lightning.data.generators.corpus import Document
from neat_lightning.data.id_streams import SegmentIds, TensorIds, as_id_stream

DOCS = [Document("a", b"hello world"), Document("b", b""), Document("c", bytes(range(250, 256)) + b"xyz"),
        Document("d", b"q"), Document("e", b"the last document is longer than a window " * 3)]


def segments(docs):
    blob = b"".join(d.data for d in docs)
    lengths = np.array([len(d.data) for d in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return SegmentIds(lambda start, n: blob[start : start + n], starts, lengths)


@pytest.mark.parametrize("length", [1, 5, 17, 64])
def test_segments_read_the_same_ids_as_the_tensor_stream_at_every_start(length):
    tensor, lazy = TensorIds(stream_from_documents(DOCS)), segments(DOCS)
    assert len(tensor) == len(lazy) == sum(len(d.data) + 1 for d in DOCS)
    starts = torch.arange(len(tensor) + 3)  # past the end too: PAD
    assert torch.equal(lazy.windows(starts, length), tensor.windows(starts, length))
    for s in (0, 11, 12, len(tensor) - 1):
        assert np.array_equal(lazy.span(s, length), tensor.span(s, length))


def test_layout_is_bytes_plus_four_then_eos_and_pad_past_the_end():
    lazy = segments([Document("a", b"\x00\xff"), Document("b", b"")])
    assert lazy.windows(torch.tensor([0]), 6).tolist() == [[4, 259, EOS_ID, EOS_ID, PAD_ID, PAD_ID]]


def test_a_subset_of_segments_skips_the_others():
    """Training segments of a split: the bytes of held-out documents never appear."""
    blob = b"AAAAbbbbCCCC"
    lazy = SegmentIds(lambda s, n: blob[s : s + n], np.array([0, 8]), np.array([4, 4]))
    expected = stream_from_documents([Document("a", b"AAAA"), Document("c", b"CCCC")])
    assert torch.equal(lazy.windows(torch.tensor([0, 3]), 7), TensorIds(expected).windows(torch.tensor([0, 3]), 7))


def test_as_id_stream_wraps_tensors_and_refuses_others():
    assert isinstance(as_id_stream(torch.zeros(3, dtype=torch.int16)), TensorIds)
    lazy = segments(DOCS)
    assert as_id_stream(lazy) is lazy
    with pytest.raises(TypeError, match="expected a \\(N,\\) id tensor or an IdStream, got list"):
        as_id_stream([1, 2])
