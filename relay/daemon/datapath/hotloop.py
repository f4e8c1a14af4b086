"""The threaded data path's inner loops compiled (_hotloop.c), when they are built.

setup.py builds _hotloop as an optional extension: with a C compiler and Python's headers
at install time (`make test` installs both), each direction of a stream runs its whole
loop in C, with the GIL released, and returns to Python only when its source ends, its
wake fires or a rekey threshold is due. Without them, the same loops run in Python
(threaded.py), and the conformance suite runs both. What the compiled loops bought, in
same-run A/Bs: bench/README.md, "Compiled loops".

The C code calls the very SSL_read/SSL_write/SSL_get_error/ERR_clear_error that pyOpenSSL
calls: their addresses come from pyOpenSSL's cffi binding (cryptography's wheel links its
own OpenSSL), so nothing is linked twice. That binding is reached as tls_fastpath reaches
it; where its fast calls are unavailable, the compiled loops are not used either.

MIGRELAY_PYTHON_LOOPS=1 in the environment keeps the Python loops (for an A/B, or to rule
the C code out while debugging).
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any, Final

from OpenSSL import SSL

from relay.daemon import tls_fastpath

PYTHON_LOOPS_ENV: Final = "MIGRELAY_PYTHON_LOOPS"
# _hotloop.c's HOTLOOP_ABI: the calls and outcome tuples this module and threaded.py expect
ABI: Final = 3
# OpenSSL's SSL_get_error codes the C loops hand back
_SSL_ERROR_SSL: Final = 1
_SSL_ERROR_SYSCALL: Final = 5


def _import() -> ModuleType | None:
    try:
        from relay.daemon.datapath import _hotloop
    except ImportError:
        return None
    if getattr(_hotloop, "ABI", None) != ABI:
        return None  # a stale build beside newer Python code: `pip install -e .` rebuilds it
    return _hotloop


_HOTLOOP: Final = _import()


def new_lock() -> AbstractContextManager[Any]:
    """The lock TlsConn holds around its OpenSSL calls: one the C loops can take, if built."""
    if _HOTLOOP is not None:
        lock: AbstractContextManager[Any] = _HOTLOOP.Lock()
        return lock
    return threading.Lock()


@functools.cache
def _initialised() -> ModuleType | None:
    if _HOTLOOP is None or not tls_fastpath.calls().fast:
        return None
    try:
        from OpenSSL._util import ffi, lib

        def address(fn: Any) -> int:
            return int(ffi.cast("uintptr_t", ffi.cast("void *", fn)))

        functions = (lib.SSL_read, lib.SSL_write, lib.SSL_get_error, lib.ERR_clear_error)
        _HOTLOOP.init(*(address(fn) for fn in functions))
    except Exception:  # a binding without these names: the Python loops
        return None
    return _HOTLOOP


def compiled() -> ModuleType | None:
    """The compiled loops if built, usable and not turned off by MIGRELAY_PYTHON_LOOPS."""
    if os.environ.get(PYTHON_LOOPS_ENV):
        return None
    return _initialised()


def describe() -> str:
    """For the start-up log line and build_info: 'compiled' or 'python'."""
    return "compiled" if compiled() is not None else "python"


def ssl_address(conn: SSL.Connection) -> int:
    """The SSL* of a pyOpenSSL Connection, for the C loops (kept alive by the caller's conn)."""
    from OpenSSL._util import ffi

    return int(ffi.cast("uintptr_t", conn._ssl))


def tls_error(ssl_error: int, ret: int, errno: int) -> SSL.Error:
    """The exception pyOpenSSL raises for a failed call (Connection._raise_ssl_error's rules),
    from what the C loop saved under the lock (SSL_get_error, the return value, errno) and
    this thread's error queue; asking SSL_get_error again here could see the other
    direction's state."""
    from OpenSSL._util import exception_from_error_queue, lib

    if ssl_error == _SSL_ERROR_SYSCALL and (lib.ERR_peek_error() == 0 or errno != 0):
        if ret < 0 and errno != 0:
            return SSL.SysCallError(errno, os.strerror(errno))
        return SSL.SysCallError(-1, "Unexpected EOF")
    # OpenSSL 3 reports an EOF without close_notify as SSL_ERROR_SSL; pyOpenSSL keeps calling it a SysCallError
    peeked = lib.ERR_peek_error() if ssl_error == _SSL_ERROR_SSL else 0
    if peeked and lib.ERR_GET_REASON(peeked) == lib.SSL_R_UNEXPECTED_EOF_WHILE_READING:
        lib.ERR_clear_error()
        return SSL.SysCallError(-1, "Unexpected EOF")
    try:
        exception_from_error_queue(SSL.Error)
    except SSL.Error as e:
        return e
