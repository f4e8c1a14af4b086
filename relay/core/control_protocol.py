"""The control socket's wire format, sans-IO: one JSON request line in, one JSON answer line out.

    request  {"op": "open", "peer": "hv2"}\\n     {"op": "close", "id": "1f2e3d4c"}\\n
             {"op": "list"}\\n                     {"op": "status"}\\n
             {"op": "reload"}\\n
    answer   {"ok": true, "result": ...}\\n  or  {"ok": false, "error": "one line"}\\n

One request per connection; bytes after its newline are ignored. A client that half-closes
without a newline has sent its request all the same.

Everything here is pure (no trio, no sockets): control.py owns the I/O loop and feeds a
`RequestReader`. Whatever bytes arrive, in whatever chunking, end in a typed request or in
`BadControlRequest` with a one-line message; the reader never holds more than
MAX_REQUEST_BYTES, and never hands `json` a document nested deeper than MAX_NESTING
(CPython's parser recurses once per level: a line of 64 KiB of "[" is a RecursionError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from relay.core.errors import ControlError

# A real request is a few dozen bytes; this bounds what one client can make the daemon hold.
MAX_REQUEST_BYTES: Final = 64 * 1024
# Real requests are flat objects (depth 1); the slack only lets a wrong-typed value be named.
MAX_NESTING: Final = 32
# Error answers are one line of a sensible length, whatever a client put in its request.
MAX_ERROR_CHARS: Final = 1000
_SHOWN_CHARS: Final = 60

OPS: Final = ("open", "close", "list", "status", "reload")


class BadControlRequest(ControlError):
    """The bytes on the control socket are not a valid request; the message says what is wrong."""


@dataclass(frozen=True)
class OpenSession:
    peer: str


@dataclass(frozen=True)
class CloseSession:
    id: str


@dataclass(frozen=True)
class ListSessions:
    pass


@dataclass(frozen=True)
class GetStatus:
    pass


@dataclass(frozen=True)
class Reload:
    """Re-read the config and certificates, as SIGHUP does, and answer how it went."""


ControlRequest = OpenSession | CloseSession | ListSessions | GetStatus | Reload

# The keys each op takes besides "op" (all strings); anything else is refused, as in the config.
_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "open": ("peer",),
    "close": ("id",),
    "list": (),
    "status": (),
    "reload": (),
}


def _show(value: object) -> str:
    """A client-supplied value for an error message: repr (so it stays on one line), cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _nesting(text: str) -> int:
    """How deep the arrays and objects of a JSON text go (brackets inside strings do not count).

    Where the text is not JSON the count may be off past the first error, but `json` stops
    at that error too, so it never recurses deeper than this says.
    """
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return 0  # cannot be too deep: skips the per-character loop for every real request
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _string(request: dict[str, Any], key: str) -> str:
    if key not in request:
        raise BadControlRequest(f"missing {key!r}: this op needs it")
    value = request[key]
    if not isinstance(value, str) or not value:
        raise BadControlRequest(f"{key!r} must be a non-empty string, not {_show(value)}")
    return value


def parse_request(line: bytes) -> ControlRequest:
    """One request line (without its newline) -> a request, or BadControlRequest."""
    if len(line) > MAX_REQUEST_BYTES:
        raise BadControlRequest(f"request too large: more than {MAX_REQUEST_BYTES} bytes")
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise BadControlRequest("request is not UTF-8") from None
    if not text.strip():
        raise BadControlRequest('empty request: send one JSON object and a newline, e.g. {"op": "list"}')
    if _nesting(text) > MAX_NESTING:
        raise BadControlRequest(f"request nested more than {MAX_NESTING} levels deep")
    try:
        request = json.loads(text)
    except ValueError as e:  # JSONDecodeError, and integers of more digits than Python converts
        raise BadControlRequest(f"request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadControlRequest(f'a request must be a JSON object such as {{"op": "list"}}, not {_show(request)}')
    op = _string(request, "op")
    keys = _KEYS.get(op)
    if keys is None:
        raise BadControlRequest(f"unknown op {_show(op)} ({', '.join(OPS)})")
    unknown = sorted(set(request) - {"op", *keys})
    if unknown:
        raise BadControlRequest(f"unknown key(s) for op {op}: {', '.join(map(_show, unknown))}")
    if op == "open":
        return OpenSession(_string(request, "peer"))
    if op == "close":
        return CloseSession(_string(request, "id"))
    if op == "reload":
        return Reload()
    return ListSessions() if op == "list" else GetStatus()


def encode_request(request: ControlRequest) -> bytes:
    fields: dict[str, str]
    if isinstance(request, OpenSession):
        fields = {"op": "open", "peer": request.peer}
    elif isinstance(request, CloseSession):
        fields = {"op": "close", "id": request.id}
    elif isinstance(request, Reload):
        fields = {"op": "reload"}
    else:
        fields = {"op": "list" if isinstance(request, ListSessions) else "status"}
    return json.dumps(fields).encode() + b"\n"


class RequestReader:
    """Collects the one request line of a connection from input in any chunking.

    Holds at most MAX_REQUEST_BYTES: a line that grows past that is refused on the
    chunk that crosses the bound, not when (or if) its newline arrives.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.request: ControlRequest | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the newline."""
        return len(self._buf)

    def feed(self, data: bytes) -> ControlRequest | None:
        """Add bytes; return the request once its newline is in (or raise BadControlRequest)."""
        if self.request is not None:
            raise RuntimeError("the request is complete; a connection carries one")
        end = data.find(b"\n")
        if len(self._buf) + (len(data) if end < 0 else end) > MAX_REQUEST_BYTES:
            raise BadControlRequest(f"request too large: more than {MAX_REQUEST_BYTES} bytes without a newline")
        if end < 0:
            self._buf += data
            return None
        self._buf += data[:end]
        return self._finish()

    def eof(self) -> ControlRequest:
        """The client half-closed: what it sent is its request, newline or not."""
        return self.request if self.request is not None else self._finish()

    def _finish(self) -> ControlRequest:
        line = bytes(self._buf)
        self._buf.clear()
        self.request = parse_request(line)
        return self.request


def one_line(message: str) -> str:
    """An error message as one line of bounded length (it may quote what a client sent)."""
    text = " ".join(message.splitlines())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def encode_result(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def encode_error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": one_line(message)}).encode() + b"\n"


def decode_answer(data: bytes) -> Any:
    """The client's side: an answer's result, or ControlError with the relay's message."""
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):  # the relay is trusted, but a truncated answer is not JSON
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"the relay sent an unreadable answer: {data[:100]!r}")
    if answer["ok"] is not True:
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
