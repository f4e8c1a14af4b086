"""Load for the soak and the fault runs: framed streams of every kind through a relay pair.

This process plays both hypervisors. A client connects to hvA's overlay socket
`<A>/hvB/<name>`; hvA forwards it over TLS to hvB, which connects it to `<B>/hvB/<name>`,
where this process listens too (`Load.serve_targets`: the destination target). Every
stream is framed, so each end knows what it should receive and can tell a complete stream
from a short, reset or corrupt one:

     0      4   5    6    8           16          24             32          40
     +------+---+----+----+-----------+-----------+--------------+-----------+
     |magic |ver|kind| -- | stream id | length    | reply length | abort at  |   header
     +------+---+----+----+-----------+-----------+--------------+-----------+
     then `length` payload bytes, then their sha256 (32 bytes), then EOF (a half-close).

The client's header tells the target what to do (how much to send back, whether to read
slowly, where to abort); the target answers with its own frame, whose stream id must be
the client's, so a cross-wired stream shows as corrupt.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import math
import os
import random
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from relay.tools import loopback
from tests.support import Pki, connect, listen

HEADER: Final = struct.Struct("!4sBB2xQQQQ")
MAGIC: Final = b"SOAK"
VERSION: Final = 1
DIGEST_BYTES: Final = 32
CHUNK_BYTES: Final = 256 * 1024
# Payload comes from one random pool read at rotating offsets: cheap, and no two chunks alike.
POOL_BYTES: Final = 16 << 20
POOL_STRIDE_BYTES: Final = 7_340_033  # a prime: successive chunks start at unrelated offsets
KIB: Final = 1 << 10
MIB: Final = 1 << 20
GIB: Final = 1 << 30

# Slow readers take small reads with pauses (at most ~3 MB/s), far below what the relays
# carry, so every buffer on the way fills and back-pressure reaches the sender.
SLOW_READ_BYTES: Final = 16 * KIB
SLOW_PAUSE_S: Final = 0.005
# A stream end that moves no byte for this long is hung (a relay bug): it is cancelled and reported.
STALL_S: Final = 30.0
WATCHDOG_PERIOD_S: Final = 1.0

FORWARDED: Final = ("migration.sock", "nbd.sock")
# Names hvA forwards and hvB refuses, each for its own reason.
REFUSED: Final = {
    "gone.sock": "no-target: nothing at <B>/hvB/gone.sock",
    "stale.sock": "no-target: a socket file nobody listens on (a dead QEMU's)",
    "secret.sock": "forbidden: a channel hvB does not allow hvA",
}


class Kind(enum.IntEnum):
    BULK = 1  # both ways at once, sizes log-uniform 1 KiB .. 1 GiB each way
    TINY = 2  # 0 .. 1 KiB each way
    EMPTY = 3  # connect and close: no byte either way
    REFUSED = 4  # a name hvB refuses: the client must see a close without data
    ABORT_CLIENT = 5  # the client goes away mid-stream, unread data in its socket
    ABORT_TARGET = 6  # the destination target goes away mid-stream, unread data in its socket
    SLOW_CLIENT = 7  # the client reads the reply slowly
    SLOW_TARGET = 8  # the target reads the request slowly
    VANISH_CLIENT = 9  # (faults) the client is a process, SIGKILLed mid-stream
    # (faults) both ends send abort_at payload bytes, then only wait for the rest of the other's
    # frame, which never comes: an idle stream, nothing in flight (a paused guest's)
    IDLE = 10
    # (faults) the client sends its whole frame; the target sends abort_at bytes, then only
    # waits: data in flight one way, as in a migration stream
    ONE_WAY = 11


ABORTS: Final = (Kind.ABORT_CLIENT, Kind.ABORT_TARGET)
# Kinds whose client, or target, stops sending at abort_at without closing (and, if it aborts, reads no further).
CLIENT_STOPS: Final = (Kind.ABORT_CLIENT, Kind.IDLE)
TARGET_STOPS: Final = (Kind.ABORT_TARGET, Kind.IDLE, Kind.ONE_WAY)
# Kinds that must arrive complete and byte-exact at both ends.
COMPLETE_KINDS: Final = (Kind.BULK, Kind.TINY, Kind.SLOW_CLIENT, Kind.SLOW_TARGET)


class Seen(enum.Enum):
    """What one end observed in one direction."""

    COMPLETE = "complete"  # the whole frame, digest right, then EOF
    SHORT = "eof-short"  # a clean EOF before the end of the frame
    RESET = "ECONNRESET"
    PIPE = "EPIPE"
    CORRUPT = "CORRUPT"  # wrong header, wrong digest, bytes after the trailer: never allowed
    STOPPED = "stopped"  # this end stopped on purpose (it is the one that aborted)
    OTHER = "other-error"  # any other errno: never expected


ERRORS: Final = frozenset({Seen.SHORT, Seen.RESET, Seen.PIPE})
EMPTY_DETAIL: Final = "EOF before any byte"


@dataclass
class Half:
    """One direction as one end saw it; `bytes` counts payload only."""

    seen: Seen
    bytes: int = 0
    detail: str = ""


@dataclass
class End:
    recv: Half
    send: Half

    def summary(self) -> str:
        return f"recv {self.recv.seen.value}, send {self.send.seen.value}"


@dataclass
class Stream:
    id: int
    kind: Kind
    name: str
    a2b: int = 0  # payload bytes client -> target
    b2a: int = 0  # payload bytes target -> client
    abort_at: int = 0  # payload bytes each way before the aborting end goes away
    client: End | None = None
    target: End | None = None
    hung: str = ""
    # frame bytes, for the back-pressure figure of slow readers
    a2b_sent: int = 0
    a2b_read: int = 0
    b2a_sent: int = 0
    b2a_read: int = 0
    max_lag: int = 0  # most bytes sent but not yet read by the slow reader
    started: float = 0.0
    ended: float = 0.0  # when the client's end finished (trio clock)
    target_ended: float = 0.0  # when the target's end finished

    def header(self, reply: bool = False) -> bytes:
        if reply:
            return HEADER.pack(MAGIC, VERSION, self.kind, self.id, self.b2a, 0, self.abort_at)
        return HEADER.pack(MAGIC, VERSION, self.kind, self.id, self.a2b, self.b2a, self.abort_at)

    @property
    def big(self) -> bool:
        return max(self.a2b, self.b2a) > BIG_BYTES

    def describe(self) -> str:
        return (
            f"#{self.id} {self.kind.name} {self.name} a2b={self.a2b} b2a={self.b2a} abort_at={self.abort_at}: "
            f"client [{self.client.summary() if self.client else 'none'}] "
            f"target [{self.target.summary() if self.target else 'none'}]"
            + (f" HUNG at {self.hung}" if self.hung else "")
        )


# A bulk stream above this counts as big; only MAX_BIG_IN_FLIGHT of them run at once. Sizes
# log-uniform up to 1 GiB put a stream of hundreds of MiB in most slots after a while (a slot
# holds a stream for as long as it takes), and on 2 cores the pair carries ~100 MB/s in all:
# 64 such streams would get ~1.5 MB/s each, finish after the run and make its end wait many
# minutes. A draw above the cap while it is full is drawn again below BIG_BYTES.
BIG_BYTES: Final = 64 * MIB
MAX_BIG_IN_FLIGHT: Final = 4
ONE_WAY_SHARE: Final = 0.2


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class Pool:
    def __init__(self, rng: random.Random) -> None:
        self.data = memoryview(rng.randbytes(POOL_BYTES))

    def chunk(self, seed: int, i: int, n: int) -> memoryview:
        start = (seed + i * POOL_STRIDE_BYTES) % (POOL_BYTES - CHUNK_BYTES)
        return self.data[start : start + n]


@dataclass(eq=False)  # identity: kept in a set
class Watch:
    """One stream end's last sign of life, for the stall watchdog."""

    what: str
    stream: Stream | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    at: float = field(default_factory=trio.current_time)

    def tick(self) -> None:
        self.at = trio.current_time()


