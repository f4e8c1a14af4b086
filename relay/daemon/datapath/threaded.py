"""The threaded data path: each direction of an established stream runs in an OS thread.

trio sets a stream up (accept, dial, handshake, header) and still decides how it ends;
`threaded_bridge` has the contract of pump.bridge (half-close passed on, any failure or
cancellation aborts both ends, meters live and flushed). What moves the bytes is a thread
per direction doing the syscalls itself: splice(2) through a pipe between plaintext
sockets, SSL_read/SSL_write (cffi releases the GIL around both) where one side is TLS.
A message then costs its recv and its send and the wait between them, not trio's wakeup
path (epoll_wait, reschedule, an epoll_ctl re-arm), and two streams' AES runs on two cores.
What it measured against the trio pumps: bench/README.md, "Threads per stream".

Each loop exists twice: here in Python, and compiled (_hotloop.c, loaded by hotloop.py),
where a thread enters C once per run and takes no GIL while it moves bytes. `_Runs`
picks the compiled ones when they are built; the conformance suite runs both.

The sockets stay non-blocking, as trio expects them: a thread tries the call and, only
if it would block, waits in poll(2) on that socket and on its direction's `Wake`, an
eventfd. That is how trio stops a thread at once, whatever it waits for: cancellation
of the awaiting task (a drain deadline, a failure of the other direction, the ACK
watchdog) fires the wake, and the task waits until the thread has returned before the
sockets are aborted, so no thread ever touches a closed (and maybe reused) fd. A thread
that never waits checks the wake's flag once per chunk.

TLS: a TlsConn's `lock` is held around every OpenSSL call, here and in TlsConn itself,
since the two directions (and trio, ending a connection of a rekeyed chain) share one
SSL object. A RekeyConn (every TLS stream is one, on both relays) is driven through its
`reader_link`/`writer_link` hooks: a thread works on one connection of the chain and
returns to trio at each boundary (close_notify read, a threshold reached, a connection
that joined: `RekeyConn.wake_writer`), so all switching stays in trio, unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Final, Literal, TypeVar

import outcome
import trio
from OpenSSL import SSL

from relay.daemon.datapath import hotloop
from relay.daemon.datapath.conn import Conn, PlainConn, StreamTruncated, TlsConn, read_failure, write_failure
from relay.daemon.datapath.pump import (
    COPY_BUFFER_BYTES,
    Meter,
    StreamBroken,
    _open_pipe,
    both_ways,
    choose_pump,
)
from relay.daemon.datapath.rekey import Link, RekeyConn
from relay.daemon.tls_fastpath import TLS_RECORD_BYTES

T = TypeVar("T")
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_IN: Final = select.POLLIN
_OUT: Final = select.POLLOUT
# A compiled run on a rekeying chain returns to trio at least this often, to update the link's counts.
CHAIN_RUN_BYTES: Final = 16 << 20
# Why a thread came back to trio without an error: its source ended, or the chain needs trio.
Ended = Literal["eof", "chain"]


class _Stopped(Exception):
    """A thread saw its wake fired: the awaiting task was cancelled."""


class Wake:
    """Stops one direction's thread (cancellation), or hands its chain back to trio (`poke`).

    An eventfd for a thread waiting in poll(2), and flags for one that is busy: two bytes,
    [0] stopped and [1] poked, which the compiled loops read too.
    """

    __slots__ = ("fd", "flags", "running")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.flags = bytearray(2)
        self.running = False  # a thread of this direction is on the sockets

    @property
    def stopped(self) -> bool:
        return self.flags[0] != 0

    @property
    def poked(self) -> bool:
        return self.flags[1] != 0

    def unpoke(self) -> None:
        self.flags[1] = 0

    def stop(self) -> None:
        self.flags[0] = 1
        os.eventfd_write(self.fd, 1)

    def poke(self) -> None:
        self.flags[1] = 1
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        os.close(self.fd)


class _Waiter:
    """poll(2) on one socket (for reading or writing) and on the wake; built once per thread run."""

    __slots__ = ("_polls", "_wake")

    def __init__(self, wake: Wake) -> None:
        self._wake = wake
        self._polls: dict[tuple[int, int], select.poll] = {}

    def wait(self, fd: int, events: int, *, pokable: bool = False) -> bool:
        """Return once fd may be ready: True, or False if poked (only when `pokable`).

        Raises _Stopped once the wake is fired. POLLERR/POLLHUP count as ready: the call
        that is retried reports them.
        """
        wake = self._wake
        if (p := self._polls.get((fd, events))) is None:
            p = self._polls[fd, events] = select.poll()
            p.register(fd, events)
            p.register(wake.fd, _IN)
        while True:
            if wake.stopped:
                raise _Stopped
            if pokable and wake.poked:
                wake.unpoke()
                return False
            ready = p.poll()
            if len(ready) == 2 or ready[0][0] != wake.fd:
                return True
            # BlockingIOError: read by a wait of an earlier run; the flags say what it meant
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(wake.fd)


# --- one side of a direction, as a thread sees it --------------------------------------


class _PlainSource:
    """recv from a plaintext socket; after a short read, wait first (the next try would fail)."""

    def __init__(self, conn: PlainConn, waiter: _Waiter) -> None:
        self._sock = conn.raw
        self._fd = self._sock.fileno()
        self._waiter = waiter
        self._empty = False  # the last read was short: nothing is queued behind it

    def recv_into(self, buf: memoryview, *, pokable: bool = False) -> int | None:
        """Bytes read (0 at EOF), or None if poked while waiting."""
        while True:
            if self._empty and not self._waiter.wait(self._fd, _IN, pokable=pokable):
                return None
            try:
                got = self._sock.recv_into(buf)
            except BlockingIOError:
                self._empty = True
                continue
            self._empty = 0 < got < len(buf)
            return got


class _PlainSink:
    """send to a plaintext socket, all of it."""

    def __init__(self, conn: PlainConn, waiter: _Waiter) -> None:
        self._sock = conn.raw
        self._fd = self._sock.fileno()
        self._waiter = waiter

    def send_all(self, view: memoryview) -> None:
        sock = self._sock
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                self._waiter.wait(self._fd, _OUT)
                continue
            if sent == len(view):
                return
            view = view[sent:]


class _TlsEnd:
    """One TLS connection as a thread drives it: TlsConn's recv_into and send_all, its lock held per call.

    What a call needs is looked up once per thread run, not per message.
    """

    def __init__(self, conn: TlsConn, waiter: _Waiter) -> None:
        self._conn = conn
        self._ssl = conn.ssl
        self._read = conn.read_fn
        self._write = conn.write_fn
        self._lock = conn.lock
        self._fd = conn.socket.fileno()
        self._waiter = waiter

    def recv_into(self, buf: memoryview, *, wait_first: bool = False) -> int:
        """As many whole records as are here, at least one byte; 0 at close_notify.

        `wait_first`: the last call ended on a short record, which OpenSSL (no read-ahead)
        handed over whole, so it holds nothing more: wait before trying, and spare an
        SSL_read that would fail (a syscall and a Python exception per message).
        """
        ssl, read, lock, fd, waiter = self._ssl, self._read, self._lock, self._fd, self._waiter
        if self._conn.failed is not None:
            raise read_failure(self._conn.failed)
        if wait_first:
            waiter.wait(fd, _IN)
        while True:
            try:
                with lock:
                    got = read(ssl, buf)
            except SSL.WantReadError:
                waiter.wait(fd, _IN)
                continue
            except SSL.WantWriteError:
                waiter.wait(fd, _OUT)
                continue
            except SSL.ZeroReturnError:
                return 0
            except SSL.Error as e:
                raise read_failure(e) from None
            return self._conn.read_queued(buf, got)

    def send_all(self, view: memoryview) -> None:
        """Whole-chunk SSL_write; after a WantWrite the same chunk again (OpenSSL resumes it)."""
        ssl, write, lock = self._ssl, self._write, self._lock
        try:
            while view:
                try:
                    with lock:
                        n = write(ssl, view)
                except SSL.WantWriteError:
                    self._waiter.wait(self._fd, _OUT)
                    continue
                except SSL.WantReadError:
                    self._waiter.wait(self._fd, _IN)
                    continue
                view = view[n:]
        except SSL.Error as e:
            raise write_failure(e) from None


# --- what a thread runs -------------------------------------------------------------------


def _splice(src: PlainConn, dst: PlainConn, meter: Meter, wake: Wake) -> Ended:
    """src -> pipe -> dst with splice(2), as pump.splice_pump, waiting in poll(2)."""
    waiter = _Waiter(wake)
    src_fd, dst_fd = src.raw.fileno(), dst.raw.fileno()
    r, w, pipe_size = _open_pipe()
    in_pipe = 0
    eof = False
    empty = False  # the last splice in was short: wait before the next
    try:
        while True:
            if wake.stopped:
                raise _Stopped
            moved = False
            if not eof and in_pipe < pipe_size and not empty:
                try:
                    n = os.splice(src_fd, w, pipe_size - in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    empty = True
                else:
                    eof = n == 0
                    empty = 0 < n < pipe_size - in_pipe
                    in_pipe += n
                    moved = True
            if in_pipe:
                try:
                    n = os.splice(r, dst_fd, in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                else:
                    in_pipe -= n
                    meter.add(n)
                    moved = True
            if eof and not in_pipe:
                return "eof"
            if moved and not (empty and not in_pipe):
                continue
            # Nothing moved, or only a short read went through: wait on the socket that
            # blocks, never on the pipe.
            if in_pipe:
                waiter.wait(dst_fd, _OUT)
            else:
                waiter.wait(src_fd, _IN)
                empty = False
    finally:
        os.close(r)
        os.close(w)


def _copy(src: PlainConn, dst: PlainConn, buf: memoryview, meter: Meter, wake: Wake) -> Ended:
    """plain -> buffer -> plain (the --no-splice path)."""
    waiter = _Waiter(wake)
    source, sink = _PlainSource(src, waiter), _PlainSink(dst, waiter)
    while True:
        if wake.stopped:
            raise _Stopped
        n = source.recv_into(buf)
        if not n:
            return "eof"
        sink.send_all(buf[:n])
        meter.add(n)


def _from_tls(
    src: TlsConn, dst: PlainConn, buf: memoryview, meter: Meter, wake: Wake, chain: tuple[RekeyConn, Link] | None
) -> Ended:
    """TLS -> buffer -> plain, until close_notify (or, on a chain, a threshold)."""
    waiter = _Waiter(wake)
    source, sink = _TlsEnd(src, waiter), _PlainSink(dst, waiter)
    short = False
    while True:
        if wake.stopped:
            raise _Stopped
        n = source.recv_into(buf, wait_first=short)
        if n == 0:
            return "eof"
        short = n % TLS_RECORD_BYTES != 0
        if chain is not None:
            chain[1].received += n
        sink.send_all(buf[:n])
        meter.add(n)
        if chain is not None and chain[0].rx_due(chain[1]):
            return "chain"


def _to_tls(
    src: PlainConn, dst: TlsConn, buf: memoryview, meter: Meter, wake: Wake, chain: tuple[RekeyConn, Link] | None
) -> Ended:
    """plain -> buffer -> TLS, until src's EOF (or, on a chain, a threshold or a connection that joined)."""
    waiter = _Waiter(wake)
    source, sink = _PlainSource(src, waiter), _TlsEnd(dst, waiter)
    pokable = chain is not None
    while True:
        if wake.stopped:
            raise _Stopped
        n = source.recv_into(buf, pokable=pokable)
        if n is None:
            return "chain"  # poked while idle: trio moves the writer on
        if n == 0:
            return "eof"
        sink.send_all(buf[:n])
        if chain is not None:
            chain[1].sent += n
        meter.add(n)
        if chain is not None and chain[0].tx_due(chain[1]):
            return "chain"


