"""Metric handles and the /metrics endpoint.

A `Metrics` object owns its own registry and is passed in; nothing on the data path
touches a global. Byte counters are fed in batches by `datapath.Meter`.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from relay.core.config import HostPort
from relay.core.errors import HANDSHAKE_REASONS
from relay.daemon.guard import contained

log = logging.getLogger("migrelay.metrics")

HTTP_REQUEST_TIMEOUT_S: Final = 5.0
# A client that does not read its answer holds an fd: it gets this long, then it is closed.
HTTP_ANSWER_TIMEOUT_S: Final = 5.0
MAX_HTTP_REQUEST_BYTES: Final = 8192
# Prometheus scrapes with one connection at a time; anyone who can reach the port (every
# local user, on 127.0.0.1) must not hold more fds than this.
MAX_HTTP_CONNECTIONS: Final = 8


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.bytes = Counter(
            "migrelay_bytes",
            "Payload bytes relayed; direction tx is towards the peer, rx from it.",
            ["peer", "channel", "direction"],
            registry=self.registry,
        )
        self.connections = Counter(
            "migrelay_connections",
            "Forwarded connections by outcome (ok, refused, failed), counted on each relay's own side.",
            ["peer", "channel", "result"],
            registry=self.registry,
        )
        self.tls_handshakes = Counter(
            "migrelay_tls_handshakes",
            "Completed TLS handshakes with peer relays; resumed=yes skipped the certificate exchange.",
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
            "expire, as a Unix time; set whenever the TLS contexts are built.",
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

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(
    address: HostPort, metrics: Metrics, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A minimal HTTP/1.1 endpoint: GET /metrics (or /) -> the text exposition."""
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    clients = 0
    async with trio.open_nursery() as nursery:
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            nonlocal clients
            if clients >= MAX_HTTP_CONNECTIONS:
                metrics.refused.labels("metrics_connections").inc()
                stream.socket.close()  # at once: a scraper that needs more is not Prometheus
                return
            clients += 1
            try:
                with contained("metrics", metrics.internal_errors, stream.socket):
                    await _answer(stream, metrics)
            finally:
                clients -= 1

        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _answer(stream: trio.SocketStream, metrics: Metrics) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(HTTP_REQUEST_TIMEOUT_S):
            while b"\r\n\r\n" not in request and len(request) < MAX_HTTP_REQUEST_BYTES:
                try:
                    chunk = await stream.receive_some(MAX_HTTP_REQUEST_BYTES)
                except (trio.BrokenResourceError, OSError):
                    return  # the client reset the connection mid-request: nobody to answer
                if not chunk:
                    break
                request += chunk
        parts = request.split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"GET":
            status, body, ctype = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
        elif parts[1].split(b"?")[0] in (b"/", b"/metrics"):
            status, body, ctype = b"200 OK", metrics.render(), CONTENT_TYPE_LATEST.encode()
        else:
            status, body, ctype = b"404 Not Found", b"try /metrics\n", b"text/plain"
        head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            status,
            ctype,
            len(body),
        )
        with trio.move_on_after(HTTP_ANSWER_TIMEOUT_S) as deadline:
            try:
                await stream.send_all(head + body)
            except (trio.BrokenResourceError, OSError):
                log.debug("metrics client went away before the answer was sent")
        if deadline.cancelled_caught:
            # it does not read: reset, so the kernel does not keep the answer queued for it
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
