"""/metrics speaks HTTP/1.1 as Prometheus and curl expect, and every request stays bounded.

Prometheus keeps its scrape connection alive, asks for OpenMetrics and gzip; operators
use curl -I and curl --compressed. Each behaviour is checked with a real client
(http.client, urllib, or raw bytes parsed by h11's client side), against a relay in-process.
"""

from __future__ import annotations

import gzip
import http.client
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from relay import __version__
from relay.core import config
from relay.daemon.datapath import hotloop
from relay.daemon.metrics import (
    HTTP_KEEPALIVE_IDLE_S,
    HTTP_REQUEST_TIMEOUT_S,
    MAX_HTTP_CONNECTIONS,
    MAX_HTTP_REQUEST_BYTES,
    openssl_version,
)
from relay.daemon.server import Daemon
from tests.integration.conftest import counted, running
from tests.support import add_metrics, make_pki, pair_configs, parse_metrics

HOST = ("Host", "relay")


@pytest.fixture
def patient_autojump() -> trio.abc.Clock:
    """Virtual time that jumps only after 50 ms of real idleness, so real loopback I/O still happens."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@asynccontextmanager
async def endpoint(tmp_path: Path) -> AsyncIterator[tuple[Daemon, int]]:
    """hvB alone, with /metrics on a free port."""
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    port = add_metrics(tmp_path / "hvB.toml")
    async with running(config.load(tmp_path / "hvB.toml")) as (rb,):
        yield rb, port


class Client:
    """One raw HTTP/1.1 connection, framed and parsed by h11's client side."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str = "GET", target: str = "/metrics") -> tuple[h11.Response, bytes]:
        out = self.http.send(h11.Request(method=method, target=target, headers=[HOST]))
        out = (out or b"") + (self.http.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(out)
        return await self.response()

    async def response(self) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.stream.receive_some(1 << 16))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                return response, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self) -> bool:
        """Whether the server closes this connection (EOF) rather than sending anything."""
        return await self.stream.receive_some(1 << 16) == b""


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes that are not necessarily HTTP; everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(HTTP_REQUEST_TIMEOUT_S + 5):
            while chunk := await stream.receive_some(1 << 16):
                got += chunk
        return got


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name), None)


