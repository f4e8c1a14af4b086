"""systemd integration: sd_notify (READY, STOPPING, STATUS, WATCHDOG) and socket activation.

Talks the notify protocol directly (one datagram per message), so no libsystemd is
needed. Everything is a no-op when NOTIFY_SOCKET / LISTEN_FDS are unset. The
environment is a parameter so tests need no monkeypatching.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

from relay.daemon.guard import RateLimitedLog

_log = RateLimitedLog(logging.getLogger("migrelay.systemd"))

# sd_listen_fds(3): passed sockets start at fd 3
SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify over one datagram socket, opened once and kept.

    A socket per message would need a free fd at every watchdog ping: with the fd table
    full (a flood, a busy hypervisor), the ping would fail and, if that ended the daemon,
    take every migration in flight with it. A message that cannot be sent is logged
    (at most once a second) and dropped; systemd only learns late, never by our exit.
    """

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket address
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if watchdog else None
        self._sock: socket.socket | None = None
        if self._address:
            # non-blocking: a full notify queue must not stall the event loop
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            _log.warning("notify", "cannot tell systemd %s: %s", lines[0], e.strerror or e)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval; returns at once if there is none."""
        if self.watchdog_interval_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval_s)


def inherited_sockets(env: Mapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets systemd passed us (LISTEN_FDS), if they are meant for this process."""
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return []
    count = int(env["LISTEN_FDS"])
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
