"""The relay-to-relay header: pure functions over bytes, any chunking, strict, bounded."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.errors import STATUS_FORBIDDEN, STATUS_NAMES, STATUS_OK, ProtocolError
from relay.core.protocol import (
    MAGIC,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    REQUEST_FIXED,
    TYPE_CONTINUE,
    TYPE_REPLY,
    TYPE_REQUEST,
    VERSION,
    Continue,
    Reply,
    ReplyReader,
    Request,
    RequestReader,
    UnsupportedVersion,
    encode_reply,
    encode_request,
)
from tests.fuzz.invariants import check_header_reader

REQ = Request("hvA", "migration.sock", 42)
CONT = Continue("hvA", "migration.sock", 42)


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


def test_continue_whole() -> None:
    reader = RequestReader()
    assert reader.feed(encode_request(CONT)) == CONT
    assert isinstance(reader.message, Continue) and reader.trailing == b""


def test_continue_byte_by_byte() -> None:
    reader = RequestReader()
    data = encode_request(CONT)
    for i, byte in enumerate(data):
        result = reader.feed(bytes([byte]))
        assert (result is None) == (i < len(data) - 1)
    assert reader.message == CONT


def test_continue_trailing_bytes_are_handed_back() -> None:
    """After the switch the peer may write at once: those bytes belong to the stream."""
    reader = RequestReader()
    assert reader.feed(encode_request(CONT) + b"payload on the fresh connection") == CONT
    assert reader.trailing == b"payload on the fresh connection"


def test_continue_is_the_request_layout_with_its_own_type() -> None:
    request, cont = encode_request(REQ), encode_request(CONT)
    assert (request[5], cont[5]) == (TYPE_REQUEST, TYPE_CONTINUE)
    assert request[:5] + request[6:] == cont[:5] + cont[6:]
    assert RequestReader().feed(request) != RequestReader().feed(cont)  # never taken for one another


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
    with pytest.raises(ProtocolError, match="unexpected header type 3"):
        ReplyReader().feed(encode_request(CONT))
    with pytest.raises(ProtocolError, match=r"unexpected header type 2 \(expected 1 or 3\)"):
        RequestReader().feed(encode_reply(Reply(STATUS_OK)))
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
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x10FFFF, exclude_categories=["Cs"]), min_size=1
).filter(lambda s: len(s.encode()) <= 255)
hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    kind=st.sampled_from([Request, Continue]),
    source=hosts,
    name=names,
    stream_id=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_request_round_trip_any_split(
    kind: type[Request | Continue], source: str, name: str, stream_id: int, data: st.DataObject
) -> None:
    req = kind(source, name, stream_id)
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


# --- fuzzing: any input ends in a message or a refusal, on the right byte, within the cap ---------
# The checks live in tests/fuzz/invariants.py, shared with the atheris targets (tests/fuzz/run.py).

cut_lists = st.lists(st.integers(0, 1200), max_size=8)


def mostly(valid: st.SearchStrategy[int], bits: int) -> st.SearchStrategy[int]:
    """A field that is usually valid (so the input gets further) and sometimes anything."""
    return st.one_of(valid, valid, valid, st.integers(0, 2**bits - 1))


@st.composite
def request_wires(draw: st.DrawFn) -> bytes:
    """Request (and Continue) headers with any field possibly wrong, and trailing bytes."""
    source = draw(st.one_of(hosts, hosts, names)).encode()  # sometimes not a relay name
    name = draw(names).encode()
    fixed = struct.pack(
        ">4sBBHHQ",
        draw(st.sampled_from([MAGIC, MAGIC, MAGIC, b"MGRX", b"\x16\x03\x01\x02"])),
        draw(mostly(st.just(VERSION), 8)),
        draw(mostly(st.sampled_from([TYPE_REQUEST, TYPE_CONTINUE]), 8)),
        draw(mostly(st.just(len(source)), 16)),
        draw(mostly(st.just(len(name)), 16)),
        draw(st.integers(0, 2**64 - 1)),
    )
    return fixed + source + name + draw(st.binary(max_size=20))


@st.composite
def reply_wires(draw: st.DrawFn) -> bytes:
    """Reply headers (pad byte included) with any field possibly wrong, and trailing bytes."""
    reason = draw(st.one_of(st.text(max_size=100), st.text(min_size=1000, max_size=1100))).encode()
    fixed = struct.pack(
        ">4sBBBBH",
        draw(st.sampled_from([MAGIC, MAGIC, MAGIC, b"HTTP"])),
        draw(mostly(st.just(VERSION), 8)),
        draw(mostly(st.just(TYPE_REPLY), 8)),
        draw(mostly(st.sampled_from(sorted(STATUS_NAMES)), 8)),
        draw(mostly(st.just(0), 8)),
        draw(mostly(st.just(len(reason)), 16)),
    )
    return fixed + reason + draw(st.binary(max_size=20))


@given(blob=st.binary(max_size=700), cuts=cut_lists, reply=st.booleans())
def test_any_bytes_in_any_chunks(blob: bytes, cuts: list[int], reply: bool) -> None:
    check_header_reader(blob, cuts, reply)


@given(wire=request_wires(), cuts=cut_lists)
def test_any_request_header_in_any_chunks(wire: bytes, cuts: list[int]) -> None:
    check_header_reader(wire, cuts, reply=False)


@given(wire=reply_wires(), cuts=cut_lists)
def test_any_reply_header_in_any_chunks(wire: bytes, cuts: list[int]) -> None:
    check_header_reader(wire, cuts, reply=True)


@given(wire=st.one_of(request_wires(), reply_wires()))
def test_refused_on_the_first_wrong_byte(wire: bytes) -> None:
    """Byte by byte: a wrong magic, version, type, status or length is refused on that very byte
    (a relay must not wait, handshake timeout long, for the rest of a header it already refuses)."""
    check_header_reader(wire, range(len(wire)), reply=wire[5:6] == bytes([TYPE_REPLY]))


@given(source=hosts, name=names, stream_id=st.integers(0, 2**64 - 1), data=st.data())
def test_truncated_headers_wait_within_the_cap(source: str, name: str, stream_id: int, data: st.DataObject) -> None:
    for wire, reader, cap in (
        (encode_request(Request(source, name, stream_id)), RequestReader(), MAX_REQUEST_BYTES),
        (encode_reply(Reply(STATUS_FORBIDDEN, name)), ReplyReader(), MAX_REPLY_BYTES),
    ):
        cut = data.draw(st.integers(0, len(wire) - 1))
        for start in range(0, cut, 7):
            assert reader.feed(wire[start : min(start + 7, cut)]) is None
        assert reader.buffered == cut <= cap and reader.message is None and reader.wanted() >= 1


@given(version=st.integers(0, 255).filter(lambda v: v != VERSION), reply=st.booleans())
def test_wrong_version_is_refused_on_its_byte(version: int, reply: bool) -> None:
    wire = bytearray(encode_reply(Reply(STATUS_OK)) if reply else encode_request(REQ))
    wire[4] = version
    reader = ReplyReader() if reply else RequestReader()
    assert reader.feed(bytes(wire[:4])) is None
    with pytest.raises(UnsupportedVersion, match=f"version {version} is not supported"):
        reader.feed(bytes(wire[4:5]))
