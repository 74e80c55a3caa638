import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neat_lightning import codec


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    ids = codec.encode(text)
    assert ids.dtype == torch.long
    if len(ids):
        assert int(ids.min()) >= codec.OFFSET and int(ids.max()) < codec.VOCAB_SIZE
    assert codec.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=400), max_size=64))
def test_decode_never_raises(ids):
    assert isinstance(codec.decode(ids), str)
    assert isinstance(codec.decode(torch.tensor(ids, dtype=torch.long)), str)


def test_blt_offsets_and_specials():
    assert (codec.BOE_ID, codec.BOS_ID, codec.EOS_ID, codec.PAD_ID, codec.VOCAB_SIZE) == (0, 1, 2, 3, 260)
    assert codec.encode("A").tolist() == [ord("A") + 4]
    assert codec.encode("é").tolist() == [0xC3 + 4, 0xA9 + 4]
    framed = codec.encode("hi", bos=True, eos=True).tolist()
    assert framed[0] == codec.BOS_ID and framed[-1] == codec.EOS_ID
    assert codec.decode(framed) == "hi"  # specials are not bytes: BOS is skipped, decoding stops at EOS


def test_decode_stops_at_eos_and_replaces_invalid_utf8():
    ids = codec.encode("ab").tolist() + [codec.EOS_ID] + codec.encode("cd").tolist()
    assert codec.decode(ids) == "ab"
    assert codec.decode(ids, stop_at_eos=False) == "abcd"
    assert codec.decode([0xFF + 4, ord("x") + 4]) == "\ufffdx"


def test_lone_surrogate_is_kept():
    assert codec.decode(codec.encode("a\ud800b")) == "a\ufffd\ufffd\ufffdb"  # surrogatepass bytes are not UTF-8
    assert len(codec.encode("a\ud800b")) == 5


@pytest.mark.parametrize("data", [b"", b"\x00\xff\xfe", bytes(range(256))])
def test_bytes_round_trip(data):
    assert codec.bytes_from_ids(codec.ids_from_bytes(data)) == data
