"""`migrelay status`: the running relay's status, as a few lines for a person."""

from __future__ import annotations

from typing import Any


def render(status: dict[str, Any]) -> str:
    """The control socket's status answer, one line for the relay, one per peer and per session."""
    listening = ", ".join(status["listen"]) or "nothing (dials out only)"
    lines = [
        f"relay {status['relay']}: up {status['uptime_s']:.0f}s, overlay {status['socket_dir']}, "
        f"listening on {listening}"
    ]
    for name, peer in status["peers"].items():
        lines.append(
            f"  peer {name} ({peer['address'] or 'accept only'}): {peer.get('active_streams', 0)} active, "
            f"tx {peer.get('bytes_tx', 0)} B, rx {peer.get('bytes_rx', 0)} B, connections ok "
            f"{peer.get('connections_ok', 0)} refused {peer.get('connections_refused', 0)} "
            f"failed {peer.get('connections_failed', 0)}"
        )
    for session in status["sessions"]:
        lines.append(
            f"  session {session['id']} to {session['peer']}: {session['active_streams']} active, "
            f"idle {session['idle_s']:.0f}s, {session.get('migrateuri', '')}"
        )
    return "\n".join(lines)
