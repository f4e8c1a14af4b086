"""The two places migrelay reaches past pyOpenSSL's public API, both for speed on the TLS path.

- `whole_writes`: pyOpenSSL turns on SSL_MODE_ENABLE_PARTIAL_WRITE, so each `send`
  returns after one 16 KiB record and the relay would loop in Python per record;
  without it OpenSSL writes a whole 256 KiB chunk in one call (and on a full socket
  raises WantWrite, then resumes where it stopped when the same chunk is passed again,
  which TlsConn.send_all does). pyOpenSSL has no public call to clear a mode.
- `recv_into`: pyOpenSSL's `Connection.recv_into` decrypts into a temporary buffer it
  allocates per call, then copies; this makes the same SSL_read straight into the
  caller's buffer and maps errors with pyOpenSSL's own code, so callers see the same
  exceptions.

Same-run A/B figures for each are in bench/README.md. Both use pyOpenSSL's own cffi
binding (`OpenSSL._util`) and private attributes (`Context._context`,
`Connection._ssl`, `Connection._raise_ssl_error`). If a pyOpenSSL release moves them,
both fall back to the public behaviour (correct, only slower) and
tests/integration/test_tls_fast_paths.py fails, so the loss is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from OpenSSL import SSL

# One TLS record carries at most 16 KiB of plaintext, and SSL_read returns one record at most.
TLS_RECORD_BYTES: Final = 16384

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    FAST: bool = all(
        hasattr(_lib, name) for name in ("SSL_CTX_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE", "SSL_read")
    ) and hasattr(SSL.Connection, "_raise_ssl_error")
except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
    _ffi = _lib = None
    FAST = False


def whole_writes(ctx: SSL.Context) -> None:
    """Let one SSL_write send a whole chunk, not one record."""
    if FAST and hasattr(ctx, "_context"):
        _lib.SSL_CTX_clear_mode(ctx._context, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


def _recv_into_fast(conn: SSL.Connection, buf: memoryview) -> int:
    with _ffi.from_buffer(buf, require_writable=True) as ptr:
        n: int = _lib.SSL_read(conn._ssl, ptr, len(buf))
    if n <= 0:
        conn._raise_ssl_error(conn._ssl, n)  # WantReadError, ZeroReturnError, SysCallError, Error
    return n


def _recv_into_public(conn: SSL.Connection, buf: memoryview) -> int:
    # its temporary buffer is as large as what is asked for: ask for one record at most
    return conn.recv_into(buf, min(len(buf), TLS_RECORD_BYTES))


# SSL_read into buf (one record at most): the byte count, or pyOpenSSL's exceptions.
recv_into: Callable[[SSL.Connection, memoryview], int] = _recv_into_fast if FAST else _recv_into_public
