"""The control socket never ends the daemon.

On main, each failure tested here but the plain bad requests ended `migrelay serve`, and
with it every migration in flight. Now an expected failure is a one-line
`{"ok": false, "error": ...}`; anything else is logged once with its traceback, counted in
migrelay_internal_errors_total{where="control"} and answered "internal error". Each test then
checks that the relay still carries a stream and still answers the control socket.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from relay.core.config import Config
from relay.core.control_protocol import MAX_NESTING, MAX_REQUEST_BYTES
from relay.daemon.control import REQUEST_TIMEOUT_S, Control, new_session_id
from relay.daemon.forward import Forwarding
from relay.daemon.metrics import Metrics
from relay.daemon.net import ListenerFailed
from relay.daemon.server import Daemon
from tests.integration.conftest import counted, echo_server, eventually, roundtrip
from tests.integration.test_sessions import ask
from tests.support import Pki, connect, listen, pair_configs

OPEN_HVB = b'{"op": "open", "peer": "hvB"}\n'


@asynccontextmanager
async def relays(
    tmp_path: Path, a: Config, b: Config, session_ids: Iterable[str] | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Daemon]:
    """hvA (with the given session ids and metrics) and hvB running, and hvB's destination
    'hypervisor' echoing on hvB/hvB/migration.sock; yields hvA."""
    ids: Iterator[str] | None = iter(session_ids) if session_ids is not None else None
    relay_a = Daemon(a, metrics=metrics or Metrics(), session_ids=new_session_id if ids is None else lambda: next(ids))
    async with trio.open_nursery() as nursery:
        ra = await nursery.start(relay_a.run)
        rb = await nursery.start(Daemon(b).run)
        nursery.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), nursery)
        yield ra
        ra.stop()
        rb.stop()
        nursery.cancel_scope.cancel()


async def raw_ask(path: Path, payload: bytes) -> dict[str, Any]:
    """Send raw bytes on the control socket (then half-close) and return the one answer line."""
    sock = await connect(path)
    answer = b""
    with sock, trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                view = memoryview(payload)
                try:
                    while view:
                        view = view[await sock.send(view) :]
                    sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the relay refused before it read everything, as it should

            nursery.start_soon(send)
            try:
                while b"\n" not in answer and (chunk := await sock.recv(65536)):
                    answer += chunk
            except ConnectionResetError:
                pass  # unix sockets report the relay's close with our unread bytes after the answer
            nursery.cancel_scope.cancel()
    assert answer.count(b"\n") == 1 and answer.endswith(b"\n"), f"not one answer line: {answer[:200]!r}"
    decoded = json.loads(answer)
    assert isinstance(decoded, dict)
    return decoded


def internal_errors(relay: Daemon) -> float:
    return counted(relay, "migrelay_internal_errors_total", where="control")


async def still_serving(tmp_path: Path, relay: Daemon, seed: int) -> None:
    """The relay still carries a stream and still answers its control socket."""
    await roundtrip(tmp_path / "hvA/hvB/migration.sock", seed, 1 << 20)
    assert isinstance(await ask(relay.config.control_path, "list"), list)


async def test_session_open_with_the_peer_folder_gone(tmp_path: Path, p: Pki) -> None:
    """The folder is not recreated: the peer's static sockets (libvirt.sock, which the session's
    desturi names) went with it, so a session would hand out paths that lead nowhere."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b, session_ids=["s0", "s1"]) as ra:
        folder = tmp_path / "hvA/hvB"
        shutil.rmtree(folder)  # say, a cleanup job; the relay's own sockets there are gone too
        answer = await raw_ask(a.control_path, OPEN_HVB)
        assert answer["ok"] is False
        assert answer["error"] == (
            f"cannot open a session to hvB: its overlay folder {folder} is missing (removed while the relay "
            "runs?); restart the relay to recreate it and its sockets"
        )
        assert not folder.exists() and internal_errors(ra) == 0
        # still serving: put the folder back by hand and a session carries a stream
        folder.mkdir()
        session = await ask(a.control_path, "open", peer="hvB")
        assert isinstance(session, dict) and session["id"] == "s1"
        async with trio.open_nursery() as servers:
            servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/hvA_s1-migration.sock"), servers)
            await roundtrip(folder / "hvA_s1-migration.sock", 1, 1 << 20)
            servers.cancel_scope.cancel()


def _make_file(path: Path) -> None:
    path.write_text("not a socket\n")


