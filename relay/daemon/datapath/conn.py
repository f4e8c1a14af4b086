"""The two kinds of connection end a pump moves bytes between.

`PlainConn` is a non-blocking socket (unix or TCP); its fd can be spliced.
`TlsConn` is pyOpenSSL on the same kind of socket (socket BIO, so kernel TLS and
splice stay possible where the kernel has them). Both offer the same calls
(recv_into, send_all, send_eof, abort, close), which is all a pump needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

import trio
from OpenSSL import SSL

from relay.core.errors import HandshakeFailed, RemoteError
from relay.daemon import tls_fastpath
from relay.daemon.datapath.hotloop import new_lock
from relay.daemon.tls_fastpath import TLS_RECORD_BYTES, Read, Write
from relay.daemon.tlsconfig import failure_reason, new_notes, verify_failure

_LINGER_RESET: Final = struct.pack("ii", 1, 0)
T = TypeVar("T")


class StreamTruncated(RemoteError):
    """The other side went away without a clean end (reset, or TLS without close_notify)."""


class Conn(Protocol):
    """One end of a forwarded connection, as the pumps see it."""

    @property
    def splice_fd(self) -> int | None:
        """The socket fd if bytes may be spliced to/from it directly, else None."""

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connected socket underneath (for its TCP state, never for I/O)."""

    async def recv_into(self, buf: memoryview) -> int:
        """Read some bytes into buf; 0 means a clean end of stream."""

    async def send_all(self, data: memoryview) -> None: ...

    async def send_eof(self) -> None:
        """Half-close: no more bytes will be sent, the other direction keeps flowing."""

    def abort(self) -> None:
        """Close so that the other end sees an error (RST), never a clean end."""

    def close(self) -> None: ...


def _arm_reset(sock: socket.socket | trio.socket.SocketType) -> None:
    """Make the next close send RST, not FIN: the other end must see an error, not an end."""
    # already closed or not a stream socket: the close() that follows is all there is to do
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class RawSocket:
    """A connected socket driven by hand: try the syscall, and only if it would block, wait.

    trio's own socket methods pass through the scheduler after every call (a checkpoint,
    i.e. an epoll_wait), several times per chunk; profiles showed that as a large share of
    a relay's CPU. Here the fast path is one syscall; the pumps checkpoint once per round.
    `raw` is a duplicate of the trio socket's fd (a plain socket.socket, for recv_into
    and send on the same open file description, already non-blocking).
    """

    __slots__ = ("raw", "trio")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.trio = sock
        self.raw = socket.socket(fileno=os.dup(sock.fileno()))

    async def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                return self.raw.recv_into(buf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)

    async def send_all(self, view: memoryview) -> None:
        while view:
            try:
                view = view[self.raw.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.raw)

    def shutdown_write(self) -> None:
        self.raw.shutdown(socket.SHUT_WR)

    def close(self, reset: bool = False) -> None:
        if reset:
            _arm_reset(self.raw)
        trio.lowlevel.notify_closing(self.raw)
        self.raw.close()
        self.trio.close()