# --- the same runs, compiled (hotloop.py) ----------------------------------------------------
# Each is one call into _hotloop.c that returns at the source's end, at a stop or a poke, or
# once a rekey threshold's bytes have moved; the byte counts go to the meter's `live`.


def _ended(outcome: int, hot: ModuleType) -> Ended:
    if outcome == hot.STOP:
        raise _Stopped
    return "eof" if outcome == hot.EOF else "chain"


def _tls_failure(done: tuple[int, ...], reading: bool) -> StreamTruncated:
    """The exception the Python loops raise for the same failure, mapped in this thread
    (OpenSSL's error queue is per thread) from SSL_get_error and errno as the C call saw them."""
    e = hotloop.tls_error(done[3], done[2], done[4])
    return read_failure(e) if reading else write_failure(e)


def _chain_budget(left: int) -> int:
    """Bytes a run on a chain's link may move: what is left to its threshold, and at most
    CHAIN_RUN_BYTES, so that the link's counts (which a declined switch sets the next
    threshold from, and the switch log reports) are never further behind than that."""
    return max(1, min(left, CHAIN_RUN_BYTES))


def _c_splice(hot: ModuleType, src: PlainConn, dst: PlainConn, meter: Meter, wake: Wake) -> Ended:
    r, w, pipe_size = _open_pipe()
    try:
        done = hot.splice(src.raw.fileno(), dst.raw.fileno(), r, w, pipe_size, wake.fd, wake.flags, meter.live)
    finally:
        os.close(r)
        os.close(w)
    return _ended(done[0], hot)


