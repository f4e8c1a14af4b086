"""One exception hierarchy for migrelay.

Local misuse (a bad config, a missing file) and remote misbehaviour (a peer that
sends garbage or is refused) are different types, so callers can act on them:
the CLI turns `LocalError` into a one-line message and exit status 2, the
daemon counts and logs `RemoteError` and keeps serving everyone else.
"""

from __future__ import annotations

from typing import Final


class RelayError(Exception):
    """Base of every error migrelay raises on purpose."""


class LocalError(RelayError):
    """Something on this host must be fixed by the operator."""


class ConfigError(LocalError):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class PkiError(LocalError):
    """A certificate or key is missing, unreadable, expired or does not match."""


class ControlError(LocalError):
    """A control request that cannot be done (unknown peer, unknown session, bad request)."""


class RemoteError(RelayError):
    """Something the other side of a connection did; routine for a relay."""


class ProtocolError(RemoteError):
    """The peer sent bytes that are not a valid relay header."""


# Reply status codes of the relay-to-relay header (see protocol.py). They live here
# because `Refused` carries one and both sides log it.
STATUS_OK: Final = 0
STATUS_BAD_REQUEST: Final = 1
STATUS_FORBIDDEN: Final = 2
STATUS_NO_TARGET: Final = 3
STATUS_UNSUPPORTED_VERSION: Final = 4

STATUS_NAMES: Final = {
    STATUS_OK: "ok",
    STATUS_BAD_REQUEST: "bad-request",
    STATUS_FORBIDDEN: "forbidden",
    STATUS_NO_TARGET: "no-target",
    STATUS_UNSUPPORTED_VERSION: "unsupported-version",
}


class Refused(RemoteError):
    """A forwarded connection was refused, by this relay's policy or by the peer's.

    `status` is one of the STATUS_* codes, `reason` the human explanation that is
    sent to the peer and logged on both sides.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{STATUS_NAMES.get(status, str(status))}: {reason}")
        self.status = status
        self.reason = reason


class MigrationInterrupted(RemoteError):
    """The user interrupted a migration; it was aborted and the guest stays where it was."""


class PeerUnavailable(RemoteError):
    """The peer relay could not be reached or failed its TLS handshake."""
