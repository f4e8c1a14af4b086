"""`migrelay status`: the running relay's status, once or refreshed, for a person or (--json) a script.

The daemon's answer is a snapshot with exact byte counts per stream in flight; rates are
computed here, from two snapshots. A watcher then gets the rate over its own interval (two
watchers at 0.2 s and 5 s each get theirs), and the daemon keeps no history and runs no
timer for anyone. With no earlier snapshot of a stream (the first refresh, a one-shot
status) its rate is the average since it started; `mb_s_over_s` says which.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, TextIO

from relay.core.errors import ControlError, printable

MB: Final = 1e6  # rates in MB/s, as `migrelay migrate` and the bench report them
# Home the cursor and clear the screen: a terminal redraws in place, like top.
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
MIN_WATCH_INTERVAL_S: Final = 0.1

Status = dict[str, Any]


def _key(stream: dict[str, Any]) -> tuple[str, str, int]:
    # the source's stream id is unique per source; direction keeps ours apart from a peer's
    return stream["peer"], stream["direction"], stream["id"]


def with_rates(status: Status, previous: Status | None) -> Status:
    """`status` with each stream's `mb_s` (both directions) and the seconds it is measured over.

    Over the time since `previous` (an earlier snapshot of the same relay) for a stream it
    had, since the stream started otherwise.
    """
    clock = status["clock_s"]
    before: dict[tuple[str, str, int], tuple[int, float]] = {}
    if previous is not None:
        for s in previous["streams"]:
            before[_key(s)] = (s["tx_bytes"] + s["rx_bytes"], previous["clock_s"])
    streams = []
    for s in status["streams"]:
        moved = s["tx_bytes"] + s["rx_bytes"]
        base, since = before.get(_key(s), (0, clock - s["age_s"]))
        over = clock - since
        # a stream younger than the clock's rounding has no rate yet
        rate = round((moved - base) / over / MB, 1) if over > 0 else None
        streams.append({**s, "mb_s": rate, "mb_s_over_s": round(over, 3)})
    return {**status, "streams": streams}


def render(status: Status) -> str:
    """A status snapshot (with_rates) as a few tables: the relay, its peers, its streams, its sessions."""
    now = status["time"]
    listening = ", ".join(status["listen"]) or "nothing (dials out only)"
    lines = [
        f"relay {status['relay']}: up {_duration(status['uptime_s'])}, overlay {status['socket_dir']}, "
        f"listening on {listening}"
    ]
    peers = status["peers"]
    lines += _table(
        ("PEER", "ADDRESS", "LAST DIAL", "LAST HANDSHAKE", "ACTIVE", "TX", "RX", "OK", "REFUSED", "FAILED"),
        [
            (
                name,
                peer["address"] or "accept only",
                _dial(peer, now),
                _ago(peer["last_handshake_at"], now),
                str(peer.get("active_streams", 0)),
                _bytes(peer.get("bytes_tx", 0)),
                _bytes(peer.get("bytes_rx", 0)),
                str(peer.get("connections_ok", 0)),
                str(peer.get("connections_refused", 0)),
                str(peer.get("connections_failed", 0)),
            )
            for name, peer in peers.items()
        ],
        numbers=range(4, 10),
    )
    for name, peer in peers.items():
        if peer["last_dial"] == "down":
            lines.append(f"{name} is down: {printable(peer['last_dial_error'] or '')}")
    if status["streams"]:
        lines += _table(
            ("STREAM", "PEER", "SOCKET", "DIRECTION", "TX", "RX", "MB/s", "AGE"),
            [
                (
                    f"#{s['id']}",
                    s["peer"],
                    printable(s["socket"]),  # an inbound one is named by the peer
                    s["direction"],
                    _bytes(s["tx_bytes"]),
                    _bytes(s["rx_bytes"]),
                    "-" if s.get("mb_s") is None else f"{s['mb_s']:.1f}",
                    _duration(s["age_s"]),
                )
                for s in status["streams"]
            ],
            numbers=range(4, 8),
        )
    else:
        lines.append("no streams in flight")
    if status["sessions"]:
        lines += _table(
            ("SESSION", "PEER", "ACTIVE", "IDLE", "MIGRATEURI"),
            [
                (s["id"], s["peer"], str(s["active_streams"]), _duration(s["idle_s"]), s.get("migrateuri", ""))
                for s in status["sessions"]
            ],
            numbers=range(2, 4),
        )
    return "\n".join(lines)


def watch(fetch: Callable[[], Status], interval_s: float, out: TextIO, *, as_json: bool = False) -> NoReturn:
    """Show a snapshot every `interval_s` until Ctrl-C (KeyboardInterrupt, for the caller).

    On a terminal each refresh redraws the screen; otherwise each is a block of its own,
    after a blank line, or with --json one line of JSON. A relay that stops answering is
    reported and asked again at the next refresh (it may be restarting); if it does not
    answer the first time, fetch's ControlError ends the command like a one-shot status.
    """
    redraw = out.isatty() and not as_json
    first = with_rates(fetch(), None)
    previous: Status | None = first
    shown: Status | str = first
    while True:
        out.write(_frame(shown, interval_s, redraw=redraw, as_json=as_json))
        out.flush()
        # a full interval after each refresh, as watch(1) does: a slow answer delays the next one
        # rather than bunching two together (the rates use the snapshots' own clock either way)
        time.sleep(interval_s)
        try:
            previous = with_rates(fetch(), previous)
            shown = previous
        except ControlError as e:
            previous, shown = None, str(e)


def _frame(shown: Status | str, interval_s: float, *, redraw: bool, as_json: bool) -> str:
    """One refresh: a snapshot, or the error that took its place."""
    if as_json:
        if isinstance(shown, str):
            return json.dumps({"error": shown, "time": round(time.time(), 3)}) + "\n"
        return json.dumps(shown) + "\n"
    stamp = time.strftime("%H:%M:%S")
    body = render(shown) if isinstance(shown, dict) else f"cannot get the status: {shown} (asking again)"
    text = f"migrelay status at {stamp}, every {interval_s:g}s (Ctrl-C to quit)\n{body}\n"
    return CLEAR_SCREEN + text if redraw else text + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers: range) -> list[str]:
    """Columns as wide as their widest cell; the columns in `numbers` right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(w) if i in numbers else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    ]


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else f"{_duration(max(0.0, now - at))} ago"


def _dial(peer: dict[str, Any], now: float) -> str:
    """The last dial's outcome and when: `up, 3s ago`, `down, 1s ago`, or `never`."""
    if peer["last_dial"] == "never":
        return "never"
    return f"{peer['last_dial']}, {_ago(peer['last_dial_at'], now)}"