async def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    """What Prometheus does: one connection, one request per scrape (the old endpoint closed after each)."""

    def three_scrapes(port: int) -> set[tuple[str, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        ends = set()
        for _ in range(3):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            labels = {"version": __version__, "openssl": openssl_version(), "loops": hotloop.describe()}
            build = frozenset(labels.items())
            assert ("migrelay_build_info", build) in parse_metrics(response.read().decode())
            assert conn.sock is not None  # http.client drops a socket the server said it closes
            ends.add(conn.sock.getsockname())
        conn.close()
        return ends

    async with endpoint(tmp_path) as (_, port):
        assert len(await trio.to_thread.run_sync(three_scrapes, port)) == 1


async def test_a_connection_kept_alive_across_scrape_intervals_is_reused(
    tmp_path: Path, patient_autojump: trio.abc.Clock
) -> None:
    """Prometheus scrapes every 15 s by default (1 min globally): the connection waits for it."""
    async with endpoint(tmp_path) as (_, port):
        client = await Client.connect(port)
        for interval in (15, 60):
            assert (await client.request())[0].status_code == 200
            await trio.sleep(interval)
        assert (await client.request())[0].status_code == 200


async def test_idle_connections_give_their_slots_to_a_newcomer(
    tmp_path: Path, patient_autojump: trio.abc.Clock
) -> None:
    """Eight connections idling after a scrape fill the cap: a ninth is served, the oldest idle one
    is closed for it. A connection in the middle of its request keeps its slot."""
    async with endpoint(tmp_path) as (rb, port):
        idle = []
        for _ in range(MAX_HTTP_CONNECTIONS - 1):
            idle.append(client := await Client.connect(port))
            assert (await client.request())[0].status_code == 200
            await trio.sleep(1)  # oldest first
        busy = await Client.connect(port)
        await busy.stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # half a request: not idle
        await trio.sleep(1)
        newcomer = await Client.connect(port)
        assert (await newcomer.request())[0].status_code == 200
        assert await idle[0].closed_by_server()
        await busy.stream.send_all(b"Host: relay\r\n\r\n")
        assert (await busy.response())[0].status_code == 200
        for client in idle[1:]:  # the others were not touched
            assert (await client.request())[0].status_code == 200
        assert counted(rb, "migrelay_refused_total", reason="metrics_connections") == 0


async def test_a_scrape_gets_through_connections_that_hold_half_a_request(tmp_path: Path) -> None:
    """Three times the cap of connections, each with one byte of a request: the oldest make room
    for newcomers, so a scraper (which sends its whole request at once) is always answered."""
    async with endpoint(tmp_path) as (_, port):
        holders = []
        for _ in range(3 * MAX_HTTP_CONNECTIONS):
            holder = await trio.open_tcp_stream("127.0.0.1", port)
            await holder.send_all(b"G")
            holders.append(holder)
        for _ in range(3):
            scraper = await Client.connect(port)
            assert (await scraper.request())[0].status_code == 200
            await scraper.stream.aclose()
        for holder in holders:
            await holder.aclose()


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path, patient_autojump: trio.abc.Clock) -> None:
    async with endpoint(tmp_path) as (_, port):
        client = await Client.connect(port)
        response, _ = await client.request()
        assert response.status_code == 200
        answered = trio.current_time()
        assert await client.closed_by_server()
        assert HTTP_KEEPALIVE_IDLE_S <= trio.current_time() - answered < HTTP_KEEPALIVE_IDLE_S + 1


@pytest.mark.parametrize("answered_first", [False, True], ids=["first-request", "kept-alive"])
async def test_a_trickling_request_is_cut_off(
    tmp_path: Path, patient_autojump: trio.abc.Clock, answered_first: bool
) -> None:
    """A byte a second keeps no connection: the whole request must arrive within its time, on a fresh
    connection and on a kept-alive one alike."""
    async with endpoint(tmp_path) as (_, port):
        client = await Client.connect(port)
        if answered_first:
            assert (await client.request())[0].status_code == 200
        start = trio.current_time()
        got = b""
        with trio.move_on_after(60):
            for byte in b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n":
                await client.stream.send_all(bytes([byte]))
                with trio.move_on_after(1):
                    got = await client.stream.receive_some(1 << 16)
                if got == b"":
                    break
        assert got == b"", "the server answered or held the connection"
        assert trio.current_time() - start <= HTTP_REQUEST_TIMEOUT_S + 1


async def test_head_sends_the_headers_of_get_and_no_body(tmp_path: Path) -> None:
    def head_then_get(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("HEAD", "/metrics")
        head = conn.getresponse()
        assert head.status == 200
        assert int(head.getheader("Content-Length") or 0) > 1000
        assert (head.getheader("Content-Type") or "").startswith("text/plain; version=0.0.4")
        assert head.read() == b""
        # the same connection goes on: no body bytes were sent after the headers
        conn.request("GET", "/metrics")
        get = conn.getresponse()
        assert get.status == 200 and b"migrelay_build_info" in get.read()
        conn.close()

    async with endpoint(tmp_path) as (_, port):
        await trio.to_thread.run_sync(head_then_get, port)


@pytest.mark.parametrize("gzip_asked", [True, False])
async def test_gzip_when_the_client_accepts_it(tmp_path: Path, gzip_asked: bool) -> None:
    def fetch(port: int) -> tuple[str | None, bytes]:
        headers = {"Accept-Encoding": "gzip"} if gzip_asked else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.headers.get("Content-Encoding"), r.read()

    async with endpoint(tmp_path) as (_, port):
        encoding, body = await trio.to_thread.run_sync(fetch, port)
    if gzip_asked:
        assert encoding == "gzip"
        body = gzip.decompress(body)
    else:
        assert encoding is None
    samples = parse_metrics(body.decode())
    assert any(name == "migrelay_build_info" for name, _ in samples)


async def test_openmetrics_when_the_scraper_asks_for_it(tmp_path: Path) -> None:
    """Prometheus asks for OpenMetrics first; prometheus-client's own encoder answers."""

    def fetch(port: int) -> tuple[str, bytes]:
        accept = "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.headers.get("Content-Type", ""), r.read()

    async with endpoint(tmp_path) as (_, port):
        content_type, body = await trio.to_thread.run_sync(fetch, port)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"# TYPE migrelay_build info\n" in body


async def test_an_accept_header_the_encoder_chokes_on_gets_the_text_format(tmp_path: Path) -> None:
    """prometheus-client raises on `version=a`: that is the client's mistake, not a relay bug."""
    async with endpoint(tmp_path) as (rb, port):
        client = await Client.connect(port)
        request = h11.Request(
            method="GET", target="/metrics", headers=[HOST, ("Accept", "application/openmetrics-text; version=a")]
        )
        await client.stream.send_all((client.http.send(request) or b"") + (client.http.send(h11.EndOfMessage()) or b""))
        response, body = await client.response()
        assert response.status_code == 200
        assert (header(response, b"content-type") or b"").startswith(b"text/plain; version=0.0.4")
        assert b"migrelay_build_info" in body
        assert counted(rb, "migrelay_internal_errors_total", where="metrics") == 0


async def test_every_answer_is_rendered_after_its_request(tmp_path: Path, patient_autojump: trio.abc.Clock) -> None:
    """Renders are spaced (a scrape loop cannot take the relay's thread), never stale: a value that
    changed before a request is in its answer, however soon after the previous one it comes."""
    async with endpoint(tmp_path) as (rb, port):
        client = await Client.connect(port)
        for expected in range(3):
            body = (await client.request())[1]
            assert f"migrelay_reloads_total {float(expected)}".encode() in body
            rb.metrics.reloads.inc()


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("GET", "/nothing-here", 404), ("POST", "/metrics", 405), ("DELETE", "/", 405), ("GET", "/metrics?x=1", 200)],
)
async def test_other_paths_and_methods_are_refused_and_the_connection_goes_on(
    tmp_path: Path, method: str, target: str, status: int
) -> None:
    async with endpoint(tmp_path) as (_, port):
        client = await Client.connect(port)
        response, _ = await client.request(method, target)
        assert response.status_code == status
        if status == 405:
            assert header(response, b"allow") == b"GET, HEAD"
        assert (await client.request())[0].status_code == 200


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # a TLS ClientHello
        (b"GET /metrics HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /metrics HTTP/1.1\r\nHost: relay\r\nX: " + b"a" * 2 * MAX_HTTP_REQUEST_BYTES + b"\r\n\r\n", b"431"),
        (
            b"GET /metrics HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % (2 * MAX_HTTP_REQUEST_BYTES)
            + b"x" * (2 * MAX_HTTP_REQUEST_BYTES),
            b"413",
        ),
    ],
    ids=["garbage", "no-host", "headers-too-large", "body-too-large"],
)
async def test_bad_requests_get_an_error_and_a_close(tmp_path: Path, data: bytes, status: bytes) -> None:
    async with endpoint(tmp_path) as (rb, port):
        got = await raw_exchange(port, data)
        assert got.startswith(b"HTTP/1.1 " + status + b" "), got[:200]
        assert b"\r\nconnection: close\r\n" in got.lower()
        # the relay goes on, and counted no internal error
        assert (await (await Client.connect(port)).request())[0].status_code == 200
        assert counted(rb, "migrelay_internal_errors_total") == 0
