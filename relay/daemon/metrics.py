"""Metric handles and the /metrics endpoint.

A `Metrics` object owns its own registry and is passed in; nothing on the data path
touches a global. Byte counts live in each stream's `datapath.Meter` and are read at
scrape time (`LiveBytes`); the pumps push nothing while they run.

The endpoint speaks HTTP/1.1 through h11 (keep-alive, HEAD, gzip, 400/404/405) and
encodes with prometheus-client's own encoders (text or OpenMetrics, by Accept header).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import h11
import trio
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.core.config import HostPort
from relay.core.errors import HANDSHAKE_REASONS
from relay.daemon.datapath import Meter, hotloop
from relay.daemon.guard import contained

log = logging.getLogger("migrelay.metrics")

# Each request, headers and body, must arrive whole within this long and this size.
HTTP_REQUEST_TIMEOUT_S: Final = 5.0
MAX_HTTP_REQUEST_BYTES: Final = 8192
# A client that does not read its answer holds an fd: it gets this long, then it is reset.
HTTP_ANSWER_TIMEOUT_S: Final = 5.0
# A kept-alive connection with no next request is closed after this long: longer than any
# usual scrape interval (Prometheus: 15 s to 1 min), so a scraper reuses its connection.
# An idle one holds a slot below only until somebody needs it (`_Slots`).
HTTP_KEEPALIVE_IDLE_S: Final = 120.0
# Prometheus scrapes with one connection at a time; anyone who can reach the port (every
# local user, on 127.0.0.1) must not hold more fds than this (beyond idle ones closing).
MAX_HTTP_CONNECTIONS: Final = 8
# After an error answer (400, 413, 431), what the client still sends is read and dropped,
# this long and this much at most, so that closing does not reset the answer away.
HTTP_LINGER_S: Final = 1.0
HTTP_LINGER_BYTES: Final = 64 << 10
METRICS_PATHS: Final = frozenset({b"/metrics", b"/"})
# Renders take at most a tenth of the relay's time, and come at most 5 a second, however fast
# anyone asks (`_Exposition`): each of the 8 connections gets at most one answer per render.
# gzip's fastest level costs a tenth of level 9 for a few % more bytes.
RENDER_SPACING: Final = 10
MIN_RENDER_INTERVAL_S: Final = 0.2
GZIP_LEVEL: Final = 1

# From a libvirt RPC connection that lives for one virsh call (well under a second) to
# an NBD copy of a large disk (hours); the steps are coarse where nobody asks "2 or 3 s?".
STREAM_DURATION_BUCKETS_S: Final = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
)

_BYTES_LABELS: Final = ("peer", "channel", "direction")
_BYTES_HELP: Final = "Payload bytes relayed; direction tx is towards the peer, rx from it."


class LiveBytes(Collector):
    """`migrelay_bytes_total`: bytes of ended streams plus what live streams have counted so far.

    Each stream's meters count in plain integers (one addition per chunk); a scrape adds
    up the live ones. So the counter rises during a stream at any rate (a libvirt RPC
    connection carries a few KiB in an hour), and the data path never calls into
    prometheus-client. A meter flushes its count into `settled` when its stream ends, in
    one step of the trio thread that also renders every scrape, so no scrape sees a
    stream's bytes twice or not at all.
    """

    def __init__(self) -> None:
        # not in any registry: collect() exposes it, with the live part added
        self.settled = Counter("migrelay_bytes", _BYTES_HELP, _BYTES_LABELS, registry=None)
        self._live: dict[Meter, tuple[str, str, str]] = {}

    def meter(self, peer: str, channel: str, direction: str) -> Meter:
        """A meter for one direction of a new stream, read by every scrape until `release`."""
        labels = (peer, channel, direction)
        child = self.settled.labels(*labels)  # the series exists (0, with its created time) from now on
        meter = Meter(child.inc)
        self._live[meter] = labels
        return meter

    def release(self, meter: Meter) -> None:
        """The stream has ended: its count goes into the counter, and scrapes stop reading it."""
        meter.flush()
        self._live.pop(meter, None)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily("migrelay_bytes", _BYTES_HELP, labels=_BYTES_LABELS)]

    def collect(self) -> Iterable[Metric]:
        live: dict[tuple[str, ...], int] = {}
        for meter, labels in self._live.items():
            live[labels] = live.get(labels, 0) + meter.unflushed
        family = CounterMetricFamily("migrelay_bytes", _BYTES_HELP, labels=_BYTES_LABELS)
        created: dict[tuple[str, ...], float] = {}
        totals: dict[tuple[str, ...], float] = {}
        for metric in self.settled.collect():
            for sample in metric.samples:
                key = tuple(sample.labels[name] for name in _BYTES_LABELS)
                if sample.name.endswith("_created"):
                    created[key] = sample.value
                elif sample.name.endswith("_total"):
                    totals[key] = sample.value
        for key, value in totals.items():
            family.add_metric(list(key), value + live.get(key, 0), created=created.get(key))
        yield family


class SandboxedProcessCollector(ProcessCollector):
    """prometheus-client's process collector (CPU, RSS, fds), also inside migrelay.service's sandbox.

    It needs the boot time, and reads it from /proc/stat; systemd's `ProcSubset=pid` hides
    that file (only /proc/self stays), and without a boot time the collector reports
    nothing at all. CLOCK_BOOTTIME counts from that same moment, so it gives the same value.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def openssl_version() -> str:
    """The OpenSSL that pyOpenSSL (and so every TLS connection of the relay) runs on."""
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(errors="replace")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.live_bytes = LiveBytes()
        self.registry.register(self.live_bytes)
        # direct increments (tests, tools); streams count through live_bytes.meter()
        self.bytes = self.live_bytes.settled
        self.connections = Counter(
            "migrelay_connections",
            "Forwarded connections by outcome (ok, refused, failed), counted on each relay's own side.",
            ["peer", "channel", "result"],
            registry=self.registry,
        )
        self.tls_handshakes = Counter(
            "migrelay_tls_handshakes",
            "Completed TLS handshakes with peer relays for a stream or a switch (not probes); resumed=yes skipped "
            "the certificate exchange.",
            ["role", "resumed"],
            registry=self.registry,
        )
        self.tls_rekeys = Counter(
            "migrelay_tls_rekeys",
            "Long TLS streams moved onto a fresh connection (fresh keys) after [tls] rekey_after_bytes; role client "
            "dials, server accepts; result ok, refused (the peer said no) or failed (the stream stays where it is, "
            "or is aborted if the answer was lost).",
            ["role", "result"],
            registry=self.registry,
        )
        self.active = Gauge(
            "migrelay_active_streams",
            "Forwarded connections currently carrying bytes.",
            ["peer", "channel"],
            registry=self.registry,
        )
        self.stream_duration = Histogram(
            "migrelay_stream_duration_seconds",
            "How long forwarded connections carried bytes, observed when each ends (ok or failed).",
            ["channel"],
            buckets=STREAM_DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.peer_up = Gauge(
            "migrelay_peer_up",
            "1 if the last dial or probe of this peer reached a relay that authenticated as it (a refusal counts: "
            "it answered), 0 if it could not be reached or authenticated. Only for peers with an address.",
            ["peer"],
            registry=self.registry,
        )
        self.build = Info(
            "migrelay_build",
            "The running migrelay's version, the OpenSSL its TLS runs on, and whether the threaded data path's "
            "loops are compiled or Python (relay/daemon/datapath/hotloop.py).",
            registry=self.registry,
        )
        self.build.info({"version": __version__, "openssl": openssl_version(), "loops": hotloop.describe()})
        SandboxedProcessCollector(registry=self.registry)

        self.internal_errors = Counter(
            "migrelay_internal_errors",
            "Unexpected exceptions caught in a per-connection task (a bug: the log has the traceback).",
            ["where"],
            registry=self.registry,
        )
        self.refused = Counter(
            "migrelay_refused",
            "Connections closed or refused by a limit or a local policy, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "migrelay_reloads",
            "Reloads (SIGHUP, systemctl reload, migrelay reload) that took effect.",
            registry=self.registry,
        )
        self.reload_failures = Counter(
            "migrelay_reload_failures",
            "Reloads refused (a bad config or certificate, a key that needs a restart): the relay kept serving its "
            "previous configuration; the log line says why.",
            registry=self.registry,
        )
        self.streams_closed = Counter(
            "migrelay_streams_closed",
            "Forwarded connections that ended after carrying bytes: result ok (clean end) or failed (aborted).",
            ["peer", "channel", "result"],
            registry=self.registry,
        )
        self.handshake_failures = Counter(
            "migrelay_handshake_failures",
            "TLS peer connections, accepted or dialled, that failed before the peer was authenticated and "
            "identified, by reason: bad_certificate, unknown_ca, expired, revoked, name_mismatch, unknown_peer, "
            "timeout, protocol.",
            ["reason"],
            registry=self.registry,
        )
        for reason in HANDSHAKE_REASONS:  # every series from the start: rate() needs a 0 before the first 1
            self.handshake_failures.labels(reason)
        self.certificate_expiry = Gauge(
            "migrelay_certificate_expiry_timestamp_seconds",
            "When this relay's certificate (cert=own) and the first of the certificates in [tls] ca (cert=ca) "
            "expire, and the first next update of the CRLs in [tls] crl (cert=crl), as a Unix time; set "
            "whenever the TLS contexts are built.",
            ["cert"],
            registry=self.registry,
        )

    def peer_totals(self) -> dict[str, dict[str, int]]:
        """Per peer, summed over channels: bytes_tx/rx, connections_ok/refused/failed, active_streams."""
        families = {
            "migrelay_bytes_total": ("bytes", "direction"),
            "migrelay_connections_total": ("connections", "result"),
            "migrelay_active_streams": ("active_streams", None),
        }
        totals: dict[str, dict[str, int]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                known = families.get(sample.name)
                peer = sample.labels.get("peer")
                if known is None or peer is None:
                    continue
                prefix, by = known
                key = f"{prefix}_{sample.labels[by]}" if by else prefix
                entry = totals.setdefault(peer, {})
                entry[key] = entry.get(key, 0) + int(sample.value)
        return totals

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type: text format 0.0.4, or what `accept` asks for
        (OpenMetrics, which Prometheus asks for)."""
        encoder, content_type = _encoder(accept)
        return encoder(self.registry), content_type


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    try:
        return choose_encoder(accept)
    except Exception:  # prometheus-client raises on some malformed Accept values ("version=a")
        return choose_encoder("")  # the text format, as for a client that asks for nothing


class _Exposition:
    """Renders the exposition for requests, at most one render at a time and spaced out.

    A render runs on the thread that moves every stream's bytes and costs milliseconds
    (tens with many peers); whoever can reach the port may ask in a loop. Every answer is
    rendered after its request arrived (never stale), but renders are spaced so that they
    take at most 1/RENDER_SPACING of the time, MIN_RENDER_INTERVAL_S apart at least:
    requests meanwhile wait, and all those that arrived before a render started share it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = trio.Lock()
        self._started = 0  # renders started so far
        self._next_at = -math.inf  # trio clock: when the next render may start
        self._kept: dict[tuple[str, bool], tuple[int, bytes]] = {}  # format -> (render number, body)

    async def get(self, accept: str, gzipped: bool) -> tuple[bytes, str]:
        encoder, content_type = _encoder(accept)
        key = (content_type, gzipped)
        arrived_after = self._started
        async with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] > arrived_after:
                return kept[1], content_type  # rendered since this request arrived
            await trio.sleep_until(self._next_at)
            self._started += 1
            began = time.perf_counter()
            body = encoder(self._metrics.registry)
            if gzipped:
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            took = time.perf_counter() - began
            self._next_at = trio.current_time() + max((RENDER_SPACING - 1) * took, MIN_RENDER_INTERVAL_S)
            self._kept[key] = (self._started, body)
        return body, content_type


# --- the endpoint ---------------------------------------------------------------------


async def serve_metrics(
    address: HostPort, metrics: Metrics, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """GET or HEAD /metrics (or /) over HTTP/1.1, at most MAX_HTTP_CONNECTIONS at a time."""
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    slots = _Slots(MAX_HTTP_CONNECTIONS)
    exposition = _Exposition(metrics)
    async with trio.open_nursery() as nursery:
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            if not slots.take():
                metrics.refused.labels("metrics_connections").inc()
                stream.socket.close()  # at once: a scraper that needs more is not Prometheus
                return
            try:
                with contained("metrics", metrics.internal_errors, stream.socket):
                    await _serve_connection(stream, exposition, slots)
            finally:
                slots.used -= 1

        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


class _Slots:
    """At most `cap` connections; when all are taken, the oldest one still waiting for a
    request (idle between scrapes, silent, or trickling its request) is closed for a newcomer.

    As with unauthenticated peer connections (admission.py), a flood evicts itself: a real
    scraper sends its request at once and is answered within milliseconds, so it is always
    among the newest; one kept alive that comes back after its eviction reconnects, as after
    any idle close. A connection taking its answer keeps its slot (for HTTP_ANSWER_TIMEOUT_S
    at most). The count may pass `cap` by the connections being closed for a newcomer, for
    the moment they take to go.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._waiting: OrderedDict[trio.CancelScope, None] = OrderedDict()

    def take(self) -> bool:
        if self.used >= self.cap:
            if not self._waiting:
                return False
            oldest, _ = self._waiting.popitem(last=False)
            oldest.cancel()
        self.used += 1
        return True

    @contextlib.contextmanager
    def evictable(self, scope: trio.CancelScope) -> Iterator[None]:
        """While in this block the connection waits for a request: a newcomer may take its slot."""
        self._waiting[scope] = None
        try:
            yield
        finally:
            self._waiting.pop(scope, None)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    @classmethod
    def plain(cls, status: int, text: str, *headers: tuple[str, str]) -> _Answer:
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode())


class _TooLarge(Exception):
    """A request body over MAX_HTTP_REQUEST_BYTES (h11 caps the headers itself)."""


async def _serve_connection(stream: trio.SocketStream, exposition: _Exposition, slots: _Slots) -> None:
    """Answer the requests of one connection until it closes, errs, is too slow or idles."""
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_REQUEST_BYTES)
    # the first request has HTTP_REQUEST_TIMEOUT_S from the accept, the wait for its first byte included
    deadline = trio.current_time() + HTTP_REQUEST_TIMEOUT_S
    idle_s = HTTP_REQUEST_TIMEOUT_S
    async with stream:
        while True:
            answer: _Answer | None = None
            asked: h11.Request | None = None
            head = False
            # until its request is in, the connection may give its slot to a newcomer
            with trio.CancelScope() as evictable, slots.evictable(evictable):
                if not http.trailing_data[0]:  # no pipelined request already here
                    with trio.move_on_after(idle_s) as idling:
                        await trio.lowlevel.wait_readable(stream.socket)
                    if idling.cancelled_caught:
                        return  # no request for too long: a silent client, or an idle keep-alive
                # a request kept alive for has HTTP_REQUEST_TIMEOUT_S from its first byte
                deadline = min(deadline, trio.current_time() + HTTP_REQUEST_TIMEOUT_S)
                with trio.move_on_at(deadline):
                    try:
                        request = await _receive_request(stream, http)
                    except (trio.BrokenResourceError, OSError):
                        return  # the client reset the connection mid-request: nobody to answer
                    except h11.RemoteProtocolError as e:
                        # not HTTP, or headers over the cap (431): say so, then close
                        status = e.error_status_hint
                        answer = _Answer.plain(status, f"{HTTPStatus(status).phrase}\n", ("Connection", "close"))
                    except _TooLarge:
                        answer = _Answer.plain(413, "request too large\n", ("Connection", "close"))
                    else:
                        if request is None:
                            return  # the client closed between requests
                        asked = request
                        head = request.method == b"HEAD"
            if evictable.cancel_called:  # even if the request came just as it was called
                return  # its slot went to a newcomer
            if asked is not None:
                answer = await _respond(asked, exposition)
            if answer is None:
                return  # no whole request in time (a silent or trickling client), or idle for too long
            if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or not await _send(stream, http, answer, head):
                return
            if http.their_state is h11.ERROR or http.their_state is h11.SEND_BODY:
                await _linger(stream)  # we answered before reading all it sent
                return
            if not _reusable(http):
                return  # Connection: close, asked by either side
            http.start_next_cycle()
            idle_s, deadline = HTTP_KEEPALIVE_IDLE_S, math.inf  # set when its first byte comes


async def _linger(stream: trio.SocketStream) -> None:
    """Close after an error answer without destroying it.

    Closing a socket with unread input makes the kernel send RST, and a client that gets
    the RST before it has read the answer never sees it (why a 431 or 413 would vanish).
    So: our FIN first, then drop what still comes, for a moment and a few KiB at most.
    """
    drained = 0
    with trio.move_on_after(HTTP_LINGER_S):
        try:
            await stream.send_eof()
            while drained < HTTP_LINGER_BYTES and (chunk := await stream.receive_some(MAX_HTTP_REQUEST_BYTES)):
                drained += len(chunk)
        except (trio.BrokenResourceError, OSError):
            log.debug("metrics client reset the connection after an error answer")


def _reusable(http: h11.Connection) -> bool:
    """Whether the exchange just answered leaves the connection ready for the next request."""
    return http.our_state is h11.DONE and http.their_state is h11.DONE


async def _receive_request(stream: trio.SocketStream, http: h11.Connection) -> h11.Request | None:
    """The next whole request (its body read and dropped), or None if the client closed instead."""
    request: h11.Request | None = None
    body_bytes = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(await stream.receive_some(MAX_HTTP_REQUEST_BYTES))  # b"" at EOF
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body_bytes += len(event.data)
            if body_bytes > MAX_HTTP_REQUEST_BYTES:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None  # h11 sends a Request first
            return request
        else:  # ConnectionClosed; never PAUSED, as we answer each request before reading on
            return None


async def _respond(request: h11.Request, exposition: _Exposition) -> _Answer:
    if request.method not in (b"GET", b"HEAD"):
        return _Answer.plain(405, "only GET and HEAD\n", ("Allow", "GET, HEAD"))
    if request.target.split(b"?", 1)[0] not in METRICS_PATHS:
        return _Answer.plain(404, "try /metrics\n")
    accept = b",".join(value for name, value in request.headers if name == b"accept").decode("latin-1")
    encodings = b",".join(value for name, value in request.headers if name == b"accept-encoding").decode("latin-1")
    gzipped = gzip_accepted(encodings)
    body, content_type = await exposition.get(accept, gzipped)
    headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
    if gzipped:
        headers.append(("Content-Encoding", "gzip"))
    return _Answer(200, headers, body)


async def _send(stream: trio.SocketStream, http: h11.Connection, answer: _Answer, head: bool) -> bool:
    """Send one answer; False if the connection is no longer usable.

    The answer to HEAD is the headers a GET would get, Content-Length included, and no body.
    """
    headers = [*answer.headers, ("Content-Length", str(len(answer.body)))]
    reason = HTTPStatus(answer.status).phrase
    parts = [http.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))]
    if answer.body and not head:
        parts.append(http.send(h11.Data(data=answer.body)))
    parts.append(http.send(h11.EndOfMessage()))
    data = b"".join(part for part in parts if part is not None)
    with trio.move_on_after(HTTP_ANSWER_TIMEOUT_S):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            log.debug("metrics client went away before the answer was sent")
            return False
        return True
    # it does not read: reset, so the kernel does not keep the answer queued for it
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False
