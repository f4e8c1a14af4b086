"""Shared helpers for the integration and e2e tiers: certificates, configs, clients."""

from __future__ import annotations

import base64
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Transport
from relay.core.overlay import DEFAULT_CHANNELS
from relay.daemon.net import free_port
from relay.tools import loopback, pki

CHUNK = 1 << 20


@dataclass
class Pki:
    dir: Path
    other_ca: Path  # a second CA whose certificates our relays must refuse


def make_pki(root: Path) -> Pki:
    d = root / "pki"
    pki.init_ca(d)
    for name in ("hvA", "hvB", "hvC"):
        pki.issue(d, name)
    other = root / "other-ca"
    pki.init_ca(other)
    pki.issue(other, "hvA")
    return Pki(d, other)


# Short enough that a test waiting on them is quick, long enough for a loaded machine.
TEST_TIMEOUTS = {"handshake_timeout_s": 3.0, "drain_timeout_s": 2.0}


def pair_configs(
    root: Path,
    p: Pki,
    transport: Transport = "tls",
    channels: tuple[str, ...] = DEFAULT_CHANNELS,
    libvirt: Path | None = None,
    **both: Any,
) -> tuple[config.Config, config.Config]:
    """hvA dials, hvB listens (relay/tools/loopback.py), written to root/hvA.toml and root/hvB.toml."""
    options = {**TEST_TIMEOUTS, **both}
    a, b = loopback.write_pair(root, p.dir, transport, channels=channels, libvirt=libvirt, **options)
    return config.load(a), config.load(b)


async def connect(path: Path | str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return sock


async def listen(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(128)
    return sock


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, non-repeating test data (distinct per seed)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:size])


async def send_stream(sock: trio.socket.SocketType, seed: int, size: int) -> str:
    """Send `size` bytes of seeded data, then half-close; return their sha256."""
    h = hashlib.sha256()
    block = pattern(seed, CHUNK)
    sent = 0
    while sent < size:
        # rotate through the block so no two chunks are alike
        off = (sent // CHUNK * 4099) % CHUNK
        n = min(CHUNK, size - sent)
        piece = (block[off:] + block[:off])[:n]
        h.update(piece)
        view = memoryview(piece)
        while view:
            view = view[await sock.send(view) :]
        sent += n
    sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


async def recv_stream(sock: trio.socket.SocketType) -> tuple[int, str]:
    """Read to EOF; return (bytes, sha256)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    total = 0
    while n := await sock.recv_into(buf):
        h.update(memoryview(buf)[:n])
        total += n
    return total, h.hexdigest()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics from a relay; samples keyed by (name, labels)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> Samples:
    """A /metrics body (however it was fetched, e.g. from inside a network namespace) as samples."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every sample whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def add_metrics(config_path: Path) -> int:
    """Give a written config a [metrics] listener on a free port; return the port."""
    port = free_port()
    loopback.with_changes(config_path, metrics_listen=config.HostPort("127.0.0.1", port))
    return port


def _tlv(der: bytes, at: int) -> tuple[int, int]:
    """(start of content, end) of the DER element at `at`."""
    length = der[at + 1]
    if length < 0x80:
        return at + 2, at + 2 + length
    n = length & 0x7F
    size = int.from_bytes(der[at + 2 : at + 2 + n], "big")
    return at + 2 + n, at + 2 + n + size


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def odd_version_certificate(ca_dir: Path, name: str, version: int = 5) -> tuple[Path, Path]:
    """A certificate for `name` from the CA in ca_dir whose version field says v`version+1`, correctly signed.

    OpenSSL parses and verifies it; the cryptography package refuses it (InvalidVersion).
    Written as CA_DIR/NAME-odd.pem with the key CA_DIR/NAME-odd-key.pem.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = pki.issue(ca_dir, f"{name}-odd", dns=[name])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    tbs = bytearray(cert.tbs_certificate_bytes)
    # TBSCertificate ::= SEQUENCE { [0] EXPLICIT INTEGER version, ... }: A0 03 02 01 <v>
    start, _ = _tlv(bytes(tbs), 0)
    assert tbs[start : start + 4] == b"\xa0\x03\x02\x01", "version field not where expected"
    tbs[start + 4] = version
    der = cert.public_bytes(serialization.Encoding.DER)
    body, _ = _tlv(der, 0)
    _, tbs_end = _tlv(der, body)
    _, alg_end = _tlv(der, tbs_end)
    algorithm = der[tbs_end:alg_end]
    signature = ca_key.sign(bytes(tbs), ec.ECDSA(hashes.SHA256()))
    odd = _der(0x30, bytes(tbs) + algorithm + _der(0x03, b"\x00" + signature))
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(odd) + b"-----END CERTIFICATE-----\n"
    cert_path.write_bytes(pem)
    return cert_path, key_path


def raw_client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> SSL.Context:
    """A TLS 1.3 client context as any TLS stack would build it from files: it loads what
    OpenSSL takes, which includes certificates a relay refuses to load (cryptography cannot
    read them), so a test can present them to a relay."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if cert is not None and key is not None:
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
    ctx.load_verify_locations(str(ca))
    return ctx
