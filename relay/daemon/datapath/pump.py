"""The pumps: move bytes one way, src -> dst, until src ends; and bridge(), both ways.

Two interchangeable pumps behind one signature, `pump(src, dst, meter)`:
- `splice_pump`: plaintext to plaintext, zero-copy through a pipe (splice(2));
- `copy_pump`: anything to anything through one preallocated buffer
  (used whenever one side is TLS, and as the portable fallback).
`bridge` picks the pump per direction and runs both directions.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from array import array
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from relay.core.errors import RemoteError
from relay.daemon.datapath.conn import Conn, StreamTruncated

# 256 KiB, chosen against 64 KiB and 1 MiB by measurement (bench/README.md, "Plaintext
# legs"): what a pipe holds should stay in cache between the splice in and the splice out.
PIPE_SIZE_BYTES: Final = 256 * 1024
# A pump that never has to wait still lets other streams run once it has moved this much
# since it last yielded. Not after every round: small messages (the libvirt RPC channel)
# block on the next call and yield anyway, and an extra checkpoint is a scheduler pass
# (an epoll_wait) per message per hop; bulk streams reach the budget every chunk.
YIELD_EVERY_BYTES: Final = 256 * 1024
COPY_BUFFER_BYTES: Final = 256 * 1024
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Linux has no F_SETPIPE_SZ name in Python's fcntl on every build.
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class Meter:
    """Counts one direction's bytes: one integer addition per chunk, nothing else.

    A scrape reads `unflushed` of every live meter (metrics.py, `LiveBytes`), so the byte
    counters are current at any rate without the pump pushing anything; `flush()` hands
    the count to the counter once, when the stream ends. The compiled loops (hotloop.py)
    add to `live`, one int64 they update atomically from their thread.
    """

    __slots__ = ("_added", "_flushed", "_push", "live")

    def __init__(self, push: Callable[[int], None] | None = None) -> None:
        self._push = push
        self._flushed = 0
        self._added = 0
        self.live = array("q", [0])

    def add(self, n: int) -> None:
        self._added += n

    @property
    def total(self) -> int:
        return self._added + self.live[0]

    @property
    def unflushed(self) -> int:
        """Bytes counted here and not yet pushed to the counter."""
        return self.total - self._flushed

    def flush(self) -> None:
        total = self.total  # read once: a compiled loop may still be adding
        if self._push is not None and total > self._flushed:
            self._push(total - self._flushed)
        self._flushed = total


Pump = Callable[[Conn, Conn, Meter], Awaitable[None]]


def _open_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe; ask for PIPE_SIZE_BYTES and report what was granted."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # EPERM above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default size
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE_BYTES)
    return r, w, fcntl.fcntl(w, _F_GETPIPE_SZ)


async def splice_pump(src: Conn, dst: Conn, meter: Meter) -> None:
    """src -> pipe -> dst with splice(2); the bytes never enter Python."""
    src_fd, dst_fd = src.splice_fd, dst.splice_fd
    assert src_fd is not None and dst_fd is not None, "splice_pump needs two plaintext sockets"
    r, w, pipe_size = _open_pipe()
    in_pipe = 0  # bytes spliced in from src, not yet out to dst
    eof = False
    unyielded = 0  # bytes moved since this task last let others run
    try:
        while True:
            moved = False
            if not eof and in_pipe < pipe_size:
                try:
                    n = os.splice(src_fd, w, pipe_size - in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass  # src has nothing (or the pipe has no free slot): decided below
                else:
                    if n == 0:
                        eof = True
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
                    unyielded += n
                    moved = True
            if eof and not in_pipe:
                break
            if moved:
                if unyielded >= YIELD_EVERY_BYTES:
                    unyielded = 0
                    await trio.lowlevel.checkpoint()
            # Nothing moved: wait on the socket that blocks, never on the pipe. With
            # bytes in the pipe, dst refused them; with an empty pipe, src had none.
            elif in_pipe:
                unyielded = 0
                await trio.lowlevel.wait_writable(dst_fd)
            else:
                unyielded = 0
                await trio.lowlevel.wait_readable(src_fd)
    finally:
        os.close(r)
        os.close(w)
    await dst.send_eof()


async def copy_pump(src: Conn, dst: Conn, meter: Meter) -> None:
    """src -> one preallocated buffer -> dst; big reads, big writes, no per-chunk allocation."""
    buf = memoryview(bytearray(COPY_BUFFER_BYTES))
    unyielded = 0  # the ends may have waited (and so yielded) meanwhile; this bounds the rest
    while True:
        n = await src.recv_into(buf)
        if n == 0:
            break
        await dst.send_all(buf[:n])
        meter.add(n)
        unyielded += n
        if unyielded >= YIELD_EVERY_BYTES:
            unyielded = 0
            await trio.lowlevel.checkpoint()
    await dst.send_eof()


def choose_pump(src: Conn, dst: Conn, allow_splice: bool = True) -> Pump:
    if allow_splice and src.splice_fd is not None and dst.splice_fd is not None:
        return splice_pump
    return copy_pump


class StreamBroken(RemoteError):
    """A forwarded connection ended with an error in one of its directions."""


async def bridge(
    a: Conn,
    b: Conn,
    a_to_b: Meter,
    b_to_a: Meter,
    *,
    allow_splice: bool = True,
) -> None:
    """Move bytes both ways between a and b until the connection ends.

    When a forwarded connection ends is decided here, and only here:
    1. each direction ends at its EOF, which is passed on as a half-close while the
       other direction keeps flowing; both ended -> both sockets are closed;
    2. a failure in either direction (reset, broken pipe, TLS truncation) aborts
       both ends with RST, so neither client mistakes it for a clean end;
    3. cancellation (daemon shutdown past its drain deadline) aborts both, too.
    Raises StreamBroken for case 2; counters are flushed in every case.
    """
    await both_ways(
        a,
        b,
        a_to_b,
        b_to_a,
        lambda: (
            functools.partial(choose_pump(a, b, allow_splice), a, b, a_to_b),
            functools.partial(choose_pump(b, a, allow_splice), b, a, b_to_a),
        ),
    )


async def both_ways(
    a: Conn,
    b: Conn,
    a_to_b: Meter,
    b_to_a: Meter,
    directions: Callable[[], tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]],
) -> None:
    """bridge()'s contract around any two directions (the trio pumps, or threaded.py's).

    `directions` makes them (it may open what they need: an fd it cannot get fails the
    stream like any other OSError); each ends at its source's EOF. Both ended -> both
    ends closed; an OSError or a truncation in either -> StreamBroken and both aborted;
    cancelled -> both aborted. Meters are flushed in every case.
    """
    clean = False
    try:
        try:
            first, second = directions()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                nursery.start_soon(second)
        except* (OSError, StreamTruncated) as group:
            raise StreamBroken("; ".join(_describe(e) for e in group.exceptions)) from None
        clean = True
    finally:
        a_to_b.flush()
        b_to_a.flush()
        for end in (a, b):
            if clean:
                end.close()
            else:
                end.abort()


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno).lower()
    return str(e)
