"""`migrelay status` as a person reads it: rates from two snapshots, and the tables.

Why it matters: a rate over the wrong interval, or a stream matched to another's earlier
numbers, is a wrong figure shown with confidence while an operator decides whether a
migration is stuck.
"""

from __future__ import annotations

from typing import Any

from relay.tools.status import render, with_rates

MB = 1_000_000


def snapshot(clock_s: float, *streams: dict[str, Any], **peer: Any) -> dict[str, Any]:
    return {
        "relay": "hvA",
        "time": 1_800_000_000.0 + clock_s,
        "clock_s": clock_s,
        "uptime_s": clock_s,
        "socket_dir": "/run/migrelay",
        "listen": [],
        "peers": {
            "hvB": {
                "address": "192.0.2.2:7000",
                "last_dial": "up",
                "last_dial_at": 1_800_000_000.0,
                "last_dial_error": None,
                "last_handshake_at": 1_800_000_000.0,
                **peer,
            }
        },
        "streams": list(streams),
        "sessions": [],
    }


def stream(stream_id: int, tx: int, age_s: float, direction: str = "outbound", rx: int = 0) -> dict[str, Any]:
    return {
        "id": stream_id,
        "peer": "hvB",
        "socket": "migration.sock",
        "channel": "migration",
        "direction": direction,
        "tx_bytes": tx,
        "rx_bytes": rx,
        "age_s": age_s,
        "started_at": 0.0,
    }


def test_rates_over_the_watchers_interval_or_since_the_start() -> None:
    before = with_rates(snapshot(100.0, stream(7, 50 * MB, 10.0)), None)
    assert before["streams"][0]["mb_s"] == 5.0 and before["streams"][0]["mb_s_over_s"] == 10.0  # since its start
    after = with_rates(
        snapshot(
            100.5,
            stream(7, 100 * MB, 10.5, rx=1 * MB),  # 51 MB in the last half second
            stream(7, 3 * MB, 0.25, direction="inbound"),  # the peer's stream #7: not ours
            stream(8, 2 * MB, 0.0),  # born at this very snapshot: no rate yet
        ),
        before,
    )
    assert [(s["mb_s"], s["mb_s_over_s"]) for s in after["streams"]] == [(102.0, 0.5), (12.0, 0.25), (None, 0.0)]


def test_the_tables() -> None:
    down = {"last_dial": "down", "last_dial_at": 1_800_000_058.0, "last_dial_error": "cannot reach hvB: timed out"}
    shown = with_rates(snapshot(60.0, stream(7, 3 << 30, 59.0, rx=5 << 10)), None)
    shown["peers"]["hvB"].update(down, bytes_tx=3 << 30, active_streams=1)
    assert render(shown).splitlines() == [
        "relay hvA: up 1m00s, overlay /run/migrelay, listening on nothing (dials out only)",
        "PEER  ADDRESS         LAST DIAL     LAST HANDSHAKE  ACTIVE       TX   RX  OK  REFUSED  FAILED",
        "hvB   192.0.2.2:7000  down, 2s ago  1m00s ago            1  3.0 GiB  0 B   0        0       0",
        "hvB is down: cannot reach hvB: timed out",
        "STREAM  PEER  SOCKET          DIRECTION       TX       RX  MB/s  AGE",
        "#7      hvB   migration.sock  outbound   3.0 GiB  5.0 KiB  54.6  59s",
    ]