def _c_from_tls(
    hot: ModuleType,
    src: TlsConn,
    dst: PlainConn,
    buf: memoryview,
    meter: Meter,
    wake: Wake,
    chain: tuple[RekeyConn, Link] | None,
) -> Ended:
    ssl, ssl_fd, dst_fd = hotloop.ssl_address(src.ssl), src.socket.fileno(), dst.raw.fileno()
    short = False
    while True:
        budget = sys.maxsize if chain is None else _chain_budget(chain[1].rx_limit - chain[1].received)
        done = hot.from_tls(dst_fd, ssl, src.lock, ssl_fd, wake.fd, wake.flags, meter.live, buf, budget, short)
        outcome, short = done[0], bool(done[5])
        if chain is not None:
            chain[1].received += done[1]
        if outcome == hot.TLS:
            raise _tls_failure(done, reading=True)
        if outcome != hot.CHAIN:
            return _ended(outcome, hot)
        if chain is None or chain[0].rx_due(chain[1]):
            return "chain"
        # the threshold is passed but a switch is under way: go on, and ask again after a chunk


def _c_to_tls(
    hot: ModuleType,
    src: PlainConn,
    dst: TlsConn,
    buf: memoryview,
    meter: Meter,
    wake: Wake,
    chain: tuple[RekeyConn, Link] | None,
) -> Ended:
    """Comes back at a threshold, and on a poke (busy or not): trio's writer_link decides."""
    budget = sys.maxsize if chain is None else _chain_budget(chain[1].tx_limit - chain[1].sent)
    ssl, src_fd, ssl_fd = hotloop.ssl_address(dst.ssl), src.raw.fileno(), dst.socket.fileno()
    done = hot.to_tls(src_fd, ssl, dst.lock, ssl_fd, wake.fd, wake.flags, meter.live, buf, budget, chain is not None)
    if chain is not None:
        chain[1].sent += done[1]
    if done[0] == hot.TLS:
        raise _tls_failure(done, reading=False)
    return _ended(done[0], hot)


