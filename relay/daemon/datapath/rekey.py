"""Rekeying by reconnection: one stream carried over a chain of TLS connections.

Why: an AES-GCM key should protect at most about 2^24.5 full records (RFC 8446 section
5.5, some 380 GB), and an NBD copy of a large disk or a big guest's RAM can run past that
on one connection. OpenSSL does not rotate keys by itself, and the binding we ship
(cryptography's cffi module behind pyOpenSSL, OpenSSL linked in statically) has no
SSL_key_update. Both ends are migrelay, so the dialling relay moves the stream onto a fresh
TLS connection instead: a new handshake is a new ECDHE exchange, hence fresh traffic keys,
even when the session is resumed.

`RekeyConn` is one Conn over the chain C1, C2, ... of one stream, so the pumps do not
change. The same rules hold on both relays:

- a connection *joins* the chain once both relays have agreed on it: the dialling relay
  when the peer's OK to its Continue request arrives, the accepting relay once that OK is
  sent. From the request to the join, a switch is *under way*; one at a time;
- writing: a direction writes on the newest connection. Moving from C_i to C_j it first
  ends C_i..C_j-1 with close_notify. A writer that has already ended (the real EOF) ends
  each connection that joins later at once, so the last connection carries the real end;
- reading: close_notify on C_k means "go on with C_k+1" if C_k+1 has joined, or if a switch
  is under way (then wait for its outcome); otherwise it is the real end of the stream;
- a connection's socket is closed once both directions are done with it (our close_notify
  sent, theirs read), so a long stream holds one or two sockets, not one per switch.

Only the dialling relay decides to switch: when the newest connection has carried
`rekey_after_bytes` in either direction, the pump task that notices it dials inline (a
resumed handshake and one round trip). A switch that certainly did not happen (the peer
was unreachable, or answered no: `SwitchDeclined`) is not an error: the stream stays where
it is and tries again after another `rekey_after_bytes`. A switch whose outcome is unknown
(the request went out, no answer came back) aborts the stream: the peer may already have
moved, and a guess either way could lose bytes without anyone noticing.

The cost on the hot path is one or two integer compares and one add per chunk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Literal

import trio

from relay.core.errors import RemoteError
from relay.daemon.datapath.conn import StreamTruncated, TlsConn

log = logging.getLogger("migrelay.rekey")

# A byte budget no stream reaches: the accepting side never starts a switch itself.
NEVER_BYTES: Final = 1 << 62
# Connections of one stream the accepting side keeps open at once. Two relays that follow
# the rules hold two or three (measured with 256 switches in tests/integration/test_rekey.py);
# a peer that switches and never ends its old connections would otherwise cost us a
# socket per switch. Beyond this, a switch is refused: the stream stays where it is.
MAX_OPEN_CONNECTIONS: Final = 8

Result = Literal["ok", "refused", "failed"]
Trigger = Literal["tx", "rx"]


class SwitchDeclined(RemoteError):
    """A switch that certainly did not happen: the stream stays on its connection.

    `refused`: the peer answered no (an unknown stream, a relay that predates rekeying);
    otherwise it could not be reached, or nothing had been asked yet.
    """

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


def _aborted() -> StreamTruncated:
    return StreamTruncated("the stream was aborted while it moved to a fresh TLS connection")


class Link:
    """One TLS connection of the chain, and how far each direction has got with it."""

    __slots__ = ("conn", "got_eof", "received", "rx_limit", "sent", "sent_eof", "seq", "tx_limit")

    def __init__(self, seq: int, conn: TlsConn, limit: int) -> None:
        self.seq = seq
        self.conn = conn
        self.sent = 0  # payload bytes written on it
        self.received = 0  # payload bytes read from it
        self.tx_limit = limit  # a switch is due once `sent` reaches this (dialling side)
        self.rx_limit = limit
        self.sent_eof = False  # our close_notify went out
        self.got_eof = False  # theirs was read


class RekeyConn:
    """A stream over a chain of TLS connections: the Conn the pumps see for a TLS peer.

    The dialling relay passes `dial`, which opens a fresh connection, asks the peer to
    continue this stream on it and returns it once the peer said OK; it raises
    SwitchDeclined when nothing happened, anything else (StreamTruncated) when the answer
    is unknown. The accepting relay passes no `dial` and calls `adopt` for each
    connection its peer moves the stream onto.

    Writer-side calls on one SSL object must never interleave. The pump's writer holds a
    token (`_writer_busy`) while it writes; whoever joins a connection to the chain only
    moves the writer on if the token is free, and then without waiting (a full socket is
    left to the writer's next write; once the writer has ended, all that is left is the
    new connection's close_notify, on an empty socket). So no task ever waits for the
    other direction's progress, which is how relays deadlock.
    """

    def __init__(
        self,
        first: TlsConn,
        *,
        label: str,
        switch_timeout_s: float,
        dial: Callable[[], Awaitable[TlsConn]] | None = None,
        rekey_after_bytes: int = NEVER_BYTES,
        count: Callable[[Result], None] | None = None,
    ) -> None:
        if rekey_after_bytes <= 0:
            raise ValueError("rekey_after_bytes must be positive")
        self._label = label
        self._timeout_s = switch_timeout_s
        self._dial = dial
        self._every = rekey_after_bytes if dial is not None else NEVER_BYTES
        self._count = count
        link = Link(1, first, self._every)
        self._links: dict[int, Link] = {1: link}  # by seq; only connections still open
        self._top = link  # the newest connection that joined
        self._writing = link  # where the writer is
        self._reading = link  # where the reader is
        self._switching: trio.Event | None = None  # set while a switch is under way
        self._writer_busy = False
        self._writer_ended = False
        self._reader_ended = False
        self._closed = False
        self.triggers: dict[Trigger, int] = {"tx": 0, "rx": 0}  # switches this side started, by direction
        # The threaded data path (datapath/threaded.py) holds the writer token for as long
        # as its writer thread runs, idle or not, and sets this: a connection that joins
        # then wakes the thread, which hands the writer back to trio to move it on.
        self.wake_writer: Callable[[], None] | None = None
        # Set by the threaded data path while its threads may be on this chain's sockets:
        # abort() then asks it to stop them (True) and leaves the closing to the bridge, once
        # they have returned, so no thread ever meets a closed, maybe reused, fd.
        self.defer_abort: Callable[[], bool] | None = None

    # --- what tests and logs look at ---------------------------------------------------

    @property
    def switches(self) -> int:
        """Connections that joined after the first one."""
        return self._top.seq - 1

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # --- the Conn interface ------------------------------------------------------------

    @property
    def splice_fd(self) -> int | None:
        return None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connection our writer is on: where bytes of ours may still await the peer's ACK."""
        return self._writing.conn.socket

    async def send_all(self, data: memoryview) -> None:
        # Nobody else holds the writer token here: a switch takes it only once the writer
        # has ended, and send_eof is the writer's own last call.
        link = self._writing
        if link is not self._top or link.sent >= link.tx_limit:
            link = await self._prepare_write()
        self._writer_busy = True
        try:
            await link.conn.send_all(data)
            link.sent += len(data)
            if link is not self._top:
                # A switch joined while this write ran: end the old connection now, not
                # at the next write (maybe hours away, and the peer's reader waits on it).
                await self._catch_up()
        except trio.ClosedResourceError:
            raise _aborted() from None
        finally:
            self._writer_busy = False

    async def recv_into(self, buf: memoryview) -> int:
        link = self._reading
        if link.received >= link.rx_limit and link is self._top:
            await self._rekey("rx", link)
        try:
            while True:
                got = await link.conn.recv_into(buf)
                if got:
                    link.received += got
                    return got
                following = await self._after_eof(link)
                if following is None:
                    return 0
                link = following
        except trio.ClosedResourceError:
            raise _aborted() from None

    async def send_eof(self) -> None:
        # A switch under way decides which connection carries the real end.
        while self._switching is not None:
            await self._switching.wait()
        self._writer_busy = True
        try:
            self._writer_ended = True
            await self._finish_writing()
        except trio.ClosedResourceError:
            raise _aborted() from None
        finally:
            self._writer_busy = False

    def abort(self) -> None:
        self._closed = True
        if self.defer_abort is not None and self.defer_abort():
            return
        for link in self._links.values():
            link.conn.abort()

    def close(self) -> None:
        self._closed = True
        for link in self._links.values():
            link.conn.close()

    # --- the threaded data path (datapath/threaded.py) ------------------------------------
    # Its threads move bytes on one connection of the chain at a time and come back to trio
    # at every boundary (a close_notify read, a threshold, a connection that joined); all
    # switching stays here, in trio. The `*_due` checks are read-only: threads call them.

    async def reader_link(self) -> Link:
        """Where the reader goes on, after the switch a threshold calls for (as recv_into)."""
        link = self._reading
        if link.received >= link.rx_limit and link is self._top:
            await self._rekey("rx", link)
        return self._reading

    def rx_due(self, link: Link) -> bool:
        """The reader should come back to trio: `link` has carried its threshold."""
        return link.received >= link.rx_limit and link is self._top and self._switching is None

    async def reader_eof(self, link: Link) -> Link | None:
        """close_notify read on `link`: the next connection to read, or None at the real end."""
        try:
            return await self._after_eof(link)
        except trio.ClosedResourceError:
            raise _aborted() from None

    async def writer_link(self) -> Link:
        """Where the writer writes next, after any switch or catching up (as send_all)."""
        link = self._writing
        if link is not self._top or link.sent >= link.tx_limit:
            link = await self._prepare_write()
        return link

    def tx_due(self, link: Link) -> bool:
        """The writer should come back to trio: a connection joined, or a threshold is due."""
        return link is not self._top or link.sent >= link.tx_limit

    @contextlib.contextmanager
    def writer_held(self) -> Iterator[None]:
        """The writer token, held by a writer thread for as long as it runs (idle or not)."""
        self._writer_busy = True
        try:
            yield
        finally:
            self._writer_busy = False

    # --- the accepting side ---------------------------------------------------------------

    async def adopt(self, conn: TlsConn, answer: Callable[[], Awaitable[None]]) -> None:
        """Let `conn` join the chain: call `answer` (send the OK), then join and settle.

        Raises SwitchDeclined, with nothing sent, if this stream cannot take a connection
        now; the caller answers no. If `answer` fails, `conn` never joined: the peer got
        no complete OK, so it stays on its connection too.
        """
        if self._closed or (self._reader_ended and self._writer_ended):
            raise SwitchDeclined("the stream has ended", refused=True)
        if self._switching is not None:
            raise SwitchDeclined("a switch of this stream is already under way", refused=True)
        if len(self._links) >= MAX_OPEN_CONNECTIONS:
            raise SwitchDeclined(f"{len(self._links)} connections of this stream are still open", refused=True)
        self._switching = done = trio.Event()
        try:
            try:
                await answer()
            except BaseException:
                self._counted("failed")
                raise
            old = self._top
            new = self._join(conn)
            self._counted("ok")
            log.info(
                "%s: continued on connection %d (the peer rekeyed); connection %d carried tx %d rx %d bytes",
                self._label,
                new.seq,
                old.seq,
                old.sent,
                old.received,
            )
            await self._settle(new)
        finally:
            self._switching = None
            done.set()

    # --- switching ----------------------------------------------------------------------

    async def _rekey(self, trigger: Trigger, link: Link) -> None:
        """The dialling side: `link`, the newest connection, has carried enough one way."""
        if self._dial is None or self._switching is not None:
            return  # the accepting side never starts one; or one runs already
        self._switching = done = trio.Event()
        try:
            try:
                conn = await self._dial()
            except SwitchDeclined as e:
                # Not an error: stay, and try again a threshold later (never in a loop).
                link.tx_limit = link.sent + self._every
                link.rx_limit = link.received + self._every
                self._counted("refused" if e.refused else "failed")
                log.warning(
                    "%s: rekey not done, staying on connection %d (next attempt in %d bytes): %s",
                    self._label,
                    link.seq,
                    self._every,
                    e,
                )
                return
            except RemoteError:
                self._counted("failed")  # the outcome is unknown: the stream ends with this error
                raise
            new = self._join(conn)
            self.triggers[trigger] += 1
            self._counted("ok")
            log.info(
                "%s: rekeyed onto connection %d; connection %d carried tx %d rx %d bytes (%s reached %d)",
                self._label,
                new.seq,
                link.seq,
                link.sent,
                link.received,
                trigger,
                self._every,
            )
            await self._settle(new)
        finally:
            self._switching = None
            done.set()

    def _join(self, conn: TlsConn) -> Link:
        if self._closed:
            conn.abort()
            raise _aborted()
        new = Link(self._top.seq + 1, conn, self._every)
        self._links[new.seq] = new
        self._top = new
        return new

    async def _settle(self, new: Link) -> None:
        """Right after `new` joined: bring each direction that is idle or over up to it."""
        try:
            await self._writer_follow()
            if self._reader_ended:
                with trio.fail_after(self._timeout_s):
                    await self._drain(new)
        except trio.TooSlowError:
            self.abort()
            raise StreamTruncated(
                f"no close_notify on connection {new.seq} within {self._timeout_s:g} s after the switch"
            ) from None
        except trio.ClosedResourceError:
            self.abort()
            raise _aborted() from None
        except BaseException:
            self.abort()  # a chain half-switched is no stream: both relays see it fail
            raise

    async def _writer_follow(self) -> None:
        if self._writer_busy:
            if self.wake_writer is not None:
                self.wake_writer()  # a writer thread, maybe idle: it returns to move on
            return  # the writer is mid-write: it moves on itself as soon as that returns
        if self._writer_ended:
            # Only the new connection lacks its close_notify, and its socket is empty.
            self._writer_busy = True
            try:
                await self._finish_writing()
            finally:
                self._writer_busy = False
            return
        # The writer is idle (or blocked upstream): end its old connections without waiting.
        while self._writing is not self._top:
            old = self._writing
            if not old.sent_eof:
                if not old.conn.try_send_eof():
                    return  # that socket is full: the writer's next write finishes this
                old.sent_eof = True
                self._retire(old)
            self._writing = self._links[old.seq + 1]

    async def _drain(self, new: Link) -> None:
        """Our reader has ended, so the peer's writer had ended before this switch, and
        its close_notify follows the OK at once. Read it here: a socket closed with unread
        bytes sends RST, which could cost the peer the last bytes it is being sent."""
        if await new.conn.recv_into(memoryview(bytearray(1))):
            raise StreamTruncated(f"bytes on connection {new.seq} after the peer's end of stream")
        new.got_eof = True
        old, self._reading = self._reading, new
        self._retire(old)

    # --- each direction's walk along the chain -------------------------------------------

    async def _prepare_write(self) -> Link:
        """The slow path of send_all: a switch is due, or the writer is behind the chain."""
        link = self._writing
        if link is self._top and link.sent >= link.tx_limit:
            self._writer_busy = True  # so that the switch leaves moving on to us
            try:
                await self._rekey("tx", link)
            finally:
                self._writer_busy = False
        self._writer_busy = True
        try:
            await self._catch_up()
        except trio.ClosedResourceError:
            raise _aborted() from None
        finally:
            self._writer_busy = False
        return self._writing

    async def _catch_up(self) -> None:
        """Writer token held: close_notify on every connection older than the newest."""
        while self._writing is not self._top:
            old = self._writing
            await self._end(old)
            self._writing = self._links[old.seq + 1]

    async def _finish_writing(self) -> None:
        """Writer token held, writer ended: close_notify on every connection up to the newest."""
        while True:
            await self._catch_up()
            top = self._top
            await self._end(top)
            if top is self._top:
                return  # no switch joined meanwhile

    async def _end(self, link: Link) -> None:
        if not link.sent_eof:
            await link.conn.send_eof()
            link.sent_eof = True
        self._retire(link)

    async def _after_eof(self, link: Link) -> Link | None:
        """close_notify on `link`: the next connection to read, or None at the real end."""
        link.got_eof = True
        following = self._links.get(link.seq + 1)
        while following is None and self._switching is not None:
            await self._switching.wait()
            following = self._links.get(link.seq + 1)
        self._retire(link)
        if following is None:
            self._reader_ended = True
            return None
        self._reading = following
        return following

    def _retire(self, link: Link) -> None:
        """Close a connection both directions are done with (the newest stays for close())."""
        # either direction may finish last, and the reader may get here again after a wait
        if link.sent_eof and link.got_eof and link is not self._top and link.seq in self._links:
            del self._links[link.seq]
            link.conn.close()

    def _counted(self, result: Result) -> None:
        if self._count is not None:
            self._count(result)
