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


def _import() -> ModuleType | None:
    try:
        from relay.daemon.datapath import _hotloop
    except ImportError:
        return None
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


def set_errno(value: int) -> None:
    """Put a C loop's errno where pyOpenSSL's error mapping reads it (cffi's saved errno)."""
    from OpenSSL._util import ffi

    ffi.errno = value
