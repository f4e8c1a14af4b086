"""A CA rotation and a removed peer, by SIGHUP to running relays, under a stream that never notices.

Why it matters: operators rotate certificates and change peers on hypervisors that are busy
migrating guests. A reload that dropped a stream would abort a migration; one that kept using
the old certificate would fail every peer once the old CA is retired; a removed peer must lose
its overlay sockets and be refused. And systemd must hear RELOADING=1 and READY=1, or
`systemctl reload` would hang or report nothing.

Three real `migrelay serve` processes: hvA -> hvB carries a long stream (switching TLS
connections every 8 MiB, so it also dials anew after each reload), hvC -> hvB a short one.
1. a second CA; hvA's and hvB's certificates re-issued from it; every relay trusts a bundle of
   old and new; hvB drops hvC. SIGHUP to all three at once.
2. hvB retires the old CA: only a certificate from the new one gets in now, so a stream from
   hvA shows that hvA presents its new certificate.
Then the long stream's second half goes, and both ends compare sha256.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay.core.config import Address, Config, PeerConfig, TlsFiles
from relay.daemon.net import free_port
from relay.tools import loopback, pki
from tests.e2e.procs import serve
from tests.e2e.reloading import (
    LongStream,
    assert_reload_told,
    closed_without_a_byte,
    counted,
    echo_digests,
    listen_for_credentials,
    monotonic_us,
    notifications,
    through,
    wait_for,
)
from tests.support import TEST_TIMEOUTS, add_metrics, make_pki, pair_configs

HALF_BYTES = 48 << 20
REKEY_BYTES = 8 << 20


def presented_certificate(port: int, ca: Path, cert: Path, key: Path) -> bytes:
    """The certificate hvB presents to a TLS client of the test's own (which trusts only `ca`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="hvB") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def refuses_client_certificate(port: int, ca: Path, cert: Path, key: Path) -> bool:
    """Does hvB reject this client certificate? In TLS 1.3 the client learns it after its handshake:
    accepted, it is answered (a refusal of these bytes, which are no header); rejected, it gets an alert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="hvB") as tls,
    ):
        try:
            tls.sendall(b"\0" * 64)
            return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            return True


def sha256(data: bytes) -> bytes:
    """What echo_digests answers."""
    return hashlib.sha256(data).hexdigest().encode()


def der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)


def reloaded_line(log: str, summary: str) -> bool:
    return any(line.endswith(f"(SIGHUP): {summary}") and "reloaded" in line for line in log.splitlines())


def test_reload_rotates_the_ca_under_a_live_stream(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    _, b = pair_configs(tmp_path, p, "tls", rekey_after_bytes=REKEY_BYTES)
    hv_c_address = Address("tls", host="127.0.0.1", port=free_port())
    b_port = b.listen[0].port
    loopback.with_changes(tmp_path / "hvB.toml", peers={**b.peers, "hvC": PeerConfig("hvC", hv_c_address)})
    c = Config(
        name="hvC",
        socket_dir=tmp_path / "hvC",
        listen=(hv_c_address,),
        tls=loopback.tls_files(p.dir, "hvC"),
        peers={"hvB": PeerConfig("hvB", b.listen[0])},
        **TEST_TIMEOUTS,  # type: ignore[arg-type]
    )
    loopback.write(c, tmp_path / "hvC.toml")
    ports = {name: add_metrics(tmp_path / f"{name}.toml") for name in ("hvA", "hvB", "hvC")}
    new_ca = tmp_path / "new-ca"
    bundle = tmp_path / "old-and-new-ca.pem"

    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml", tmp_path / "hvC.toml") as relays:
        ra, rb, rc = relays
        echo = echo_digests(tmp_path / "hvB/hvB/nbd.sock")
        long = LongStream(tmp_path / "hvA/hvB/migration.sock", tmp_path / "hvB/hvB/migration.sock", HALF_BYTES)
        long.start()
        wait_for(lambda: long.received_bytes == HALF_BYTES, "the first half at the far end")
        assert (tmp_path / "hvB/hvC/nbd.sock").is_socket()
        hv_c_data = b"from hvC" * 1000  # hvC is a peer of hvB, for now
        assert through(tmp_path / "hvC/hvB/nbd.sock", hv_c_data) == sha256(hv_c_data)

        # 1. the new CA; hvA and hvB re-issued from it; everyone trusts both; hvB drops hvC
        pki.init_ca(new_ca)
        bundle.write_bytes((p.dir / "ca.pem").read_bytes() + (new_ca / "ca.pem").read_bytes())
        for name in ("hvA", "hvB"):
            pki.issue(new_ca, name)
            loopback.with_changes(
                tmp_path / f"{name}.toml", tls=TlsFiles(bundle, new_ca / f"{name}.pem", new_ca / f"{name}-key.pem")
            )
        loopback.with_changes(tmp_path / "hvB.toml", peers={"hvA": b.peers["hvA"]})
        loopback.with_changes(tmp_path / "hvC.toml", tls=TlsFiles(bundle, p.dir / "hvC.pem", p.dir / "hvC-key.pem"))
        notify = listen_for_credentials(ra.notify)
        before = monotonic_us()
        for relay in relays:
            relay.proc.send_signal(signal.SIGHUP)
        told = notifications(notify, {r.proc.pid for r in relays})
        after = monotonic_us()
        for relay in relays:
            assert_reload_told(told[relay.proc.pid], before, after)
            assert relay.proc.poll() is None, relay.output()
        for name in ("hvA", "hvB", "hvC"):
            assert counted(ports[name], "migrelay_reloads_total") == 1
            assert counted(ports[name], "migrelay_reload_failures_total") == 0
        assert reloaded_line(ra.output(), "[tls] paths changed, TLS files changed"), ra.output()
        assert reloaded_line(rb.output(), "1 peer removed (hvC), [tls] paths changed, TLS files changed")
        assert reloaded_line(rc.output(), "[tls] paths changed, TLS files changed"), rc.output()

        # hvB presents its new certificate to the next connection
        hv_a_new = (new_ca / "hvA.pem", new_ca / "hvA-key.pem")
        assert presented_certificate(b_port, new_ca / "ca.pem", *hv_a_new) == der(new_ca / "hvB.pem")
        # the removed peer: its overlay sockets on hvB are gone, and hvB refuses it
        assert not list((tmp_path / "hvB/hvC").iterdir())
        assert closed_without_a_byte(tmp_path / "hvC/hvB/nbd.sock")
        labels = {"peer": "hvB", "channel": "nbd"}
        wait_for(lambda: counted(ports["hvC"], "migrelay_connections_total", **labels, result="refused") == 1, "hvC")
        assert "hvC is not a configured peer of hvB" in rb.output()

        # 2. hvB retires the old CA: hvA's old certificate no longer gets in, its new one does
        loopback.with_changes(
            tmp_path / "hvB.toml", tls=TlsFiles(new_ca / "ca.pem", new_ca / "hvB.pem", new_ca / "hvB-key.pem")
        )
        rb.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: counted(ports["hvB"], "migrelay_reloads_total") == 2, "hvB's second reload")
        assert refuses_client_certificate(b_port, new_ca / "ca.pem", p.dir / "hvA.pem", p.dir / "hvA-key.pem")
        assert not refuses_client_certificate(b_port, new_ca / "ca.pem", *hv_a_new)
        hv_a_data = b"from hvA" * 1000
        assert through(tmp_path / "hvA/hvB/nbd.sock", hv_a_data) == sha256(hv_a_data)

        # the long stream, untouched by three reloads, finishes byte-exact
        long.finish()
        rekeys = {"role": "client"}
        switches = 2 * HALF_BYTES // REKEY_BYTES - 1  # at least: the first 8 MiB need none
        wait_for(
            lambda: counted(ports["hvA"], "migrelay_streams_closed_total", peer="hvB", channel="migration") == 1,
            "the long stream's end on hvA",
        )
        assert counted(ports["hvA"], "migrelay_streams_closed_total", channel="migration", result="ok") == 1
        assert counted(ports["hvA"], "migrelay_tls_rekeys_total", **rekeys, result="ok") >= switches
        assert counted(ports["hvA"], "migrelay_tls_rekeys_total", **rekeys, result="failed") == 0
        echo.close()
    for relay in relays:
        assert relay.proc.returncode == 0, relay.output()
        assert "Traceback" not in relay.output(), relay.output()
