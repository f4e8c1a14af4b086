"""Admission: the caps of `[limits]`, held where connections arrive.

Anyone who can reach the TLS port can open connections, and each one costs an fd,
some memory and, for a TLS handshake, CPU on the thread that runs every pump. So a
connection holds a slot for each thing it costs, and gets none over the cap:
- accepted on a peer listener, until it has authenticated (TLS handshake and header,
  or the header alone on a plain transport): an `unauthenticated` slot, overall and
  for its source address;
- from its first bytes until its TLS handshake is done: a `handshakes` slot (a silent
  connection holds none; it only waits, bounded by handshake_timeout_s);
- a forwarded connection, from the moment it is accepted for a peer until it ends: a
  `streams_per_peer` slot of that peer (on each relay's own side).
Over a cap before authentication the connection is closed at once: nothing is said to
whoever has not authenticated. Over the stream cap a peer is told why (STATUS_LIMIT),
and a local client is closed. Every one is counted in migrelay_refused_total{reason}
and logged at most once a second per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from prometheus_client import Counter

from relay.config import Limits
from relay.errors import RemoteError
from relay.guard import RateLimitedLog

log = logging.getLogger("migrelay.admission")


class OverLimit(RemoteError):
    """A connection over one of the caps; `reason` is the label it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Slot:
    """What one connection holds; released once, however often release() is called."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


class Admission:
    """The counts behind the caps, for one relay (all of it runs on the trio thread)."""

    def __init__(self, limits: Limits, refused: Counter) -> None:
        self.limits = limits
        self._refused = refused
        self._log = RateLimitedLog(log)
        self.unauthenticated = 0
        self.handshakes = 0
        self.by_address: dict[str, int] = {}
        self.streams: dict[str, int] = {}

    def _over(self, reason: str, message: str) -> OverLimit:
        self._refused.labels(reason).inc()
        self._log.warning(reason, "%s", message)
        return OverLimit(reason, message)

    def unauthenticated_slot(self, address: str | None) -> Slot:
        """For a connection just accepted on a peer listener; `address` None for unix peers."""
        cap = self.limits.unauthenticated
        if self.unauthenticated >= cap:
            who = address or "a unix peer"
            message = f"closed a connection from {who}: {cap} not yet authenticated ([limits] unauthenticated)"
            raise self._over("unauthenticated", message)
        if address is not None:
            per_address = self.limits.unauthenticated_per_address
            if self.by_address.get(address, 0) >= per_address:
                raise self._over(
                    "unauthenticated_per_address",
                    f"closed a connection from {address}: {per_address} from it not yet authenticated "
                    "([limits] unauthenticated_per_address)",
                )
            self.by_address[address] = self.by_address.get(address, 0) + 1
        self.unauthenticated += 1

        def release() -> None:
            self.unauthenticated -= 1
            if address is not None:
                left = self.by_address[address] - 1
                if left:
                    self.by_address[address] = left
                else:
                    del self.by_address[address]

        return Slot(release)

    def handshake_slot(self, who: str) -> Slot:
        cap = self.limits.handshakes
        if self.handshakes >= cap:
            raise self._over("handshakes", f"closed {who}: {cap} TLS handshakes under way ([limits] handshakes)")
        self.handshakes += 1

        def release() -> None:
            self.handshakes -= 1

        return Slot(release)

    def stream_slot(self, peer: str) -> Slot:
        cap = self.limits.streams_per_peer
        if self.streams.get(peer, 0) >= cap:
            raise self._over(
                "streams_per_peer", f"refused a stream of {peer}: {cap} running ([limits] streams_per_peer)"
            )
        self.streams[peer] = self.streams.get(peer, 0) + 1

        def release() -> None:
            left = self.streams[peer] - 1
            if left:
                self.streams[peer] = left
            else:
                del self.streams[peer]

        return Slot(release)
