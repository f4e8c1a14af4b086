"""The two places migrelay reaches past pyOpenSSL's public API, both for speed on the TLS path.

- whole writes: pyOpenSSL turns on SSL_MODE_ENABLE_PARTIAL_WRITE, so each `send`
  returns after one 16 KiB record and the relay would loop in Python per record;
  without it OpenSSL writes a whole 256 KiB chunk in one call (and on a full socket
  raises WantWrite, then resumes where it stopped when the same chunk is passed again,
  which TlsConn.send_all does). pyOpenSSL has no public call to clear a mode.
- zero-copy reads: pyOpenSSL's `Connection.recv_into` decrypts into a temporary buffer
  it allocates per call, then copies; the fast read makes the same SSL_read straight
  into the caller's buffer and maps errors with pyOpenSSL's own code, so callers see
  the same exceptions. Writes likewise call SSL_write without `Connection.send`'s
  argument checks, which cost a few microseconds per small message (the RPC channel).

Both use pyOpenSSL's own cffi binding (`OpenSSL._util`) and private attributes
(`Context._context`, `Connection._ssl`, `Connection._raise_ssl_error`). `calls()` checks,
once, on a real Connection, that every one of them is there and behaves, and falls back
to the public API otherwise (correct, only slower; tests/integration/test_tls_fast_paths.py
fails then, so the loss is seen). What they buy is measured in bench/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from OpenSSL import SSL

# One TLS record carries at most 16 KiB of plaintext, and SSL_read returns one record at most.
TLS_RECORD_BYTES: Final = 16384

# SSL_read into buf (one record at most): the byte count, or pyOpenSSL's exceptions
# (WantReadError, WantWriteError, ZeroReturnError, SysCallError, Error).
Read = Callable[[SSL.Connection, memoryview], int]
# SSL_write of buf: the byte count (all of it with whole writes), or the same exceptions.
Write = Callable[[SSL.Connection, memoryview], int]


@dataclass(frozen=True)
class TlsCalls:
    """How the TLS data path reads and how its contexts write: fast, or by the public API."""

    read: Read
    write: Write
    whole_writes: Callable[[SSL.Context], None]
    fast: bool


def _read_public(conn: SSL.Connection, buf: memoryview) -> int:
    # its temporary buffer is as large as what is asked for: ask for one record at most
    return conn.recv_into(buf, min(len(buf), TLS_RECORD_BYTES))


def _write_public(conn: SSL.Connection, buf: memoryview) -> int:
    return conn.send(buf)


def _keep_partial_writes(ctx: SSL.Context) -> None:
    """The public API has no call to clear a mode: writes stay one record per call."""


PUBLIC: Final = TlsCalls(_read_public, _write_public, _keep_partial_writes, fast=False)


def _fast(ffi: Any, lib: Any) -> TlsCalls:
    def read(conn: SSL.Connection, buf: memoryview) -> int:
        with ffi.from_buffer(buf, require_writable=True) as ptr:
            n: int = lib.SSL_read(conn._ssl, ptr, len(buf))
        if n <= 0:
            conn._raise_ssl_error(conn._ssl, n)
        return n

    def write(conn: SSL.Connection, buf: memoryview) -> int:
        # pyOpenSSL's send, less its argument checks (a few microseconds per small message)
        with ffi.from_buffer(buf) as ptr:
            n: int = lib.SSL_write(conn._ssl, ptr, len(buf))
        if n <= 0:
            conn._raise_ssl_error(conn._ssl, n)
        return n

    def whole_writes(ctx: SSL.Context) -> None:
        lib.SSL_CTX_clear_mode(ctx._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    return TlsCalls(read, write, whole_writes, fast=True)


def probe() -> TlsCalls:
    """The fast calls if every internal they use is there and behaves on a real Connection."""
    try:
        from OpenSSL._util import ffi, lib

        calls = _fast(ffi, lib)
        ctx = SSL.Context(SSL.TLS_METHOD)
        calls.whole_writes(ctx)
        conn = SSL.Connection(ctx, None)  # memory BIOs: nothing to read yet
        conn.set_connect_state()
        try:
            calls.read(conn, memoryview(bytearray(16)))
        except SSL.WantReadError:
            pass  # SSL_read ran and its error was mapped as pyOpenSSL maps it
        else:
            return PUBLIC
        try:
            calls.write(conn, memoryview(bytearray(16)))
        except SSL.WantReadError:
            return calls  # before its handshake, SSL_write starts it, and wants the answer
        return PUBLIC
    except Exception:  # ImportError, AttributeError, a changed signature: the public API it is
        return PUBLIC


@functools.cache
def calls() -> TlsCalls:
    """What the relay uses: probed once, on first use."""
    return probe()
