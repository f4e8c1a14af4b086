"""`migrelay status --watch` shows each stream in flight moving, until Ctrl-C.

Why it matters: during a migration the operator watches the relay like `top`: which
streams run, to which peer, how many bytes at what rate, for how long, and whether each
peer answers. A refresh that shows stale numbers, a pipe that gets nothing until the
buffer fills, or a traceback on Ctrl-C would each make it useless. Real relays, a real
stream, the real command: on a terminal (a pty: each refresh redraws the screen), through
a pipe (a block per refresh) and as JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay.tools.status import CLEAR_SCREEN
from tests.e2e.procs import serve
from tests.support import make_pki, pair_configs

INTERVAL_S = 0.2
CHUNK = 64 << 10
# ~6 MB/s: every refresh sees the stream grow by far more than the 0.1 MiB the text shows,
# without taking the two cores from the relays
PACE_S = 0.01
READ_TIMEOUT_S = 15.0
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
STREAM_LINE = re.compile(
    r"^#(?P<id>\d+)\s+hvB\s+migration\.sock\s+outbound\s+(?P<tx>[\d.]+ \w+)\s+(?P<rx>[\d.]+ \w+)"
    r"\s+(?P<rate>[\d.]+|-)\s+(?P<age>\d+)s$",
    re.MULTILINE,
)
PEER_LINE = re.compile(r"^hvB\s+127\.0\.0\.1:\d+\s+up, \d+s ago\s+\d+s ago\s+1\s", re.MULTILINE)


def size(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


@contextmanager
def stream_in_flight(root: Path) -> Iterator[None]:
    """A client of hvA's overlay sends to hvB's destination at a steady pace until the block ends."""
    dest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dest.bind(str(root / "hvB/hvB/migration.sock"))
    dest.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(root / "hvA/hvB/migration.sock"))
    stop = threading.Event()

    def sink() -> None:
        conn, _ = dest.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    def source() -> None:
        block = os.urandom(CHUNK)
        while not stop.is_set():
            client.sendall(block)
            time.sleep(PACE_S)
        client.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=sink), threading.Thread(target=source)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        client.close()
        dest.close()


class Output:
    """What the command has written so far, read from `fd` as it arrives."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data = fd, b""

    def until(self, done: Callable[[str], bool]) -> str:
        """Read until `done(everything so far)`; return everything so far."""
        deadline = time.monotonic() + READ_TIMEOUT_S
        while not done(self.data.decode(errors="replace")):
            left = deadline - time.monotonic()
            assert left > 0, f"not there within {READ_TIMEOUT_S}s: {self.data[-3000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"the command ended: {self.data[-3000:]!r}"
                self.data += chunk
        return self.data.decode(errors="replace")


def frames(mode: str, text: str) -> list[str]:
    """The complete refreshes in the output so far (the last one may still be arriving)."""
    if mode == "terminal":
        return [f.replace("\r\n", "\n") for f in text.split(CLEAR_SCREEN)[1:-1]]
    separator = "\n" if mode == "json" else "\n\n"
    return text.split(separator)[:-1]


def watch(root: Path, mode: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """`migrelay status --watch` on hvA: its process and the fd its output is read from."""
    argv = [sys.executable, "-m", "relay", "status", "--watch", str(INTERVAL_S), "--config", str(root / "hvA.toml")]
    # as an operator runs it: a pipe gets Python's block buffering, whatever the test runner's environment says
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if mode == "terminal":
        primary, secondary = os.openpty()
        proc = subprocess.Popen([*argv, *extra], stdout=secondary, stderr=subprocess.PIPE, env=env)
        os.close(secondary)
        return proc, primary
    proc = subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.fileno()


def interrupt(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C: status 130, nothing on stderr (no traceback)."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err.decode()) == (130, "")


def check_text(shown: list[str]) -> None:
    """Two refreshes, one after the other: the same stream, more bytes, a rate, an age."""
    lines = [STREAM_LINE.search(frame) for frame in shown]
    assert all(lines), shown
    first, second = (m.groupdict() for m in lines if m is not None)
    assert first["id"] == second["id"], shown
    assert size(second["tx"]) > size(first["tx"]) > 0, shown
    assert second["rate"] != "-" and float(second["rate"]) > 0, shown
    assert int(second["age"]) >= int(first["age"]) >= 0, shown
    for frame in shown:
        assert frame.startswith("migrelay status at ") and f"every {INTERVAL_S:g}s" in frame, frame
        assert PEER_LINE.search(frame), frame


def check_json(shown: list[str]) -> None:
    a, b = (json.loads(line) for line in shown)
    [s1], [s2] = a["streams"], b["streams"]
    assert (s1["id"], s1["peer"], s1["socket"], s1["direction"]) == (s2["id"], "hvB", "migration.sock", "outbound")
    assert s2["tx_bytes"] > s1["tx_bytes"] > 0 and s2["age_s"] > s1["age_s"]
    # the rate is over the watcher's own interval, from the two snapshots' exact counts
    over = b["clock_s"] - a["clock_s"]
    assert s2["mb_s_over_s"] == pytest.approx(over, abs=0.002) and over > INTERVAL_S / 2
    moved = s2["tx_bytes"] + s2["rx_bytes"] - s1["tx_bytes"] - s1["rx_bytes"]
    assert s2["mb_s"] == pytest.approx(moved / over / 1e6, abs=0.1) and s2["mb_s"] > 0
    assert b["peers"]["hvB"]["last_dial"] == "up" and b["peers"]["hvB"]["active_streams"] == 1


@pytest.mark.parametrize("mode", ["terminal", "pipe", "json"])
def test_watch_shows_a_stream_moving(tmp_path: Path, mode: str) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml"), stream_in_flight(tmp_path):
        proc, fd = watch(tmp_path, mode, *(["--json"] if mode == "json" else []))
        try:
            # the stream may not be up at the first refresh: two consecutive ones that show it
            def two_with_stream(text: str) -> bool:
                return sum("migration.sock" in f for f in frames(mode, text)[-2:]) == 2

            out = Output(fd)
            # each refresh is written out at once, not when a pipe's buffer happens to fill
            first = out.until(lambda text: len(frames(mode, text)) >= 1)
            assert len(frames(mode, first)) <= 2, f"refreshes arrive in bursts: {first!r}"
            output = out.until(two_with_stream)
            shown = frames(mode, output)[-2:]
            if mode == "terminal":
                assert output.startswith(CLEAR_SCREEN), output[:200]
            else:
                assert CLEAR_SCREEN not in output  # a pipe or a script gets no escape codes
            (check_json if mode == "json" else check_text)(shown)
            interrupt(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if mode == "terminal":
                os.close(fd)


def test_watch_goes_on_while_the_relay_is_away(tmp_path: Path) -> None:
    """A relay restarting is routine: the watcher says so at each refresh instead of exiting."""
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml") as (hva, _):
        proc, fd = watch(tmp_path, "pipe")
        try:
            out = Output(fd)
            out.until(lambda text: len(frames("pipe", text)) >= 1)
            hva.proc.send_signal(signal.SIGTERM)
            hva.proc.wait(timeout=15)
            output = out.until(lambda text: sum("cannot get the status" in f for f in frames("pipe", text)) >= 2)
            assert "is migrelay serve running?" in output
            assert proc.poll() is None
            interrupt(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
