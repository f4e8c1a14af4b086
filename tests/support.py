"""Shared helpers for the integration and e2e tiers: certificates, configs, clients."""

from __future__ import annotations

import base64
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from relay.core import config
from relay.daemon.net import free_port
from relay.tools import pki

CHUNK = 1 << 20


@dataclass
class Pki:
    dir: Path
    other_ca: Path  # a second CA whose certificates our relays must refuse

    def files(self, name: str, folder: Path | None = None) -> str:
        d = folder or self.dir
        return f'[tls]\nca = "{self.dir}/ca.pem"\ncert = "{d}/{name}.pem"\nkey = "{d}/{name}-key.pem"\n'


def make_pki(root: Path) -> Pki:
    d = root / "pki"
    pki.init_ca(d)
    for name in ("hvA", "hvB", "hvC"):
        pki.issue(d, name)
    other = root / "other-ca"
    pki.init_ca(other)
    pki.issue(other, "hvA")
    return Pki(d, other)


def pair_configs(
    root: Path,
    p: Pki,
    transport: str = "tls",
    channels: tuple[str, ...] = ("libvirt.sock", "migration.sock", "nbd.sock"),
    libvirt: Path | None = None,
    a_cert: str | None = None,
) -> tuple[config.Config, config.Config]:
    """hvA dials, hvB listens; each relay's socket_dir is root/<name>."""
    if transport == "tls":
        address = f"127.0.0.1:{free_port()}"
    elif transport == "tcp":
        address = f"tcp://127.0.0.1:{free_port()}"
    else:
        address = f"unix:{root}/hvB-peer.sock"
    insecure = "insecure = true\n" if transport == "tcp" else ""
    chans = "[" + ", ".join(f'"{c}"' for c in channels) + "]"
    timeouts = "handshake_timeout_s = 3\ndrain_timeout_s = 2\n"
    a = (
        f'[relay]\nname = "hvA"\nsocket_dir = "{root}/hvA"\n{timeouts}{p.files("hvA") if a_cert is None else a_cert}\n'
        f'[peers.hvB]\naddress = "{address}"\nchannels = {chans}\n{insecure}'
    )
    lv = f'libvirt = "{libvirt}"\n' if libvirt else ""
    b = (
        f'[relay]\nname = "hvB"\nsocket_dir = "{root}/hvB"\nlisten = ["{address}"]\n{lv}'
        f"{timeouts}{p.files('hvB')}\n"
        f"[peers.hvA]\nchannels = {chans}\n{insecure}"
    )
    (root / "hvA.toml").write_text(a)
    (root / "hvB.toml").write_text(b)
    return config.load(root / "hvA.toml"), config.load(root / "hvB.toml")


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
    config_path.write_text(config_path.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
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
