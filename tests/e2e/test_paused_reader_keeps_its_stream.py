"""A destination that stops reading for longer than tcp_ack_timeout_s keeps its stream.

Why it matters: a destination QEMU or NBD server can stop reading for a while with the
source still sending (its disk stalls, an NFS server fails over), and both hosts and
relays are healthy throughout: the peer relay keeps acknowledging, only with a zero
window. Dead-peer detection must not take that for death. Found by the soak's slow
readers, stretched: with TCP_USER_TIMEOUT (which Linux applies to zero-window probing as
well) a reader that paused for 3x the timeout lost its stream to ETIMEDOUT on hvA; the
relay now watches for ACKs owed instead (relay/net.py watch_acks), and a window probe
answered is an ACK paid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import trio

from relay.core.config import Liveness
from tests.e2e.procs import serve
from tests.support import connect, listen, make_pki, pair_configs, recv_stream, send_stream

ACK_TIMEOUT_S: Final = 2.0
PAUSE_S: Final = 3 * ACK_TIMEOUT_S
# Far more than the buffers between the ends hold (a 2 MiB unix send buffer, TCP's several
# MiB), so the sender is held back through both relays and hvA meets hvB's zero window.
SIZE_BYTES: Final = 64 << 20
TIMEOUT_S: Final = 60.0


def test_paused_reader_keeps_its_stream(tmp_path: Path) -> None:
    pair_configs(tmp_path, make_pki(tmp_path), "tls", liveness=Liveness(ack_timeout_s=ACK_TIMEOUT_S))
    result: dict[str, object] = {}

    async def exchange() -> None:
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")

        async def far_end() -> None:
            conn, _ = await dest.accept()
            with conn:
                await trio.sleep(PAUSE_S)  # the destination is busy; the source keeps sending
                try:
                    result["far"] = await recv_stream(conn)
                except OSError as e:
                    result["far"] = e.strerror

        async def near_end() -> None:
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            with sock:
                try:
                    result["sent"] = await send_stream(sock, 1, SIZE_BYTES)
                except OSError as e:
                    result["sent"] = e.strerror

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as n:
                n.start_soon(far_end)
                n.start_soon(near_end)
        dest.close()

    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml") as (a, _):
        trio.run(exchange)
        broken = [line for line in a.output().splitlines() if "broken after" in line]
    assert result["far"] == (SIZE_BYTES, result["sent"]), f"client: {result['sent']}; hvA: {broken}"
