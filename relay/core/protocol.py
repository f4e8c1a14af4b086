"""The relay-to-relay header, sans-IO (in the manner of h11).

After the peer transport is up, the dialling relay sends one Request; the accepting
relay answers one Reply before any payload flows. Everything here is pure:
functions over bytes and a reader object that takes input in any chunking. The
caller owns the I/O loop and must forward `reader.trailing` (the first payload
bytes that arrived with the header) before anything else.

Request (dialling relay -> accepting relay), big-endian:

     0        4     5     6          8          10                   18
     +--------+-----+-----+----------+----------+--------------------+
     | "MGRL" | ver | 1   | src_len  | name_len |     stream_id      |
     +--------+-----+-----+----------+----------+--------------------+
     | source relay name (src_len bytes, UTF-8) | socket name (name_len) |

Continue (dialling relay -> accepting relay): the Request's layout with type 3. It asks
the accepting relay to carry the source's live stream `stream_id` (on socket `name`) on
this fresh connection from now on: rekeying by reconnection, see relay/datapath/rekey.py.

     0        4     5     6          8          10                   18
     +--------+-----+-----+----------+----------+--------------------+
     | "MGRL" | ver | 3   | src_len  | name_len |     stream_id      |
     +--------+-----+-----+----------+----------+--------------------+
     | source relay name (src_len bytes, UTF-8) | socket name (name_len) |

An accepting relay reads either message with one RequestReader. A relay that predates
type 3 answers it with a bad-request Reply, which the dialling relay takes as "no".

Reply (accepting relay -> dialling relay):

     0        4     5     6        7     8            10
     +--------+-----+-----+--------+-----+------------+
     | "MGRL" | ver | 2   | status | pad | reason_len |  reason (UTF-8)
     +--------+-----+-----+--------+-----+------------+

pad is reserved and must be 0. A reader refuses a wrong field on the byte that completes it
(magic, version, type, a length, the status, pad), not once the fixed part is in: a relay
must not wait, for as long as a handshake may take, on a header it already knows is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from relay.core.errors import STATUS_NAMES, STATUS_OK, ProtocolError
from relay.core.overlay import MAX_NAME_BYTES, host_problem

MAGIC: Final = b"MGRL"
VERSION: Final = 1
TYPE_REQUEST: Final = 1
TYPE_REPLY: Final = 2
TYPE_CONTINUE: Final = 3
MAX_REASON_BYTES: Final = 1024

REQUEST_FIXED: Final = struct.Struct(">4sBBHHQ")
REPLY_FIXED: Final = struct.Struct(">4sBBBxH")
# Offsets of the fields a reader judges on their own, from the drawings above.
_REQUEST_SRC_LEN: Final = 6
_REQUEST_NAME_LEN: Final = 8
_REPLY_STATUS: Final = 6
_REPLY_PAD: Final = 7
_REPLY_REASON_LEN: Final = 8
# Upper bounds on what a reader ever buffers.
MAX_REQUEST_BYTES: Final = REQUEST_FIXED.size + 2 * MAX_NAME_BYTES
MAX_REPLY_BYTES: Final = REPLY_FIXED.size + MAX_REASON_BYTES


class UnsupportedVersion(ProtocolError):
    """A well-formed header of a protocol version this relay does not speak."""


@dataclass(frozen=True)
class Request:
    source: str
    name: str
    stream_id: int


@dataclass(frozen=True)
class Continue:
    """Carry the live stream `stream_id` of relay `source` (socket `name`) on this connection."""

    source: str
    name: str
    stream_id: int


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


def encode_request(req: Request | Continue) -> bytes:
    """A Request or a Continue: one layout, told apart by the type byte."""
    source, name = req.source.encode(), req.name.encode()
    if not 0 < len(source) <= MAX_NAME_BYTES or not 0 < len(name) <= MAX_NAME_BYTES:
        raise ValueError(f"source and name must be 1-{MAX_NAME_BYTES} bytes")
    if not 0 <= req.stream_id < 2**64:
        raise ValueError("stream_id must fit in 64 bits")
    kind = TYPE_CONTINUE if isinstance(req, Continue) else TYPE_REQUEST
    return REQUEST_FIXED.pack(MAGIC, VERSION, kind, len(source), len(name), req.stream_id) + source + name


def encode_reply(reply: Reply) -> bytes:
    reason = reply.reason.encode()[:MAX_REASON_BYTES]
    # never cut a UTF-8 sequence in half
    reason = reason.decode(errors="ignore").encode()
    return REPLY_FIXED.pack(MAGIC, VERSION, TYPE_REPLY, reply.status, len(reason)) + reason


def _check_prefix(buf: bytes | bytearray, expected_types: tuple[int, ...]) -> None:
    """The fields both headers share, each judged as soon as its byte is in."""
    seen = bytes(buf[:4])
    if MAGIC[: len(seen)] != seen:
        raise ProtocolError(f"not a migrelay header (starts with {seen!r})")
    if len(buf) > 4 and buf[4] != VERSION:
        raise UnsupportedVersion(f"header version {buf[4]} is not supported (this relay speaks {VERSION})")
    if len(buf) > 5 and buf[5] not in expected_types:
        expected = " or ".join(map(str, expected_types))
        raise ProtocolError(f"unexpected header type {buf[5]} (expected {expected})")


def _u16(buf: bytes | bytearray, offset: int) -> int | None:
    """A big-endian 16-bit field, or None while its bytes are not all in."""
    return int.from_bytes(buf[offset : offset + 2], "big") if len(buf) >= offset + 2 else None


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise ProtocolError(f"{what} contains NUL")
    return text


T = TypeVar("T")


class HeaderReader(Generic[T]):
    """Accumulates bytes until one whole header is in; never buffers past its bound."""

    _fixed: struct.Struct
    _types: tuple[int, ...]

    def __init__(self) -> None:
        self._buf = bytearray()
        self._total: int | None = None
        self.message: T | None = None
        self.trailing = b""

    def feed(self, data: bytes) -> T | None:
        """Add bytes; return the message once complete (and keep any extra in `trailing`)."""
        if self.message is not None:
            raise RuntimeError("header already complete; the rest belongs to the stream")
        self._buf += data
        if self._total is None:
            _check_prefix(self._buf, self._types)
            self._check_fields(self._buf)
            if len(self._buf) >= self._fixed.size:
                self._total = self._fixed.size + self._body_len(self._fixed.unpack_from(self._buf))
        if self._total is None or len(self._buf) < self._total:
            return None
        self.message = self._decode(bytes(self._buf[: self._total]))
        self.trailing = bytes(self._buf[self._total :])
        self._buf.clear()
        return self.message

    @property
    def buffered(self) -> int:
        """Header bytes held while waiting for the rest (never more than the header's bound)."""
        return len(self._buf)

    def wanted(self) -> int:
        """How many more bytes would complete the header (a lower bound before the fixed part)."""
        target = self._total if self._total is not None else self._fixed.size
        return max(target - len(self._buf), 1)

    def _check_fields(self, buf: bytearray) -> None:
        """Refuse any field of the fixed part that is wrong on its own, as soon as it is in."""
        raise NotImplementedError

    def _body_len(self, fields: tuple[int, ...]) -> int:
        """The body's length; the fields have passed _check_fields."""
        raise NotImplementedError

    def _decode(self, raw: bytes) -> T:
        raise NotImplementedError


class RequestReader(HeaderReader[Request | Continue]):
    """What a dialling relay sends first: a Request for a new stream, or a Continue."""

    _fixed = REQUEST_FIXED
    _types = (TYPE_REQUEST, TYPE_CONTINUE)

    def _check_fields(self, buf: bytearray) -> None:
        for offset, what in ((_REQUEST_SRC_LEN, "source relay name"), (_REQUEST_NAME_LEN, "socket name")):
            length = _u16(buf, offset)
            if length is not None and not 0 < length <= MAX_NAME_BYTES:
                raise ProtocolError(f"header too large or empty: {what} of {length} bytes (1-{MAX_NAME_BYTES})")

    def _body_len(self, fields: tuple[int, ...]) -> int:
        src_len, name_len = fields[3], fields[4]
        return src_len + name_len

    def _decode(self, raw: bytes) -> Request | Continue:
        _, _, kind, src_len, name_len, stream_id = REQUEST_FIXED.unpack_from(raw)
        body = raw[REQUEST_FIXED.size :]
        source = _text(body[:src_len], "source relay name")
        if (problem := host_problem(source)) is not None:
            raise ProtocolError(problem)
        name = _text(body[src_len : src_len + name_len], "socket name")
        return (Continue if kind == TYPE_CONTINUE else Request)(source, name, stream_id)


class ReplyReader(HeaderReader[Reply]):
    _fixed = REPLY_FIXED
    _types = (TYPE_REPLY,)

    def _check_fields(self, buf: bytearray) -> None:
        if len(buf) > _REPLY_STATUS and buf[_REPLY_STATUS] not in STATUS_NAMES:
            raise ProtocolError(f"unknown reply status {buf[_REPLY_STATUS]}")
        if len(buf) > _REPLY_PAD and buf[_REPLY_PAD] != 0:
            raise ProtocolError(f"reply pad byte is {buf[_REPLY_PAD]}, not 0")
        reason_len = _u16(buf, _REPLY_REASON_LEN)
        if reason_len is not None and reason_len > MAX_REASON_BYTES:
            raise ProtocolError(f"reply reason too large: {reason_len} bytes (max {MAX_REASON_BYTES})")

    def _body_len(self, fields: tuple[int, ...]) -> int:
        return fields[4]

    def _decode(self, raw: bytes) -> Reply:
        _, _, _, status, _ = REPLY_FIXED.unpack_from(raw)
        return Reply(status, _text(raw[REPLY_FIXED.size :], "reply reason"))
