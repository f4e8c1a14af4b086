"""One exception hierarchy for migrelay.

Local misuse (a bad config, a missing file) and remote misbehaviour (a peer that
sends garbage or is refused) are different types, so callers can act on them:
the CLI turns `LocalError` into a one-line message and exit status 2, the
daemon counts and logs `RemoteError` and keeps serving everyone else.
"""

from __future__ import annotations

from typing import Final, Literal

# How much of a string someone else chose (a socket name, a refusal reason, a
# certificate subject) reaches a log line or an error message.
QUOTE_CHARS: Final = 120


def printable(text: str | bytes, limit: int = QUOTE_CHARS) -> str:
    """`text` for a log line: control and non-printable characters escaped, at most `limit` chars.

    Whatever a peer or a client sent goes through this before it is logged, so it cannot
    forge log lines (newlines, terminal escapes, bidi overrides) or flood the journal.
    """
    if isinstance(text, bytes):
        text = text.decode(errors="backslashreplace")
    escaped = "".join(
        ch if ch.isprintable() and ch != "\\" else ch.encode("unicode_escape").decode("ascii") for ch in text[:limit]
    )
    return escaped + "…" if len(text) > limit else escaped


class RelayError(Exception):
    """Base of every error migrelay raises on purpose."""


class LocalError(RelayError):
    """Something on this host must be fixed by the operator."""


class ConfigError(LocalError):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class PkiError(LocalError):
    """A certificate or key is missing, unreadable, expired or does not match."""


class InternalError(RelayError):
    """A bug in migrelay, caught at the top: the log has the traceback."""


class NoTarget(RelayError):
    """The local socket a peer asked for is missing, or not one the relay may connect to.

    The message names the local path: it is for this relay's log, never for the peer.
    """


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
STATUS_OVER_LIMIT: Final = 5

STATUS_NAMES: Final = {
    STATUS_OK: "ok",
    STATUS_BAD_REQUEST: "bad-request",
    STATUS_FORBIDDEN: "forbidden",
    STATUS_NO_TARGET: "no-target",
    STATUS_UNSUPPORTED_VERSION: "unsupported-version",
    STATUS_OVER_LIMIT: "over-limit",
}


class Refused(RemoteError):
    """A forwarded connection was refused, by this relay's policy or by the peer's.

    `status` is one of the STATUS_* codes, `reason` the explanation sent to the peer
    (it names no local path and does not tell which local files exist), `detail` what
    this relay logs (it may; the operator reads it). Both sides log the reason.
    """

    def __init__(self, status: int, reason: str, detail: str | None = None) -> None:
        super().__init__(f"{STATUS_NAMES.get(status, str(status))}: {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail if detail is not None else reason


class Interrupted(RelayError):
    """The user interrupted a command (Ctrl-C); a migration was aborted and the guest stays where it was."""


class MigrationFailed(RemoteError):
    """libvirt reported the migration as failed (the guest stays on the source)."""


class PeerUnavailable(RemoteError):
    """The peer relay could not be reached or failed its TLS handshake."""


# Why a TLS peer connection failed before its peer was authenticated and identified: the
# label values of migrelay_handshake_failures_total (README, "Revocation and expiry").
HandshakeReason = Literal[
    "bad_certificate", "unknown_ca", "expired", "revoked", "name_mismatch", "unknown_peer", "timeout", "protocol"
]
HANDSHAKE_REASONS: Final[tuple[HandshakeReason, ...]] = (
    "bad_certificate",
    "unknown_ca",
    "expired",
    "revoked",
    "name_mismatch",
    "unknown_peer",
    "timeout",
    "protocol",
)


class HandshakeFailed(PeerUnavailable):
    """A TLS handshake with a peer failed, or its certificate does not name who it must; `reason` says which way."""

    def __init__(self, message: str, reason: HandshakeReason) -> None:
        super().__init__(message)
        self.reason: HandshakeReason = reason


class BadCertificate(HandshakeFailed):
    """The other side presented a certificate that passed OpenSSL but cannot be read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_certificate")