def _make_folder(path: Path) -> None:
    path.mkdir()


def _make_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "migration.sock")  # even a link to a real socket is not ours to replace


@pytest.mark.parametrize("make", [_make_file, _make_folder, _make_symlink], ids=["file", "folder", "symlink"])
async def test_session_open_with_a_non_socket_in_the_way(tmp_path: Path, p: Pki, make: Callable[[Path], None]) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b, session_ids=["stale", "fresh"]) as ra:
        obstacle = tmp_path / "hvA/hvB/hvA_stale-migration.sock"
        make(obstacle)
        answer = await raw_ask(a.control_path, OPEN_HVB)
        assert answer == {
            "ok": False,
            "error": f"{obstacle} exists and is not a socket; remove it or change the config",
        }
        assert obstacle.is_symlink() or obstacle.exists()  # left alone
        assert not (tmp_path / "hvA/hvB/stale-nbd.sock").exists()  # nothing half-made
        assert ra.control is not None and ra.control.sessions == {} and internal_errors(ra) == 0
        await still_serving(tmp_path, ra, 2)
        session = await ask(a.control_path, "open", peer="hvB")
        assert isinstance(session, dict) and session["id"] == "fresh"


async def test_deeply_nested_json(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b) as ra:
        levels = 100_000
        answer = await raw_ask(a.control_path, b"[" * levels + b"]" * levels + b"\n")
        assert answer == {
            "ok": False,
            "error": f"request too large: more than {MAX_REQUEST_BYTES} bytes without a newline",
        }
        # deep but within the size bound: refused before json recurses
        levels = MAX_REQUEST_BYTES // 2 - 100
        answer = await raw_ask(a.control_path, b'{"op": "open", "peer": ' + b"[" * levels + b"]" * levels + b"}\n")
        assert answer == {"ok": False, "error": f"request nested more than {MAX_NESTING} levels deep"}
        assert internal_errors(ra) == 0
        await still_serving(tmp_path, ra, 3)