class _Runs:
    """Which loops a stream's threads run: the compiled ones, or Python's."""

    def __init__(self, hot: ModuleType | None) -> None:
        self.splice: Callable[[PlainConn, PlainConn, Meter, Wake], Ended] = _splice
        self.from_tls: Callable[..., Ended] = _from_tls
        self.to_tls: Callable[..., Ended] = _to_tls
        if hot is not None:
            self.splice = functools.partial(_c_splice, hot)
            self.from_tls = functools.partial(_c_from_tls, hot)
            self.to_tls = functools.partial(_c_to_tls, hot)


# --- trio's side ---------------------------------------------------------------------------


async def in_thread(fn: Callable[[], T], wake: Wake) -> T:
    """Run fn in a (cached) worker thread; cancellation stops it through `wake` and waits for it.

    Not trio.to_thread.run_sync: its default limiter (40 threads for the whole process)
    would leave streams queued behind others that never end, and abandoning a thread on
    cancellation would leave it on sockets that are about to be closed. The number of
    threads is bounded by the streams admitted ([limits] streams_per_peer): two per stream.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:
        wake.running = False  # in the worker thread, done with the sockets
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        wake.stop()
        return trio.lowlevel.Abort.FAILED  # rescheduled by deliver, promptly

    wake.running = True
    trio.lowlevel.start_thread_soon(fn, deliver, name="migrelay pump")
    try:
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    except _Stopped:
        await trio.lowlevel.checkpoint()  # only a cancellation stops a thread: raises Cancelled
        raise AssertionError("a pump thread stopped without a cancellation") from None
    return result


async def _direction(src: Conn, dst: Conn, meter: Meter, wake: Wake, allow_splice: bool, runs: _Runs) -> None:
    """One direction, src -> dst, until src ends; then the half-close, as the trio pumps."""
    if isinstance(src, PlainConn) and isinstance(dst, PlainConn):
        if allow_splice:
            await in_thread(lambda: runs.splice(src, dst, meter, wake), wake)
        else:
            buf = memoryview(bytearray(COPY_BUFFER_BYTES))
            await in_thread(lambda: _copy(src, dst, buf, meter, wake), wake)
        await dst.send_eof()
        return
    buf = memoryview(bytearray(COPY_BUFFER_BYTES))
    if isinstance(src, TlsConn) and isinstance(dst, PlainConn):
        await in_thread(lambda: runs.from_tls(src, dst, buf, meter, wake, None), wake)
    elif isinstance(src, RekeyConn) and isinstance(dst, PlainConn):
        await _from_chain(src, dst, buf, meter, wake, runs)
    elif isinstance(src, PlainConn) and isinstance(dst, TlsConn):
        await in_thread(lambda: runs.to_tls(src, dst, buf, meter, wake, None), wake)
    elif isinstance(src, PlainConn) and isinstance(dst, RekeyConn):
        await _to_chain(src, dst, buf, meter, wake, runs)
        return  # the chain's send_eof is the writer's, done there
    else:
        # no pair the relay builds (its local end is always plaintext): the trio pump
        await choose_pump(src, dst, allow_splice)(src, dst, meter)
        return
    await dst.send_eof()


async def _from_chain(src: RekeyConn, dst: PlainConn, buf: memoryview, meter: Meter, wake: Wake, runs: _Runs) -> None:
    link = await src.reader_link()
    while True:
        ended = await in_thread(lambda: runs.from_tls(link.conn, dst, buf, meter, wake, (src, link)), wake)  # noqa: B023
        if ended == "eof":
            following = await src.reader_eof(link)
            if following is None:
                return
        link = await src.reader_link()


async def _to_chain(src: PlainConn, dst: RekeyConn, buf: memoryview, meter: Meter, wake: Wake, runs: _Runs) -> None:
    dst.wake_writer = wake.poke
    try:
        while True:
            link = await dst.writer_link()
            with dst.writer_held():
                ended = await in_thread(lambda: runs.to_tls(src, link.conn, buf, meter, wake, (dst, link)), wake)  # noqa: B023
            if ended == "eof":
                await dst.send_eof()
                return
    finally:
        dst.wake_writer = None


async def threaded_bridge(
    a: Conn,
    b: Conn,
    a_to_b: Meter,
    b_to_a: Meter,
    *,
    allow_splice: bool = True,
    compiled: bool = True,
) -> None:
    """pump.bridge, with each direction's bytes moved by a thread. The same contract:

    1. each direction ends at its EOF, passed on as a half-close while the other keeps
       flowing; both ended -> both sockets are closed;
    2. a failure in either direction aborts both ends with RST (StreamBroken);
    3. cancellation aborts both, once both threads have returned.

    `compiled`: run the compiled loops if they are built (hotloop.py); False: Python's.
    """
    wakes: list[Wake] = []
    runs = _Runs(hotloop.compiled() if compiled else None)
    chains = [end for end in (a, b) if isinstance(end, RekeyConn)]

    def directions() -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
        wakes.append(Wake())  # an fd each: out of fds, the stream fails and nothing leaks
        wakes.append(Wake())
        return (
            functools.partial(_direction, a, b, a_to_b, wakes[0], allow_splice, runs),
            functools.partial(_direction, b, a, b_to_a, wakes[1], allow_splice, runs),
        )

    with trio.CancelScope() as scope:

        def defer_abort() -> bool:
            """A chain aborted by trio (a switch that failed) while threads are on its sockets."""
            if not any(wake.running for wake in wakes):
                return False
            scope.cancel()  # stops the threads; both_ways aborts both ends once they returned
            return True

        for chain in chains:
            chain.defer_abort = defer_abort
        try:
            await both_ways(a, b, a_to_b, b_to_a, directions)
        finally:
            for chain in chains:
                chain.defer_abort = None
            for wake in wakes:
                wake.close()
    if scope.cancelled_caught:
        raise StreamBroken("the stream was aborted while it moved to a fresh TLS connection")
