"""What the reload tests share: blocking clients and far ends, sd_notify with the sender's pid, polling."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import metric_total, scrape

CHUNK = 1 << 20
TIMEOUT_S = 30.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def counted(port: int, name: str, **labels: str) -> float:
    return metric_total(scrape(port), name, **labels)


def through(path: Path, data: bytes) -> bytes:
    """Send `data` into an overlay socket, half-close, and return what came back (an echo_digests end)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def closed_without_a_byte(path: Path) -> bool:
    """How a source client sees a stream that was refused or failed."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(str(path))
        return sock.recv(10) == b""


def echo_digests(path: Path) -> socket.socket:
    """A destination that answers every connection with the sha256 (hex) of what it read; close to stop."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                h = hashlib.sha256()
                while chunk := conn.recv(CHUNK):
                    h.update(chunk)
                conn.sendall(h.hexdigest().encode())

    threading.Thread(target=serve, daemon=True).start()
    return listener


@dataclass
class LongStream:
    """One stream through the relays, sent in two halves: the test decides when the second goes."""

    source: Path
    destination: Path
    half_bytes: int
    sent: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: hashlib._Hash = field(default_factory=hashlib.sha256)
    received_bytes: int = 0
    go_on: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.destination))
        listener.listen(1)
        for target, args in ((self._far, (listener,)), (self._near, ())):
            thread = threading.Thread(target=self._caught, args=(target, *args), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _caught(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as e:
            self.errors.append(e)

    def _far(self, listener: socket.socket) -> None:
        with listener:
            listener.settimeout(TIMEOUT_S)
            conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(CHUNK):
                self.received.update(chunk)
                self.received_bytes += len(chunk)

    def _near(self) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.source))
            self._send(sock)
            if not self.go_on.wait(timeout=300):
                raise AssertionError("the test never let the second half go")
            self._send(sock)
            sock.shutdown(socket.SHUT_WR)

    def _send(self, sock: socket.socket) -> None:
        for _ in range(self.half_bytes // CHUNK):
            chunk = os.urandom(CHUNK)
            self.sent.update(chunk)
            sock.sendall(chunk)

    def finish(self) -> None:
        self.go_on.set()
        for thread in self._threads:
            thread.join(timeout=120)
        assert not self.errors, self.errors
        assert self.received_bytes == 2 * self.half_bytes
        assert self.received.hexdigest() == self.sent.hexdigest()


def listen_for_credentials(notify: socket.socket | None) -> socket.socket:
    """Have the kernel attach each sender's pid to the datagrams sent to `notify` from now on."""
    assert notify is not None
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return notify


def notifications(notify: socket.socket, pids: set[int], timeout_s: float = TIMEOUT_S) -> dict[int, list[str]]:
    """sd_notify messages by sender pid (listen_for_credentials first), until each pid has sent READY=1."""
    messages: dict[int, list[str]] = {pid: [] for pid in pids}
    deadline = time.monotonic() + timeout_s
    while not all(any("READY=1" in m.split("\n") for m in messages[pid]) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"no READY=1 from every relay: {messages}")
        try:
            data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            continue
        sender = next(
            _UCRED.unpack(payload)[0]
            for level, kind, payload in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        )
        messages.setdefault(sender, []).append(data.decode())
    return messages


def monotonic_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def assert_reload_told(messages: list[str], before_us: int, after_us: int) -> None:
    """RELOADING=1 with a MONOTONIC_USEC taken during the reload, then READY=1 (sd_notify(3))."""
    assert len(messages) == 2, messages
    reloading = dict(line.split("=", 1) for line in messages[0].split("\n"))
    assert reloading["RELOADING"] == "1", messages
    assert before_us <= int(reloading["MONOTONIC_USEC"]) <= after_us, (before_us, messages, after_us)
    assert "READY=1" in messages[1].split("\n"), messages