def _seen(e: OSError) -> Half:
    if e.errno == errno.ECONNRESET:
        return Half(Seen.RESET)
    if e.errno == errno.EPIPE:
        return Half(Seen.PIPE)
    return Half(Seen.OTHER, detail=errno.errorcode.get(e.errno or 0, str(e)))


async def _send_all(sock: trio.socket.SocketType, view: memoryview, watch: Watch, count: Callable[[int], None]) -> None:
    while view:
        n = await sock.send(view)
        view = view[n:]
        count(n)
        watch.tick()


async def send_frame(
    sock: trio.socket.SocketType,
    header: bytes,
    length: int,
    pool: Pool,
    seed: int,
    watch: Watch,
    count: Callable[[int], None],
    stop_at: int | None = None,
) -> Half:
    """Header, `length` payload bytes, their digest, half-close; with stop_at only the first stop_at bytes."""
    h = hashlib.sha256()
    sent = 0
    try:
        await _send_all(sock, memoryview(header), watch, count)
        limit = length if stop_at is None else min(stop_at, length)
        i = 0
        while sent < limit:
            chunk = pool.chunk(seed, i, min(CHUNK_BYTES, limit - sent))
            h.update(chunk)
            await _send_all(sock, chunk, watch, count)
            sent += len(chunk)
            i += 1
        if stop_at is not None:
            return Half(Seen.STOPPED, sent)
        await _send_all(sock, memoryview(h.digest()), watch, count)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        half = _seen(e)
        half.bytes = sent
        return half
    return Half(Seen.COMPLETE, sent)


