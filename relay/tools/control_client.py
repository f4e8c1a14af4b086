"""The control socket's client: one request, one answer (blocking), for the CLI and `migrelay migrate`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from relay.core.control_protocol import decode_answer
from relay.core.errors import ControlError


def request(path: Path, op: str, timeout_s: float = 10.0, **args: str) -> Any:
    """Send one control request (blocking; for the CLI) and return its result or raise ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise ControlError(
                f"cannot reach the relay's control socket {path}: {e.strerror} (is migrelay serve running?)"
            ) from None
        data = b""
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as e:  # it stopped (or restarted) mid-request, or did not answer in time
            why = e.strerror or "no answer in time"
            raise ControlError(f"the relay's control socket {path} failed mid-request: {why}") from None
    return decode_answer(data)
