"""Admission: the caps of `[limits]`, held where connections arrive.

Anyone who can reach the TLS port can open connections, and each one costs an fd,
some memory and, for a TLS handshake, CPU on the thread that runs every pump. So a
connection holds a slot for each thing it costs:
- accepted on a peer listener, until it has authenticated (TLS handshake and header,
  or the header alone on a plain transport): an `unauthenticated` slot, overall and
  for its source address;
- from its first bytes until its TLS handshake is done: a `handshakes` slot (a silent
  connection holds none; it only waits, bounded by handshake_timeout_s);
- a forwarded connection, from the moment it is accepted for a peer until it ends: a
  `streams_per_peer` slot of that peer (on each relay's own side).

Over the per-address cap, the new connection is closed at once. Over the overall
unauthenticated or handshake cap, closing the newcomer would let a flood lock real
peers out for as long as it lasts; so the oldest connection of the source address
that holds the most slots is closed instead (a flood from a few addresses pays for
itself, and a peer relay, which holds one or two at a time, gets through). Before
authentication nothing is said to the closed connection. Over the stream cap a peer
is told why (STATUS_OVER_LIMIT), and a local client is closed. Every one is counted in
migrelay_refused_total{reason} and logged at most once a second per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(eq=False)
class _Held:
    """One connection holding a slot; `evict` closes it when a newcomer needs the slot."""

    key: str
    evict: Callable[[], None] | None


class _Pool:
    """Slots of one cap, grouped by source address, oldest first."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[_Held]] = {}
        self.count = 0

    def add(self, held: _Held) -> Slot:
        self.by_key.setdefault(held.key, []).append(held)
        self.count += 1
        return Slot(lambda: self._remove(held))

    def _remove(self, held: _Held) -> None:
        group = self.by_key.get(held.key)
        if group is None or held not in group:
            return  # evicted already
        group.remove(held)
        self.count -= 1
        if not group:
            del self.by_key[held.key]

    def held_by(self, key: str) -> int:
        return len(self.by_key.get(key, ()))

    def evict_one(self) -> bool:
        """Close the oldest connection of the address holding the most; False if none can be.

        Among addresses holding as many, the one that has held slots longest goes first
        (dicts keep insertion order, and max() returns the first maximum): a peer relay's
        address holds a slot only for its handshake, so it is never the oldest one.
        """
        candidates = [group for group in self.by_key.values() if any(h.evict is not None for h in group)]
        if not candidates:
            return False
        victim = next(h for h in max(candidates, key=len) if h.evict is not None)
        self._remove(victim)
        assert victim.evict is not None
        victim.evict()
        return True


class Admission:
    """The counts behind the caps, for one relay (all of it runs on the trio thread)."""

    def __init__(self, limits: Limits, refused: Counter) -> None:
        self.limits = limits
        self._refused = refused
        self._log = RateLimitedLog(log)
        self._unauthenticated = _Pool()
        self._handshakes = _Pool()
        self.streams: dict[str, int] = {}

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated.count

    @property
    def handshakes(self) -> int:
        return self._handshakes.count

    def unauthenticated_from(self, address: str) -> int:
        return self._unauthenticated.held_by(address)

    def _count(self, reason: str, message: str) -> None:
        self._refused.labels(reason).inc()
        self._log.warning(reason, "%s", message)

    def _admit(self, pool: _Pool, cap: int, reason: str, key: str, who: str, evict: Callable[[], None] | None) -> Slot:
        if pool.count >= cap:
            message = f"{cap} connections hold [limits] {reason}"
            if not pool.evict_one():
                self._count(reason, f"closed {who}: {message}")
                raise OverLimit(reason, message)
            self._count(reason, f"closed the oldest connection of the busiest source for {who}: {message}")
        return pool.add(_Held(key, evict))

    def unauthenticated_slot(self, address: str | None, evict: Callable[[], None] | None = None) -> Slot:
        """For a connection just accepted on a peer listener; `address` None for unix peers."""
        key = address or "unix"
        who = f"a connection from {address or 'a unix peer'}"
        per_address = self.limits.unauthenticated_per_address
        if address is not None and self._unauthenticated.held_by(key) >= per_address:
            message = f"{per_address} from {address} not yet authenticated ([limits] unauthenticated_per_address)"
            self._count("unauthenticated_per_address", f"closed {who}: {message}")
            raise OverLimit("unauthenticated_per_address", message)
        return self._admit(self._unauthenticated, self.limits.unauthenticated, "unauthenticated", key, who, evict)

    def handshake_slot(self, address: str | None, evict: Callable[[], None] | None = None) -> Slot:
        who = f"a handshake from {address or 'a unix peer'}"
        return self._admit(self._handshakes, self.limits.handshakes, "handshakes", address or "unix", who, evict)

    def stream_slot(self, peer: str) -> Slot:
        cap = self.limits.streams_per_peer
        if self.streams.get(peer, 0) >= cap:
            message = f"{cap} streams of {peer} running ([limits] streams_per_peer)"
            self._count("streams_per_peer", f"refused a stream: {message}")
            raise OverLimit("streams_per_peer", message)
        self.streams[peer] = self.streams.get(peer, 0) + 1

        def release() -> None:
            left = self.streams[peer] - 1
            if left:
                self.streams[peer] = left
            else:
                del self.streams[peer]

        return Slot(release)