class PlainConn:
    """A plaintext socket: unix or TCP."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = RawSocket(sock)

    @property
    def splice_fd(self) -> int | None:
        return self._sock.raw.fileno()

    @property
    def raw(self) -> socket.socket:
        """The plain socket on the same fd (non-blocking), for the threaded data path."""
        return self._sock.raw

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock.trio

    async def recv_into(self, buf: memoryview) -> int:
        return await self._sock.recv_into(buf)

    async def send_all(self, data: memoryview) -> None:
        await self._sock.send_all(data)

    async def send_eof(self) -> None:
        self._sock.shutdown_write()

    def abort(self) -> None:
        self._sock.close(reset=True)

    def close(self) -> None:
        self._sock.close()


class TlsConn:
    """pyOpenSSL over a non-blocking socket (a socket BIO), driven by trio's readiness waits.

    Records are decrypted straight into the pump's buffer and a whole chunk is
    encrypted and written per SSL_write (tls_fastpath.py). Four designs were measured
    side by side (bench/README.md, "TLS designs measured"): this one, memory BIOs through
    pyOpenSSL's public API (bio_read allocates and copies twice), memory BIOs with
    zero-copy calls, and the stdlib's ssl.SSLObject (it links Debian's OpenSSL, slower at
    AES-GCM than the one in cryptography's wheel). A socket BIO also keeps kernel TLS
    possible.

    Reads and writes run in two tasks (one per direction); an SSL_read may need to
    write (a TLS 1.3 key-update reply) and, in theory, an SSL_write may need to
    read. trio allows one waiter per fd and direction; see `_wait`.

    `lock` is held around every OpenSSL call on the connection: an SSL object must never
    be used by two threads at once, and with the threaded data path (datapath/threaded.py)
    each direction's pump runs in a thread of its own while trio may still end a
    connection of a rekeyed chain. Every call under it is non-blocking, so it is held for
    microseconds; uncontended it costs well under a microsecond.
    """

    def __init__(
        self, sock: trio.socket.SocketType, conn: SSL.Connection, read: Read | None = None, write: Write | None = None
    ) -> None:
        self._sock = sock
        self._ssl = conn
        self._read = read or tls_fastpath.calls().read
        self._write = write or tls_fastpath.calls().write
        self._waiters: dict[bool, trio.Event] = {}  # writable? -> the task waiting for it
        self.lock = new_lock()  # a pthread mutex the compiled loops share, when built (hotloop.py)
        # A read that failed after full records were read in the same call: those bytes are
        # passed on first, then the next read reports it (as the compiled loop does).
        self.failed: SSL.Error | None = None

    @classmethod
    def client(
        cls,
        sock: trio.socket.SocketType,
        ctx: SSL.Context,
        session: SSL.Session | None = None,
        read: Read | None = None,
        write: Write | None = None,
    ) -> TlsConn:
        conn = SSL.Connection(ctx, sock)  # type: ignore[arg-type]  # a socket BIO needs only fileno()
        new_notes(conn)
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        return cls(sock, conn, read, write)

    @classmethod
    def server(
        cls, sock: trio.socket.SocketType, ctx: SSL.Context, read: Read | None = None, write: Write | None = None
    ) -> TlsConn:
        conn = SSL.Connection(ctx, sock)  # type: ignore[arg-type]  # a socket BIO needs only fileno()
        new_notes(conn)
        conn.set_accept_state()
        return cls(sock, conn, read, write)

    @property
    def ssl(self) -> SSL.Connection:
        return self._ssl

    @property
    def read_fn(self) -> Read:
        """The SSL_read this connection uses (tls_fastpath.py), for the threaded data path."""
        return self._read

    @property
    def write_fn(self) -> Write:
        """The SSL_write this connection uses (tls_fastpath.py), for the threaded data path."""
        return self._write

    @property
    def splice_fd(self) -> int | None:
        return None

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    # trio allows one waiter per fd and direction. Normally the reading task waits for
    # readable and the writing task for writable; only in rare TLS states (a read that
    # must write a reply) could both want the same. Then the second one waits for the
    # first to finish and retries its call. No lock on the normal path: acquiring one
    # costs a scheduler pass on every wait.

    async def _wait(self, writable: bool) -> None:
        if (busy := self._waiters.get(writable)) is not None:
            await busy.wait()
            return
        self._waiters[writable] = done = trio.Event()
        try:
            if writable:
                await trio.lowlevel.wait_writable(self._sock)
            else:
                await trio.lowlevel.wait_readable(self._sock)
        finally:
            del self._waiters[writable]
            done.set()

    async def _call(self, op: Callable[..., T], *args: Any) -> T:
        """Run one non-blocking OpenSSL call, waiting for whichever readiness it asks for."""
        while True:
            try:
                with self.lock:
                    return op(*args)
            except SSL.WantReadError:
                await self._wait(writable=False)
            except SSL.WantWriteError:
                await self._wait(writable=True)

    async def handshake(self) -> None:
        """Raises HandshakeFailed with the reason it is counted by (tlsconfig.failure_reason)."""
        try:
            await self._call(self._ssl.do_handshake)
        except SSL.SysCallError as e:
            reason = _syscall_reason(e)
            counted_as = failure_reason(self._ssl, reason)
            raise HandshakeFailed(f"TLS handshake failed: {reason}", counted_as) from None
        except SSL.Error as e:
            reason = _ssl_reason(e)
            why = verify_failure(self._ssl)
            detail = f": {why}" if why else ""
            counted_as = failure_reason(self._ssl, reason)
            raise HandshakeFailed(f"TLS handshake failed: {reason}{detail}", counted_as) from None

    async def recv_into(self, buf: memoryview) -> int:
        """Read as many records as are ready (at least one byte), up to len(buf)."""
        if self.failed is not None:
            raise read_failure(self.failed)
        try:
            got: int = await self._call(self._read, self._ssl, buf)
        except SSL.ZeroReturnError:
            return 0
        except SSL.Error as e:
            raise read_failure(e) from None
        return self.read_queued(buf, got)

    def read_queued(self, buf: memoryview, got: int) -> int:
        """After a read of `got` bytes into buf: the records already here too, up to len(buf).

        One wakeup, many records. Only a full record suggests more is queued behind it;
        after a short one (an RPC message, the tail of a write) another read would just
        fail with EAGAIN. A failure here is kept in `failed`, for the next read to report
        once these bytes are passed on. (The threaded Python loop calls this too.)
        """
        while got < len(buf) and got % TLS_RECORD_BYTES == 0:
            try:
                with self.lock:
                    got += self._read(self._ssl, buf[got:])
            except (SSL.WantReadError, SSL.WantWriteError, SSL.ZeroReturnError):
                break  # nothing more now; the next call waits, or reports EOF
            except SSL.Error as e:
                self.failed = e
                break
        return got

    async def send_all(self, data: memoryview) -> None:
        try:
            while data:
                data = data[await self._call(self._write, self._ssl, data) :]
        except SSL.Error as e:
            raise write_failure(e) from None

    async def send_eof(self) -> None:
        """Send close_notify, then FIN; reading stays possible (TLS 1.3 half-close)."""
        while not self.try_send_eof():
            await self._wait(writable=True)
        await trio.lowlevel.checkpoint()

    def try_send_eof(self) -> bool:
        """send_eof without waiting: False if the socket is full (nothing is lost: OpenSSL
        keeps the alert, and a later send_eof or try_send_eof finishes it)."""
        try:
            with self.lock:
                self._ssl.shutdown()
        except SSL.WantWriteError:
            return False
        except SSL.WantReadError:
            # SSL_shutdown wants to read only to await the peer's close_notify: that is the
            # reader's business, so a WantRead here means ours is out
            pass
        except SSL.SysCallError as e:
            raise StreamTruncated(f"TLS shutdown failed: {_syscall_reason(e)}") from None
        except SSL.Error as e:
            raise StreamTruncated(f"TLS error: {_ssl_reason(e)}") from None
        self._sock.shutdown(socket.SHUT_WR)
        return True

    def abort(self) -> None:
        _arm_reset(self._sock)
        self._sock.close()

    def close(self) -> None:
        self._sock.close()


def read_failure(e: SSL.Error) -> StreamTruncated:
    """A failed SSL_read, as the stream's end reports it (whichever loop made the call)."""
    if isinstance(e, SSL.SysCallError):
        return StreamTruncated(f"TLS stream ended without close_notify: {_syscall_reason(e)}")
    return StreamTruncated(f"TLS read failed: {_ssl_reason(e)}")


def write_failure(e: SSL.Error) -> StreamTruncated:
    """A failed SSL_write, likewise."""
    if isinstance(e, SSL.SysCallError):
        return StreamTruncated(f"TLS send failed: {_syscall_reason(e)}")
    return StreamTruncated(f"TLS error: {_ssl_reason(e)}")


def _syscall_reason(e: SSL.SysCallError) -> str:
    code = e.args[0] if e.args else None
    if code == -1:
        return "unexpected EOF"
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(e)


def _ssl_reason(e: SSL.Error) -> str:
    """The OpenSSL reason strings, e.g. 'certificate verify failed'."""
    parts = []
    for err in e.args[0] if e.args and isinstance(e.args[0], list) else []:
        # a failed system call leaves a ("system library", "", "") entry: no words in it
        if isinstance(err, tuple) and len(err) == 3 and err[2]:
            parts.append(str(err[2]))
    # OpenSSL 3 reports a FIN without close_notify as an error with no reason queued
    return ", ".join(parts) or "stream ended without close_notify (unexpected EOF, or a reset)"