async def _recv_exact(sock: trio.socket.SocketType, view: memoryview, watch: Watch) -> int:
    """Fill view; fewer bytes only at EOF."""
    got = 0
    while got < len(view):
        n = await sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
        watch.tick()
    return got


async def recv_header(sock: trio.socket.SocketType, watch: Watch) -> tuple[int, Kind, int, int, int] | Half:
    """(stream id, kind, length, reply length, abort at), or what went wrong (SHORT with 0 bytes: empty)."""
    raw = bytearray(HEADER.size)
    try:
        got = await _recv_exact(sock, memoryview(raw), watch)
    except OSError as e:
        return _seen(e)
    if got < HEADER.size:
        return Half(Seen.SHORT, detail=EMPTY_DETAIL if got == 0 else f"{got} header bytes")
    magic, version, kind, stream_id, length, reply, abort_at = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION or kind not in Kind._value2member_map_:
        return Half(Seen.CORRUPT, detail=f"bad header {bytes(raw[:8]).hex()}")
    return stream_id, Kind(kind), length, reply, abort_at


async def recv_body(
    sock: trio.socket.SocketType,
    buf: memoryview,
    length: int,
    watch: Watch,
    count: Callable[[int], None],
    slow: bool = False,
    stop_at: int | None = None,
) -> Half:
    """`length` payload bytes, the digest (must match), then EOF (nothing after it)."""
    h = hashlib.sha256()
    got = 0
    try:
        limit = length if stop_at is None else min(stop_at, length)
        while got < limit:
            view = buf[: min(len(buf), limit - got, SLOW_READ_BYTES if slow else len(buf))]
            n = await sock.recv_into(view)
            if n == 0:
                return Half(Seen.SHORT, got)
            h.update(view[:n])
            got += n
            count(n)
            watch.tick()
            if slow:
                await trio.sleep(SLOW_PAUSE_S)
        if stop_at is not None:
            return Half(Seen.STOPPED, got)
        trailer = bytearray(DIGEST_BYTES)
        n = await _recv_exact(sock, memoryview(trailer), watch)
        if n < DIGEST_BYTES:
            return Half(Seen.SHORT, got, f"{n} digest bytes")
        count(n)
        if trailer != h.digest():
            return Half(Seen.CORRUPT, got, "sha256 mismatch")
        if await sock.recv_into(buf[:1]):
            return Half(Seen.CORRUPT, got, "bytes after the digest")
    except OSError as e:
        half = _seen(e)
        half.bytes = got
        return half
    return Half(Seen.COMPLETE, got)


async def abort(sock: trio.socket.SocketType, watch: Watch) -> None:
    """Go away with data unread: on a unix socket that is what makes the other side see ECONNRESET.

    (AF_UNIX has no RST; a close with an empty receive queue is a plain EOF for the peer.)
    The other side's frame is longer than what this end read, so more data is on its way.
    """
    await trio.lowlevel.wait_readable(sock)
    watch.tick()
    sock.close()


