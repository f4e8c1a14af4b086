"""The rule that keeps one connection from ending the daemon, written once.

Every per-connection task (a peer connection, an overlay client, a forwarded stream,
a /metrics or control request) runs inside `contained()`: whatever escapes the
task's own error handling is a bug, and a bug in one connection must cost that
connection only. It is logged with its traceback (once a second per place at most), counted in
`migrelay_internal_errors_total{where}`, the task's sockets are closed, and every
other stream goes on. Cancellation (shutdown) is not an error and passes through.

Reasons for closing or refusing connections that an attacker can trigger at will
are logged through `RateLimitedLog`, so they cannot flood the journal.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Final, Protocol

from prometheus_client import Counter

log = logging.getLogger("migrelay.guard")

# A reason for closing or refusing connections is logged at most this often.
LOG_EVERY_S: Final = 1.0


class Closable(Protocol):
    def close(self) -> None: ...


@contextlib.contextmanager
def contained(where: str, errors: Counter, *closables: Closable) -> Iterator[list[Closable]]:
    """Run one connection's work; an unexpected exception ends this connection, nothing else.

    Yields the list of what to close if that happens; the task appends the sockets it
    opens on the way (a target it connected, a dialled peer).
    """
    owned = list(closables)
    try:
        yield owned
    except Exception:
        # with its traceback, once a second per place at most: whoever can trigger a bug at
        # will must not flood the journal with it (the counter has every one)
        _BUGS.log(
            logging.ERROR,
            where,
            "internal error in %s; this connection is closed, the relay goes on",
            where,
            exc_info=True,
        )
        errors.labels(where).inc()
        _close_all(owned)
    except BaseException:  # cancelled (shutdown past its drain deadline): nothing to report
        _close_all(owned)
        raise


def _close_all(owned: list[Closable]) -> None:
    for c in owned:
        # best effort: the task already failed, and a second failure while cleaning up
        # must not escape the guard (a socket the task closed itself is closed again: a no-op)
        with contextlib.suppress(Exception):
            c.close()


class RateLimitedLog:
    """Log per reason at most once every LOG_EVERY_S, saying how many were not logged.

    For what anyone who can reach a port can trigger at will: a line per event would let
    them flood the journal, and journald's own rate limit would then drop the relay's real
    lines (a failed migration's reason) with theirs. Every event is still counted in a metric.
    """

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, reason: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, reason, message, *args)

    def log(self, level: int, reason: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._every_s:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            self._log.debug(message, *args)
            return
        self._last[reason] = now
        skipped = self._skipped.pop(reason, 0)
        suffix = f" ({skipped} more like it not logged)" if skipped else ""
        self._log.log(level, message + suffix, *args, exc_info=exc_info)


_BUGS: Final = RateLimitedLog(log)
