"""Two real `migrelay serve` processes carry streams between their overlays, byte-exact.

Why it matters: this is the product as an operator runs it — separate daemons, readiness
reported to systemd only once every socket is bound, a clean SIGTERM that drains and
removes its overlay sockets — over each of the three peer transports.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio

from relay.core.config import Transport
from tests.e2e.procs import serve
from tests.support import add_metrics, connect, listen, make_pki, pair_configs, recv_stream, scrape, send_stream

SIZE = 64 << 20


@pytest.mark.parametrize("transport", ["tls", "unix", "tcp"])
def test_two_daemons_carry_streams(tmp_path: Path, transport: Transport) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, transport)
    port_a, port_b = add_metrics(tmp_path / "hvA.toml"), add_metrics(tmp_path / "hvB.toml")

    async def exchange() -> None:
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        result: dict[str, object] = {}

        async def far_end() -> None:
            conn, _ = await dest.accept()
            with conn:
                result["far"] = await recv_stream(conn)
                result["back"] = await send_stream(conn, 9, SIZE // 4)

        async def near_end() -> None:
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            with sock:
                result["sent"] = await send_stream(sock, 8, SIZE)
                result["near"] = await recv_stream(sock)

        async with trio.open_nursery() as n:
            n.start_soon(far_end)
            n.start_soon(near_end)
        assert result["far"] == (SIZE, result["sent"])
        assert result["near"] == (SIZE // 4, result["back"])
        dest.close()

    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml") as (a, b):
        trio.run(exchange)
        # the relays flush their byte meters when the stream closes, just after the clients finish
        tx_on_a = (
            "migrelay_bytes_total",
            frozenset({"peer": "hvB", "channel": "migration", "direction": "tx"}.items()),
        )
        rx_on_b = (
            "migrelay_bytes_total",
            frozenset({"peer": "hvA", "channel": "migration", "direction": "rx"}.items()),
        )
        deadline = time.monotonic() + 10
        while (scrape(port_a).get(tx_on_a), scrape(port_b).get(rx_on_b)) != (SIZE, SIZE):
            if time.monotonic() > deadline:
                break  # the assertions below say what is missing
            time.sleep(0.05)
        on_a, on_b = scrape(port_a), scrape(port_b)
        labels = {"peer": "hvB", "channel": "migration"}
        assert on_a[tx_on_a] == SIZE
        assert on_a[("migrelay_bytes_total", frozenset({**labels, "direction": "rx"}.items()))] == SIZE // 4
        labels = {"peer": "hvA", "channel": "migration"}
        assert on_b[("migrelay_bytes_total", frozenset({**labels, "direction": "rx"}.items()))] == SIZE
        assert on_b[("migrelay_connections_total", frozenset({**labels, "result": "ok"}.items()))] == 1
    for proc in (a, b):
        assert proc.proc.returncode == 0, proc.output()
        assert "SIGTERM received: stopping" in proc.output()
    # the overlay sockets are gone; the folders stay for the hypervisors
    assert not (tmp_path / "hvA/hvB/migration.sock").exists()
    assert (tmp_path / "hvB/hvB").is_dir()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves socket files; the next start must not trip over them."""
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    (tmp_path / "hvA/hvB").mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "hvA/hvB/migration.sock"))
    stale.close()
    with serve(tmp_path / "hvA.toml") as (a,):
        assert (tmp_path / "hvA/hvB/migration.sock").is_socket()
    assert a.proc.returncode == 0
