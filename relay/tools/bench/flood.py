"""A slow-connection flood on a relay's TLS port: silent and trickling connections.

The attack every TLS server meets: thousands of connections that never finish a
handshake, either silent or sending one byte every few seconds (a ClientHello in
slow motion). The relay must close each within handshake_timeout_s, hold at most
its `[limits]` of them, keep its memory bounded and keep real streams flowing.
Used by `migrelay bench` (a real stream's MB/s beside the flood, against the same
stream without it) and by the e2e test that checks the closing times.
"""

from __future__ import annotations

import ipaddress
import statistics
import time
from dataclasses import dataclass, field
from typing import Final

import trio

# a TLS handshake record header announcing 512 bytes, then the bytes one at a time
TRICKLE_PREFIX: Final = b"\x16\x03\x01\x02\x00"
TRICKLE_EVERY_S: Final = 2.0
# loopback is a /8: spread the flood over this many source addresses, so the
# per-address cap alone does not stop it
SOURCE_ADDRESSES: Final = 32
CONNECT_TIMEOUT_S: Final = 10.0
# the bench's sustained flood opens a closed connection again after this long
REOPEN_AFTER_S: Final = 1.0


@dataclass
class FloodReport:
    """What the flooding side saw: how long the relay let each connection live."""

    opened: int = 0
    refused: int = 0  # connect() itself failed (backlog full, or reset at once)
    lifetimes_s: list[float] = field(default_factory=list)  # connect -> closed by the relay
    still_open: int = 0  # not closed by the relay when the flood ended

    @property
    def longest_s(self) -> float:
        return max(self.lifetimes_s, default=0.0)

    @property
    def closed_at_once(self) -> int:
        return sum(1 for t in self.lifetimes_s if t < 1.0)

    def summary(self) -> str:
        median = statistics.median(self.lifetimes_s) if self.lifetimes_s else 0.0
        return (
            f"{self.opened} connections: {len(self.lifetimes_s)} closed by the relay "
            f"({self.closed_at_once} within 1 s, median {median:.1f} s, longest {self.longest_s:.1f} s), "
            f"{self.still_open} still open, {self.refused} connects failed"
        )


def _source(host: str, i: int) -> str | None:
    """A loopback source address of its own for connection i (None: let the kernel choose)."""
    if ":" in host or not ipaddress.ip_address(host).is_loopback:
        return None
    return f"127.0.1.{2 + i % SOURCE_ADDRESSES}"


async def _one(host: str, port: int, i: int, trickle: bool, report: FloodReport, until: float) -> None:
    """Open one connection and hold it until the relay closes it (or the flood ends)."""
    sock = trio.socket.socket()
    with sock:
        try:
            if (source := _source(host, i)) is not None:
                await sock.bind((source, 0))
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect((host, port))
        except (OSError, trio.TooSlowError):
            report.refused += 1
            return
        report.opened += 1
        opened = time.monotonic()
        data = TRICKLE_PREFIX + bytes(512)
        sent = 0
        with trio.move_on_at(until) as scope:
            while True:
                if trickle:
                    try:
                        await sock.send(data[sent : sent + 1])
                        sent += 1
                    except OSError:
                        break  # reset by the relay
                with trio.move_on_after(TRICKLE_EVERY_S if trickle else float("inf")):
                    try:
                        if await sock.recv(1024) == b"":
                            break
                    except OSError:
                        break
        if scope.cancelled_caught:
            report.still_open += 1
        else:
            report.lifetimes_s.append(time.monotonic() - opened)


async def flood(
    host: str, port: int, count: int, duration_s: float, reopen_after_s: float | None = None
) -> FloodReport:
    """`count` connections to host:port, half silent and half trickling, for `duration_s`.

    With `reopen_after_s`, a connection the relay closed is opened again after that
    long, so the pressure lasts the whole time (a slow-connection attack does that).
    """
    report = FloodReport()
    until = trio.current_time() + duration_s

    async def keep(i: int) -> None:
        while True:
            await _one(host, port, i, i % 2 == 1, report, until)
            if reopen_after_s is None or trio.current_time() + reopen_after_s >= until:
                return
            await trio.sleep(reopen_after_s)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(keep, i)
            if i % 100 == 99:
                await trio.lowlevel.checkpoint()  # let the relay accept as they come, like a real flood
    return report


def main(argv: list[str]) -> None:
    """`python -m relay.tools.bench.flood HOST PORT COUNT DURATION_S`: flood, reopening, then print a summary."""
    import resource
    import sys

    host, port, count, duration_s = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per connection of the flood
    report = trio.run(flood, host, port, count, duration_s, REOPEN_AFTER_S)
    print(report.summary(), file=sys.stderr)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
