"""The control socket's requests and answers: pure, any chunking, strict, bounded in size and depth.

The refusal messages a client sees are checked end to end in tests/integration/test_control_socket.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.control_protocol import (
    MAX_ERROR_CHARS,
    MAX_NESTING,
    MAX_REQUEST_BYTES,
    OPS,
    BadControlRequest,
    CloseSession,
    ControlRequest,
    GetStatus,
    ListSessions,
    OpenSession,
    RequestReader,
    decode_answer,
    encode_error,
    encode_request,
    encode_result,
    parse_request,
)
from relay.core.errors import ControlError
from tests.fuzz.invariants import check_control_reader, chunks


def test_each_op() -> None:
    assert parse_request(b'{"op": "open", "peer": "hv2"}') == OpenSession("hv2")
    assert parse_request(b'{"id": "1f2e", "op": "close"}') == CloseSession("1f2e")
    assert parse_request(b' {"op": "list"} \r') == ListSessions()
    assert parse_request(b'{"op": "status"}') == GetStatus()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"op": "close"}', "missing 'id'"),
        (b'{"op": "open", "peer": 5}', "'peer' must be a non-empty string, not 5"),
        (b'{"op": "status", "peer": "hv2"}', "unknown key(s) for op status: 'peer'"),
        (b'{"op": ["list"]}', "'op' must be a non-empty string, not ['list']"),
    ],
)
def test_the_schema_is_strict(line: bytes, error: str) -> None:
    with pytest.raises(BadControlRequest) as raised:
        parse_request(line)
    assert str(raised.value).startswith(error)


def test_one_request_per_connection() -> None:
    reader = RequestReader()
    assert reader.feed(b'{"op": "li') is None
    assert reader.buffered == len(b'{"op": "li')
    assert reader.feed(b'st"}\n{"op": "status"}\n') == ListSessions()  # what follows the newline is ignored
    assert reader.buffered == 0 and reader.eof() == ListSessions()
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_a_half_closed_line_is_a_request() -> None:
    reader = RequestReader()
    reader.feed(b'{"op": "status"}')
    assert reader.eof() == GetStatus()
    with pytest.raises(BadControlRequest, match="empty request"):
        RequestReader().eof()


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    peer = '["\\"[{' * 3000
    assert parse_request(json.dumps({"op": "open", "peer": peer}).encode()) == OpenSession(peer)
    nested = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    with pytest.raises(BadControlRequest, match="'peer' must be a non-empty string"):
        parse_request(b'{"op": "open", "peer": ' + nested.encode() + b"}")
    with pytest.raises(BadControlRequest, match=f"nested more than {MAX_NESTING} levels"):
        parse_request(b'{"op": "open", "peer": [' + nested.encode() + b"]}")


def test_huge_numbers_are_a_bad_request_not_a_crash() -> None:
    with pytest.raises(BadControlRequest, match="not valid JSON"):
        parse_request(b'{"op": "open", "peer": ' + b"9" * 5000 + b"}")


def test_client_values_are_shown_short_and_on_one_line() -> None:
    with pytest.raises(BadControlRequest) as raised:
        parse_request(json.dumps({"op": "x\n" * 1000}).encode())
    assert len(str(raised.value)) < 150 and "\n" not in str(raised.value)


def test_answers() -> None:
    assert decode_answer(encode_result({"id": "ab"})) == {"id": "ab"}
    assert decode_answer(encode_result([])) == []
    with pytest.raises(ControlError, match=r"^no session 'x'$"):
        decode_answer(encode_error("no session 'x'"))
    error = json.loads(encode_error("line one\nline two\r\n" + "x" * 5000))["error"]
    assert error.startswith("line one line two x") and len(error) == MAX_ERROR_CHARS
    for garbage in (b"", b"[1]", b'{"result": 1}', b'{"ok": tr', b"[" * 100_000):
        with pytest.raises(ControlError, match="unreadable answer"):
            decode_answer(garbage)


# --- properties, with the checks shared with the atheris target (tests/fuzz/invariants.py) -----

cut_lists = st.lists(st.integers(0, MAX_REQUEST_BYTES + 10_000), max_size=8)
texts = st.text(min_size=1)
requests: st.SearchStrategy[ControlRequest] = st.one_of(
    st.builds(OpenSession, texts),
    st.builds(CloseSession, texts),
    st.just(ListSessions()),
    st.just(GetStatus()),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), json_values)},
    optional={"peer": json_values, "id": json_values, "extra": json_values},
)


@given(request=requests, tail=st.binary(max_size=50), cuts=cut_lists)
def test_round_trip_any_split(request: ControlRequest, tail: bytes, cuts: list[int]) -> None:
    assert check_control_reader(encode_request(request) + tail, cuts) == request


@given(blob=st.binary(max_size=300), cuts=cut_lists)
def test_any_bytes_in_any_chunks(blob: bytes, cuts: list[int]) -> None:
    check_control_reader(blob, cuts)


@given(value=st.one_of(request_like, json_values), newline=st.booleans(), cuts=cut_lists)
def test_any_json_in_any_chunks(value: Any, newline: bool, cuts: list[int]) -> None:
    check_control_reader(json.dumps(value).encode() + b"\n" * newline, cuts)


@given(depth=st.integers(1, 20_000), cuts=cut_lists)
def test_nesting_is_bounded_before_json_sees_it(depth: int, cuts: list[int]) -> None:
    line = b'{"op": "open", "peer": ' + b"[" * depth + b"]" * depth + b"}\n"
    reader = RequestReader()
    with pytest.raises(BadControlRequest) as raised:
        for _, chunk in chunks(line, cuts):
            reader.feed(chunk)
    if len(line) - 1 > MAX_REQUEST_BYTES:
        assert "too large" in str(raised.value)
    elif depth + 1 > MAX_NESTING:
        assert f"nested more than {MAX_NESTING} levels" in str(raised.value)
    else:
        assert "'peer' must be a non-empty string" in str(raised.value)


@given(size=st.integers(MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES + 5000), newline=st.booleans(), cuts=cut_lists)
def test_oversized_lines_are_refused_where_they_cross_the_bound(size: int, newline: bool, cuts: list[int]) -> None:
    """Refused on the chunk that takes the line past the bound, newline or not (checked in the invariants)."""
    assert check_control_reader(b"a" * size + b"\n" * newline, cuts) is None
