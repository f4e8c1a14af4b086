"""The relay-to-relay header: pure functions over bytes, any chunking, strict, bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import STATUS_FORBIDDEN, STATUS_NAMES, STATUS_OK, ProtocolError
from relay.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    REQUEST_FIXED,
    Reply,
    ReplyReader,
    Request,
    RequestReader,
    UnsupportedVersion,
    encode_reply,
    encode_request,
)

REQ = Request("hvA", "migration.sock", 42)


def test_request_whole() -> None:
    reader = RequestReader()
    assert reader.feed(encode_request(REQ)) == REQ
    assert reader.trailing == b""


def test_request_byte_by_byte() -> None:
    reader = RequestReader()
    data = encode_request(REQ)
    for i, byte in enumerate(data):
        result = reader.feed(bytes([byte]))
        assert (result is None) == (i < len(data) - 1)
    assert reader.message == REQ


def test_trailing_bytes_are_handed_back() -> None:
    reader = RequestReader()
    assert reader.feed(encode_request(REQ) + b"first payload") == REQ
    assert reader.trailing == b"first payload"


def test_wanted_never_overshoots_the_header() -> None:
    reader = RequestReader()
    data = encode_request(REQ)
    pos = 0
    while reader.message is None:
        want = reader.wanted()
        assert pos + want <= len(data)
        reader.feed(data[pos : pos + want])
        pos += want
    assert pos == len(data)


def test_reply_whole_and_split() -> None:
    reply = Reply(STATUS_FORBIDDEN, "channel 'x.sock' is not allowed for this peer")
    data = encode_reply(reply)
    assert ReplyReader().feed(data) == reply
    reader = ReplyReader()
    assert reader.feed(data[:3]) is None
    assert reader.feed(data[3:] + b"NBDMAGIC") == reply
    assert reader.trailing == b"NBDMAGIC"
    assert Reply(STATUS_OK).ok and not reply.ok


def test_garbage_fails_on_the_first_bytes() -> None:
    with pytest.raises(ProtocolError, match="not a migrelay header"):
        RequestReader().feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="not a migrelay header"):
        RequestReader().feed(b"\x16")  # a TLS ClientHello on a plaintext listener


def test_other_version_is_its_own_error() -> None:
    data = bytearray(encode_request(REQ))
    data[4] = 9
    with pytest.raises(UnsupportedVersion, match="version 9"):
        RequestReader().feed(bytes(data))


def test_oversized_header_is_refused_before_it_is_buffered() -> None:
    fixed = REQUEST_FIXED.pack(b"MGRL", 1, 1, 3, 60000, 1)
    with pytest.raises(ProtocolError, match="too large"):
        RequestReader().feed(fixed)
    with pytest.raises(ValueError):
        encode_request(Request("hvA", "x" * 256, 1))
    assert MAX_REQUEST_BYTES < 1024 and MAX_REPLY_BYTES < 2048


def test_reply_type_confusion_and_bad_fields() -> None:
    with pytest.raises(ProtocolError, match="unexpected header type"):
        ReplyReader().feed(encode_request(REQ))
    bad_status = bytearray(encode_reply(Reply(STATUS_OK)))
    bad_status[6] = 200
    with pytest.raises(ProtocolError, match="unknown reply status"):
        ReplyReader().feed(bytes(bad_status))


def test_invalid_text_is_rejected() -> None:
    raw = bytearray(encode_request(Request("hvA", "ab", 1)))
    raw[-1] = 0xFF
    with pytest.raises(ProtocolError, match="UTF-8"):
        RequestReader().feed(bytes(raw))
    raw[-1] = 0
    with pytest.raises(ProtocolError, match="NUL"):
        RequestReader().feed(bytes(raw))
    bad_source = encode_request(Request("hvA", "ab", 1)).replace(b"hvA", b"h/A")
    with pytest.raises(ProtocolError, match="relay name"):
        RequestReader().feed(bad_source)


def test_feeding_after_completion_is_a_bug() -> None:
    reader = RequestReader()
    reader.feed(encode_request(REQ))
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


names = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), min_size=1
).filter(lambda s: len(s.encode()) <= 255)
hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(source=hosts, name=names, stream_id=st.integers(0, 2**64 - 1), data=st.data())
def test_request_round_trip_any_split(source: str, name: str, stream_id: int, data: st.DataObject) -> None:
    req = Request(source, name, stream_id)
    wire = encode_request(req) + b"tail"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = RequestReader()
    result = None
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if result is None and end > start:
            result = reader.feed(wire[start:end])
            if result is not None:
                assert reader.trailing + wire[end:] == b"tail"
    assert result == req


@given(status=st.sampled_from(sorted(STATUS_NAMES)), reason=st.text(max_size=300), data=st.data())
def test_reply_round_trip_any_split(status: int, reason: str, data: st.DataObject) -> None:
    reply = Reply(status, reason.replace("\x00", ""))
    wire = encode_reply(reply)
    cut = data.draw(st.integers(1, len(wire)))
    reader = ReplyReader()
    first = reader.feed(wire[:cut])
    assert (first if cut == len(wire) else reader.feed(wire[cut:])) == reply


@given(st.binary(max_size=600))
def test_fuzz_reader_never_crashes_or_overbuffers(blob: bytes) -> None:
    reader = RequestReader()
    try:
        reader.feed(blob)
    except ProtocolError:
        return
    assert len(blob) < MAX_REQUEST_BYTES or reader.message is not None