BAD_REQUESTS = [
    (b"hello\n", "request is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'{"op": "list"\n', "request is not valid JSON: Expecting ',' delimiter: line 1 column 14 (char 13)"),
    (b"\xff\xfe\n", "request is not UTF-8"),
    (b"\n", 'empty request: send one JSON object and a newline, e.g. {"op": "list"}'),
    (b"", 'empty request: send one JSON object and a newline, e.g. {"op": "list"}'),
    (b"[1, 2]\n", 'a request must be a JSON object such as {"op": "list"}, not [1, 2]'),
    (b'{"peer": "hvB"}\n', "missing 'op': this op needs it"),
    (b'{"op": 7}\n', "'op' must be a non-empty string, not 7"),
    (b'{"op": "explode"}\n', "unknown op 'explode' (open, close, list, status, reload)"),
    (b'{"op": "open", "peer": 5}\n', "'peer' must be a non-empty string, not 5"),
    (b'{"op": "open", "peer": ""}\n', "'peer' must be a non-empty string, not ''"),
    (b'{"op": "open"}\n', "missing 'peer': this op needs it"),
    (b'{"op": "close"}\n', "missing 'id': this op needs it"),
    (b'{"op": "close", "id": ["x"]}\n', "'id' must be a non-empty string, not ['x']"),
    (b'{"op": "list", "peer": "hvB"}\n', "unknown key(s) for op list: 'peer'"),
    (b'{"op": "open", "peer": "' + b"x" * 200 + b'"}\n', f"unknown peer '{'x' * 200}' (configured: hvB)"),
    (b"x" * (MAX_REQUEST_BYTES + 1), f"request too large: more than {MAX_REQUEST_BYTES} bytes without a newline"),
    (b'{"op": "close", "id": "nope"}\n', "no session 'nope'"),
]


async def test_every_bad_request_gets_one_clear_line(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b) as ra:
        for payload, error in BAD_REQUESTS:
            assert await raw_ask(a.control_path, payload) == {"ok": False, "error": error}, payload[:50]
        assert internal_errors(ra) == 0
        await still_serving(tmp_path, ra, 4)
        # without a newline, a half-closed request is still a request
        assert (await raw_ask(a.control_path, b'{"op": "list"}'))["ok"] is True


@pytest.fixture
def patient_autojump() -> trio.abc.Clock:
    """Virtual time that jumps only after 50 ms of real idleness, so real loopback I/O still happens."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_client_that_stops_mid_request_is_answered_and_dropped(
    tmp_path: Path, p: Pki, patient_autojump: trio.abc.Clock
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b) as ra:
        sock = await connect(a.control_path)
        with sock:
            await sock.send(b'{"op": "li')
            with trio.fail_after(REQUEST_TIMEOUT_S + 5):
                answer = await sock.recv(1000)
        assert json.loads(answer) == {"ok": False, "error": f"no complete request within {REQUEST_TIMEOUT_S:.0f}s"}
        assert internal_errors(ra) == 0
        await still_serving(tmp_path, ra, 7)


class BrokenCollector:
    """A metrics collector that fails `failures` times: a stand-in for any bug behind `status`."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def describe(self) -> list[Metric]:
        return []  # so that registering does not call collect()

    def collect(self) -> list[Metric]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("collector exploded")
        return []


async def test_an_unexpected_error_is_logged_counted_and_answered(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    registry = CollectorRegistry()
    registry.register(BrokenCollector(failures=1))
    async with relays(tmp_path, a, b, metrics=Metrics(registry)) as ra:
        with caplog.at_level(logging.ERROR, logger="migrelay.control"):
            answer = await raw_ask(a.control_path, b'{"op": "status"}\n')
        assert answer == {"ok": False, "error": "internal error (the relay's log has the details)"}
        logged = [r for r in caplog.records if r.name == "migrelay.control"]
        assert len(logged) == 1 and logged[0].exc_info is not None
        assert "collector exploded" in caplog.text
        assert internal_errors(ra) == 1
        await still_serving(tmp_path, ra, 5)
        status = await ask(a.control_path, "status")
        assert isinstance(status, dict) and status["relay"] == "hvA"


class FlakyListener:
    """A listener whose first accepts fail the way a real one's can when a client gives up."""

    def __init__(self, real: trio.socket.SocketType, errnos: list[int]) -> None:
        self.real = real
        self.errnos = errnos

    async def accept(self) -> tuple[trio.socket.SocketType, object]:
        await trio.lowlevel.checkpoint()
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, os.strerror(code))
        return await self.real.accept()

    def getsockname(self) -> object:
        return self.real.getsockname()


async def test_accept_goes_on_after_a_client_gave_up(tmp_path: Path, p: Pki) -> None:
    """ECONNABORTED, EPROTO and EPERM are one client's failure; any other accept() error means the
    control listener itself is broken, and that (like a listener of the daemon's own) propagates."""
    a, _ = pair_configs(tmp_path, p, "tls")
    path = tmp_path / "control-test.sock"
    real = await listen(path)
    async with trio.open_nursery() as nursery:
        flaky = FlakyListener(real, [errno.ECONNABORTED, errno.EPROTO, errno.EPERM])
        control = Control(Forwarding(a, Metrics()), nursery)
        await nursery.start(control.serve_on, flaky)
        assert await raw_ask(path, b'{"op": "list"}\n') == {"ok": True, "result": []}
        assert flaky.errnos == []
        nursery.cancel_scope.cancel()
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            control = Control(Forwarding(a, Metrics()), nursery)
            await control.serve_on(FlakyListener(real, [errno.EBADF]))  # type: ignore[arg-type]
    assert raised.group_contains(ListenerFailed, match="Bad file descriptor", depth=2)


async def test_a_session_that_cannot_clean_up_ends_alone(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A session's task is the control socket's too: if it fails (here: its socket was replaced by
    a folder, so removing it fails), that session ends, logged and counted; the relay goes on."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with relays(tmp_path, a, b, session_ids=["gone", "next"]) as ra:
        assert ra.control is not None
        await ask(a.control_path, "open", peer="hvB")
        path = tmp_path / "hvA/hvB/hvA_gone-migration.sock"
        path.unlink()
        path.mkdir()
        with caplog.at_level(logging.ERROR, logger="migrelay.control"):
            await ask(a.control_path, "close", id="gone")
            await eventually(lambda: ra.control is not None and ra.control.sessions == {})
        assert internal_errors(ra) == 1
        assert [r.exc_info is not None for r in caplog.records if r.name == "migrelay.control"] == [True]
        assert not (tmp_path / "hvA/hvB/gone-nbd.sock").exists()  # the rest was still cleaned up
        await still_serving(tmp_path, ra, 6)
        session = await ask(a.control_path, "open", peer="hvB")
        assert isinstance(session, dict) and session["id"] == "next"
