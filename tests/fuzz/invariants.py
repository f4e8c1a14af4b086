"""What every input to the header readers and the control parser must end in, as plain checks.

The Hypothesis tests (tests/unit) and the atheris targets (tests/fuzz/run.py) call these same
functions, so both assert the same thing: the bytes, fed in the given chunks, yield a message
(and the reader hands back exactly the bytes after it) or a refusal of the documented type,
raised on the chunk where the input first went wrong; nothing else escapes, and a reader never
holds more than its cap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from relay.core import control_protocol
from relay.core.control_protocol import BadControlRequest, ControlRequest
from relay.core.errors import STATUS_NAMES, ProtocolError
from relay.core.overlay import MAX_NAME_BYTES
from relay.core.protocol import (
    MAGIC,
    MAX_REASON_BYTES,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    REPLY_FIXED,
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


def chunks(blob: bytes, cuts: Iterable[int]) -> list[tuple[int, bytes]]:
    """`blob` cut at the given offsets (clamped and sorted), as (offset, chunk) pairs; empty chunks kept."""
    points = sorted(min(max(c, 0), len(blob)) for c in cuts)
    edges = [0, *points, len(blob)]
    return [(start, blob[start:end]) for start, end in itertools.pairwise(edges)]


def _field(blob: bytes, offset: int) -> int:
    return int.from_bytes(blob[offset : offset + 2], "big")


def header_problem_at(blob: bytes, reply: bool) -> int | None:
    """An oracle written from the layout in protocol.py: the offset of the first byte at which
    `blob` can no longer start a valid header of its kind (bad magic, version, type, length or
    status field), or None if its fixed part is fine as far as it goes."""
    checks: list[tuple[int, bool]] = [(i, blob[i] == MAGIC[i]) for i in range(4) if i < len(blob)]
    if len(blob) > 4:
        checks.append((4, blob[4] == VERSION))
    if len(blob) > 5:
        checks.append((5, blob[5] in ((TYPE_REPLY,) if reply else (TYPE_REQUEST, TYPE_CONTINUE))))
    if reply:
        if len(blob) > 6:
            checks.append((6, blob[6] in STATUS_NAMES))
        if len(blob) > 7:
            checks.append((7, blob[7] == 0))  # the pad byte: reserved, so it must be 0
        if len(blob) > 9:
            checks.append((9, _field(blob, 8) <= MAX_REASON_BYTES))
    else:
        if len(blob) > 7:
            checks.append((7, 0 < _field(blob, 6) <= MAX_NAME_BYTES))
        if len(blob) > 9:
            checks.append((9, 0 < _field(blob, 8) <= MAX_NAME_BYTES))
    return next((offset for offset, ok in checks if not ok), None)


def header_length(blob: bytes, reply: bool) -> int | None:
    """The whole header's length, once its fixed part is in."""
    fixed = REPLY_FIXED if reply else REQUEST_FIXED
    if len(blob) < fixed.size:
        return None
    return fixed.size + (_field(blob, 8) if reply else _field(blob, 6) + _field(blob, 8))


def check_header_reader(blob: bytes, cuts: Iterable[int], reply: bool) -> Request | Continue | Reply | None:
    """Feed `blob` in chunks to a RequestReader (or ReplyReader); assert the reader's contract.

    Returns the message, or None for a refusal or an incomplete header.
    """
    reader: RequestReader | ReplyReader = ReplyReader() if reply else RequestReader()
    cap = MAX_REPLY_BYTES if reply else MAX_REQUEST_BYTES
    bad_at = header_problem_at(blob, reply)
    total = header_length(blob, reply) if bad_at is None else None
    for start, chunk in chunks(blob, cuts):
        end = start + len(chunk)
        try:
            message = reader.feed(chunk)
        except UnsupportedVersion:
            assert bad_at == 4 and start <= 4 < end, f"version refused at the wrong byte: {bad_at=} {start=} {end=}"
            return None
        except ProtocolError:
            if bad_at is not None:
                assert start <= bad_at < end, f"refused on bytes {start}-{end}, but the header went bad at {bad_at}"
            else:  # only the body can be wrong (text, relay name): judged once the header is in
                assert total is not None and end >= total, f"refused on bytes {start}-{end} of {total}"
            return None
        if bad_at is not None:
            assert end <= bad_at, f"byte {bad_at} is wrong, but bytes up to {end} were taken"
        if message is not None:
            assert total is not None and start < total <= end <= len(blob)
            assert total <= cap
            assert reader.message is message
            assert reader.trailing == blob[total:end], "the bytes after the header must be handed back"
            assert reader.buffered == 0
            # strict: the one accepted encoding of a message is the one the encoder writes
            wire = encode_reply(message) if isinstance(message, Reply) else encode_request(message)
            assert wire == blob[:total], f"{blob[:total]!r} decoded to {message!r}, which encodes differently"
            return message
        assert reader.buffered == end <= cap and (total is None or end < total)
    return None


def check_control_reader(blob: bytes, cuts: Iterable[int], eof: bool = True) -> ControlRequest | None:
    """Feed `blob` in chunks to the control RequestReader (then EOF); assert its contract.

    Returns the request, or None for a refusal (or a line still open when `eof` is False).
    """
    reader = control_protocol.RequestReader()
    cap = control_protocol.MAX_REQUEST_BYTES
    newline = blob.find(b"\n")
    line = blob if newline < 0 else blob[:newline]
    for start, chunk in chunks(blob, cuts):
        end = start + len(chunk)
        try:
            request = reader.feed(chunk)
        except BadControlRequest as e:
            _one_line(e)
            if len(line) > cap:  # refused for its size, on the chunk that crossed the bound
                assert start <= cap < end, f"too-large line refused on bytes {start}-{end}"
            else:
                assert newline >= 0 and start <= newline < end, "refused before the line was complete"
            return None
        if request is not None:
            assert 0 <= newline < end and len(line) <= cap
            return _check_request(request, reader)
        assert reader.buffered == end <= cap
    if not eof:
        return None
    try:
        request = reader.eof()
    except BadControlRequest as e:
        _one_line(e)
        return None
    assert newline < 0 and len(blob) <= cap
    return _check_request(request, reader)


def _check_request(request: ControlRequest, reader: control_protocol.RequestReader) -> ControlRequest:
    assert reader.request is request and reader.buffered == 0
    for value in vars(request).values():  # the peer or session id: what control.py acts on
        assert isinstance(value, str) and value, f"{request!r} carries a value that is not a non-empty string"
    again = control_protocol.RequestReader().feed(control_protocol.encode_request(request))
    assert again == request, f"{request!r} does not survive its own encoding"
    return request


def _one_line(error: Exception) -> None:
    message = str(error)
    assert message and len(message.splitlines()) == 1, f"not a one-line message: {message!r}"
