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

Over the per-address cap (an IPv4 address, an IPv6 /64), the new connection is closed
at once. Over the overall unauthenticated or handshake cap, closing the newcomer would
let a flood lock real peers out for as long as it lasts; so the oldest unauthenticated
connection is closed instead. A peer relay needs a slot only for the milliseconds of
its handshake, so it is always among the newest: a flood evicts itself, at whatever
rate it arrives and from however many addresses, as long as it cannot hold a slot
for less than a handshake takes. Before authentication nothing is said to the closed
connection. Over the stream cap a peer
is told why (STATUS_OVER_LIMIT), and a local client is closed. Every one is counted in
migrelay_refused_total{reason} and logged at most once a second per reason.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from prometheus_client import Counter

from relay.core.config import Limits
from relay.core.errors import RemoteError
from relay.daemon.guard import RateLimitedLog

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
    """Slots of one cap: how many each source holds, and every holder, oldest first."""

    def __init__(self) -> None:
        self.by_key: dict[str, int] = {}
        # the oldest first; an OrderedDict, not a dict: a dict whose first entries keep being
        # removed makes every walk from its front skip their tombstones (O(n) per eviction)
        self._held: OrderedDict[_Held, None] = OrderedDict()

    @property
    def count(self) -> int:
        return len(self._held)

    def add(self, held: _Held) -> Slot:
        self._held[held] = None
        self.by_key[held.key] = self.by_key.get(held.key, 0) + 1
        return Slot(lambda: self._remove(held))

    def _remove(self, held: _Held) -> None:
        if self._held.pop(held, True) is not None:
            return  # evicted already
        left = self.by_key[held.key] - 1
        if left:
            self.by_key[held.key] = left
        else:
            del self.by_key[held.key]

    def held_by(self, key: str) -> int:
        return self.by_key.get(key, 0)

    def evict_one(self) -> bool:
        """Close the oldest connection that can be closed; False if none can be.

        The oldest, whatever its source: a peer relay's connection holds a slot only for
        the milliseconds of its handshake, so it is always among the newest, however many
        addresses a flood comes from. (Picking the source that holds the most instead lets
        a flood of one connection per address make a busy peer the victim.) O(1) but for
        holders that cannot be closed, which only tests create.
        """
        victim = next((h for h in self._held if h.evict is not None), None)
        if victim is None:
            return False
        self._remove(victim)
        assert victim.evict is not None
        victim.evict()
        return True


def source_key(address: str | None) -> str:
    """What the per-address cap counts by: an IPv4 address, an IPv6 /64, or "unix".

    One IPv6 host commonly has a whole /64 to pick addresses from.
    """
    if address is None:
        return "unix"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


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
        return self._unauthenticated.held_by(source_key(address))

    def _count(self, reason: str, message: str) -> None:
        self._refused.labels(reason).inc()
        self._log.warning(reason, "%s", message)

    def _admit(self, pool: _Pool, cap: int, reason: str, key: str, who: str, evict: Callable[[], None] | None) -> Slot:
        if pool.count >= cap:
            message = f"{cap} connections hold [limits] {reason}"
            if not pool.evict_one():
                self._count(reason, f"closed {who}: {message}")
                raise OverLimit(reason, message)
            self._count(reason, f"closed the oldest unauthenticated connection for {who}: {message}")
        return pool.add(_Held(key, evict))

    def unauthenticated_slot(self, address: str | None, evict: Callable[[], None] | None = None) -> Slot:
        """For a connection just accepted on a peer listener; `address` None for unix peers."""
        key = source_key(address)
        who = f"a connection from {address or 'a unix peer'}"
        per_address = self.limits.unauthenticated_per_address
        if address is not None and self._unauthenticated.held_by(key) >= per_address:
            message = f"{per_address} from {address} not yet authenticated ([limits] unauthenticated_per_address)"
            self._count("unauthenticated_per_address", f"closed {who}: {message}")
            raise OverLimit("unauthenticated_per_address", message)
        return self._admit(self._unauthenticated, self.limits.unauthenticated, "unauthenticated", key, who, evict)

    def handshake_slot(self, address: str | None, evict: Callable[[], None] | None = None) -> Slot:
        who = f"a handshake from {address or 'a unix peer'}"
        return self._admit(self._handshakes, self.limits.handshakes, "handshakes", source_key(address), who, evict)

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