@dataclass
class Load:
    """The streams of one run, both of their ends, and the stall watchdog."""

    overlay: Path  # hvA's folder for hvB: where clients connect
    rng: random.Random
    pool: Pool
    streams: dict[int, Stream] = field(default_factory=dict)
    watches: set[Watch] = field(default_factory=set)
    empty_targets: int = 0  # target connections that carried no byte (EMPTY streams have no id)
    anomalies: list[str] = field(default_factory=list)  # target-side surprises; the test fails on any
    big_in_flight: int = 0
    clients_in_flight: int = 0
    active_targets: int = 0
    payload_bytes: int = 0  # payload received complete and verified, both directions
    _ids: int = 0

    @classmethod
    def new(cls, overlay: Path, seed: int) -> Load:
        rng = random.Random(seed)
        return cls(overlay, rng, Pool(rng))

    def watch(self, what: str, stream: Stream | None) -> Watch:
        w = Watch(what, stream)
        self.watches.add(w)
        return w

    def stream(self, kind: Kind, name: str | None = None, a2b: int = 0, b2a: int = 0, abort_at: int = 0) -> Stream:
        self._ids += 1
        if name is None:
            name = self.rng.choice(list(REFUSED) if kind == Kind.REFUSED else FORWARDED)
        s = Stream(self._ids, kind, name, a2b, b2a, abort_at, started=trio.current_time())
        self.streams[s.id] = s
        return s

    def plan(self, kind: Kind, max_bytes: int, allow_big: bool = True) -> Stream:
        """A stream of `kind` with random sizes; bulk draws above BIG_BYTES only while there is room."""
        r = self.rng
        if kind == Kind.BULK:
            a2b, b2a = log_uniform(r, KIB, max_bytes), log_uniform(r, KIB, max_bytes)
            if max(a2b, b2a) > BIG_BYTES and (not allow_big or self.big_in_flight >= MAX_BIG_IN_FLIGHT):
                a2b, b2a = min(a2b, log_uniform(r, KIB, BIG_BYTES)), min(b2a, log_uniform(r, KIB, BIG_BYTES))
            # some one-way, as a migration stream nearly is: the other direction is only a frame
            if r.random() < ONE_WAY_SHARE:
                a2b, b2a = (a2b, 0) if r.random() < 0.5 else (0, b2a)
            return self.stream(kind, a2b=a2b, b2a=b2a)
        if kind == Kind.TINY:
            return self.stream(kind, a2b=r.randrange(KIB), b2a=r.randrange(KIB))
        if kind in (Kind.SLOW_CLIENT, Kind.SLOW_TARGET):
            # well above what the buffers between the ends hold (unix 2 MiB, TCP several MiB)
            return self.stream(kind, a2b=log_uniform(r, 8 * MIB, 32 * MIB), b2a=log_uniform(r, 8 * MIB, 32 * MIB))
        if kind in ABORTS:
            a2b, b2a = log_uniform(r, MIB, 64 * MIB), log_uniform(r, MIB, 64 * MIB)
            # mid-stream in both directions, with more still coming: half the shorter one at most
            return self.stream(kind, a2b=a2b, b2a=b2a, abort_at=r.randrange(1, min(a2b, b2a) // 2))
        return self.stream(kind)

    # --- the client end ---------------------------------------------------------------

    async def run_client(self, s: Stream) -> None:
        """Drive the client end of `s` to its end; the outcome lands in s.client."""
        w = self.watch(f"client #{s.id}", s)
        big = s.big
        self.big_in_flight += big
        self.clients_in_flight += 1
        try:
            with w.scope:
                sock = await connect(self.overlay / s.name)
                with sock:
                    s.client = await self._client(s, sock, w)
        finally:
            self.big_in_flight -= big
            self.clients_in_flight -= 1
            self.watches.discard(w)
            s.ended = trio.current_time()

    async def _client(self, s: Stream, sock: trio.socket.SocketType, w: Watch) -> End:
        if s.kind == Kind.EMPTY:
            if self.rng.random() < 0.5:
                return End(Half(Seen.STOPPED), Half(Seen.COMPLETE))  # connect, close at once
            sock.shutdown(socket.SHUT_WR)  # connect, half-close, and expect a clean EOF with no byte
            got = await recv_header(sock, w)
            if not isinstance(got, Half):
                return End(Half(Seen.CORRUPT, detail="a header on an empty stream"), Half(Seen.COMPLETE))
            if got.seen == Seen.SHORT and got.detail == EMPTY_DETAIL:
                return End(Half(Seen.COMPLETE), Half(Seen.COMPLETE))
            return End(got, Half(Seen.COMPLETE))
        if s.kind == Kind.REFUSED:
            sent = Half(Seen.COMPLETE)
            if self.rng.random() < 0.5:  # a client that writes at once, as QEMU does
                sent = await send_frame(sock, s.header(), 0, self.pool, 0, w, lambda n: None, stop_at=0)
            buf = bytearray(64)
            try:
                n = await sock.recv_into(buf)
            except OSError as e:
                return End(_seen(e), sent)
            return End(Half(Seen.SHORT, n) if n == 0 else Half(Seen.CORRUPT, n, "data from a refused name"), sent)
        aborting = s.kind == Kind.ABORT_CLIENT
        stop_at = s.abort_at if aborting else None
        send_stop_at = s.abort_at if s.kind in CLIENT_STOPS else None
        result: dict[str, Half] = {}

        def a2b(n: int) -> None:
            s.a2b_sent += n

        async def send() -> None:
            result["send"] = await send_frame(sock, s.header(), s.a2b, self.pool, s.id * 8191, w, a2b, send_stop_at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            result["recv"] = await self._client_recv(s, sock, w, stop_at)
        if aborting:
            await abort(sock, w)
        return End(result["recv"], result["send"])

    async def _client_recv(self, s: Stream, sock: trio.socket.SocketType, w: Watch, stop_at: int | None) -> Half:
        got = await recv_header(sock, w)
        if isinstance(got, Half):
            return got
        stream_id, kind, length, _, _ = got
        if (stream_id, kind, length) != (s.id, s.kind, s.b2a):
            return Half(Seen.CORRUPT, detail=f"reply header for #{stream_id} {kind.name} {length}")
        buf = memoryview(bytearray(CHUNK_BYTES))

        def b2a(n: int) -> None:
            s.b2a_read += n
            if s.kind == Kind.SLOW_CLIENT:
                s.max_lag = max(s.max_lag, s.b2a_sent - s.b2a_read)

        half = await recv_body(sock, buf, s.b2a, w, b2a, slow=s.kind == Kind.SLOW_CLIENT, stop_at=stop_at)
        if half.seen == Seen.COMPLETE:
            self.payload_bytes += half.bytes
        return half

    # --- the target end ---------------------------------------------------------------

    async def serve_targets(self, listener: trio.socket.SocketType) -> None:
        """The destination hypervisor: every connection hvB makes to one of our sockets."""
        async with trio.open_nursery() as n:
            while True:
                conn, _ = await listener.accept()
                n.start_soon(self._target, conn)

    async def _target(self, conn: trio.socket.SocketType) -> None:
        w = self.watch("target before its header", None)
        self.active_targets += 1
        try:
            with conn, w.scope:
                got = await recv_header(conn, w)
                if isinstance(got, Half):
                    if got.seen == Seen.SHORT and got.detail == EMPTY_DETAIL:
                        self.empty_targets += 1
                    else:
                        self.anomalies.append(f"target: a connection whose header was {got.seen.value} {got.detail}")
                    return
                stream_id, kind, length, reply, abort_at = got
                s = self.streams.get(stream_id)
                if s is None or (s.kind, s.a2b, s.b2a, s.abort_at) != (kind, length, reply, abort_at):
                    self.anomalies.append(f"target: header for #{stream_id} {kind.name} does not match any stream")
                    return
                if s.target is not None:
                    self.anomalies.append(f"target: #{stream_id} arrived twice")
                    return
                w.what, w.stream = f"target #{s.id}", s
                s.target = await self._target_stream(s, conn, w)
                s.target_ended = trio.current_time()
        finally:
            self.active_targets -= 1
            self.watches.discard(w)

    async def _target_stream(self, s: Stream, conn: trio.socket.SocketType, w: Watch) -> End:
        aborting = s.kind == Kind.ABORT_TARGET
        stop_at = s.abort_at if aborting else None
        send_stop_at = s.abort_at if s.kind in TARGET_STOPS else None
        result: dict[str, Half] = {}

        def b2a(n: int) -> None:
            s.b2a_sent += n

        def a2b(n: int) -> None:
            s.a2b_read += n
            if s.kind == Kind.SLOW_TARGET:
                s.max_lag = max(s.max_lag, s.a2b_sent - s.a2b_read)

        async def send() -> None:
            reply = s.header(reply=True)
            result["send"] = await send_frame(conn, reply, s.b2a, self.pool, s.id * 7919, w, b2a, send_stop_at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            buf = memoryview(bytearray(CHUNK_BYTES))
            result["recv"] = half = await recv_body(
                conn, buf, s.a2b, w, a2b, slow=s.kind == Kind.SLOW_TARGET, stop_at=stop_at
            )
            if half.seen == Seen.COMPLETE:
                self.payload_bytes += half.bytes
        if aborting:
            await abort(conn, w)
        return End(result["recv"], result["send"])

    # --- the stall watchdog -----------------------------------------------------------

    async def watchdog(self) -> None:
        """Cancel (and report) any stream end that has not moved for STALL_S: nothing may hang."""
        while True:
            await trio.sleep(WATCHDOG_PERIOD_S)
            now = trio.current_time()
            for w in list(self.watches):
                if now - w.at > STALL_S:
                    if w.stream is not None:
                        w.stream.hung = w.stream.hung or w.what
                    else:
                        self.anomalies.append(f"{w.what}: no byte for {STALL_S:.0f}s")
                    w.scope.cancel()
                    self.watches.discard(w)


async def start_targets(load: Load, folder: Path, nursery: trio.Nursery) -> list[trio.socket.SocketType]:
    """Listen where hvB connects the forwarded names, and leave a stale socket file for stale.sock."""
    listeners = []
    for name in FORWARDED:
        (folder / name).unlink(missing_ok=True)
        listener = await listen(folder / name)
        listeners.append(listener)
        nursery.start_soon(load.serve_targets, listener)
    stale = folder / "stale.sock"
    if not stale.exists():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(stale))
        sock.close()
    return listeners


# --- the relay pair -----------------------------------------------------------------


@dataclass
class PairFiles:
    a: Path
    b: Path
    metrics_a: int
    metrics_b: int
    overlay: Path  # <A>/hvB: where clients connect
    target_dir: Path  # <B>/hvB: where hvB connects forwarded names


def write_pair(root: Path, p: Pki, peer_host: str = "127.0.0.1", **both: Any) -> PairFiles:
    """hvA dials hvB over TLS at peer_host, where hvB listens (relay/tools/loopback.py). hvA forwards
    every name in FORWARDED and REFUSED; hvB allows all but secret.sock. Product defaults for the
    timeouts, except a short drain so tests end quickly; `both` sets other Config fields on both."""
    a_names = (*FORWARDED, *REFUSED)
    a, b = loopback.pair(
        root,
        p.dir,
        channels=a_names,
        b_channels=tuple(n for n in a_names if n != "secret.sock"),
        host=peer_host,
        metrics=True,
        **{"drain_timeout_s": 2.0, **both},
    )
    assert a.metrics_listen is not None and b.metrics_listen is not None
    target_dir = root / "hvB" / "hvB"
    target_dir.mkdir(parents=True, exist_ok=True)
    return PairFiles(
        loopback.write(a, root / "hvA.toml"),
        loopback.write(b, root / "hvB.toml"),
        a.metrics_listen.port,
        b.metrics_listen.port,
        root / "hvA" / "hvB",
        target_dir,
    )


# --- a relay process from outside ----------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError(f"no VmRSS for {pid}")


_NUMBERS: Final = re.compile(r"#\d+|\d+")


def broken_reasons(log: str) -> Counter[str]:
    """Why the relay ended streams as broken, from its log (numbers masked so reasons group)."""
    reasons: Counter[str] = Counter()
    for line in log.splitlines():
        if ": broken after" in line:
            reasons[_NUMBERS.sub("N", line.split("bytes: ", 1)[-1])] += 1
    return reasons


def outcome_table(streams: list[Stream]) -> Counter[tuple[str, str, str]]:
    """(kind, client's view, target's view) -> streams."""
    return Counter(
        (
            s.kind.name,
            s.client.summary() if s.client else "-",
            s.target.summary() if s.target else "-",
        )
        for s in streams
    )
