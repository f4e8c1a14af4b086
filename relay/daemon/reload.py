"""Reload (SIGHUP, `systemctl reload`, `migrelay reload`): read everything again, check it all, then swap.

A reload re-reads the config file and every file its `[tls]` section names (certificate,
key, CA bundle, and whatever else tlsconfig loads) into fresh TLS contexts. Nothing is
applied until all of it has loaded and checked out; on any error the relay keeps serving
what it had. `Daemon.reload` (server.py) does the swap.

Some settings are fixed for the life of the process (RESTART_KEYS): a reload that changes
one of them is refused as a whole, naming the key, rather than applied in part. Half a
reload would leave the running relay matching neither the old file nor the new one, and
the operator would not know which parts took.

Fresh contexts are also what retires old TLS 1.3 tickets: a new server context has ticket
keys of its own, so a ticket issued before the reload no longer decrypts and its holder
does a full handshake against the new CA bundle (and CRL); the tickets this relay holds
from its peers are dropped with the old client context (`Forwarding.reconfigure`). A peer
the new material distrusts cannot come back through resumption, at the price of one full
handshake per peer after every reload.

Reading files and building contexts blocks, and loading a config may ask NSS for a group
(LDAP, sssd): `prepare` runs in a worker thread, never on the thread that runs the streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Config, TlsFiles
from relay.core.errors import LocalError, printable
from relay.daemon.tlsconfig import Identity, client_context, load_identity, read_tls_file, server_context

log = logging.getLogger("migrelay.reload")


class ReloadFailed(LocalError):
    """A reload that did not take: the relay serves its previous configuration. The message says why."""


# What a reload cannot change, as the config file names it. Each is bound or created once at
# start: the relay's identity and every overlay path (name, socket_dir), listeners systemd may
# have passed (listen, control, the metrics port), and the ownership and modes of sockets
# already bound (a changed group must also change the unit's SupplementaryGroups=; the SELinux
# label of sockets already bound stays what it was).
RESTART_KEYS: Final = {
    "name": "[relay] name",
    "socket_dir": "[relay] socket_dir",
    "listen": "[relay] listen",
    "control": "[relay] control",
    "socket_mode": "[relay] socket_mode",
    "socket_group": "[relay] socket_group",
    "libvirt_group": "[relay] libvirt_group",
    "socket_context": "[relay] socket_context",
    "metrics_listen": "[metrics] listen",
}
# What a reload applies, and how the reload's log line names it (peers and TLS files get a
# line of their own). A Config field in neither table counts as needing a restart until it
# is classified (tests/unit/test_reload.py fails until then).
RELOADABLE: Final = {
    "libvirt": "[relay] libvirt",
    "handshake_timeout_s": "[relay] handshake_timeout_s",
    "drain_timeout_s": "[relay] drain_timeout_s",
    "session_idle_s": "[relay] session_idle_s",
    "data_path": "[relay] data_path",
    "liveness": "[relay] tcp_keepalive_*/tcp_ack_timeout_s",
    "rekey_after_bytes": "[tls] rekey_after_bytes",
    "limits": "[limits]",
    "tls": "[tls] paths",
    "peers": "[peers]",
    "source": "the config file's path",
}


def _restart_value(cfg: Config, key: str) -> object:
    # an unset [relay] control means <socket_dir>/control.sock: compare where it really is
    return cfg.control_path if key == "control" else getattr(cfg, key)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys, as the config names them, that differ between `old` and `new` and need a restart."""
    keys = []
    for f in dataclasses.fields(Config):
        if f.name in RELOADABLE:
            continue
        if _restart_value(old, f.name) != _restart_value(new, f.name):
            keys.append(RESTART_KEYS.get(f.name, f.name))
    return keys


def tls_digest(files: TlsFiles | None) -> bytes:
    """A digest of what the TLS files hold now, for the reload's log line ("TLS files changed").

    Every path field counts, so a file tlsconfig learns to load (a CRL) is covered when it
    is added to TlsFiles. Only for the message: the contexts are rebuilt on every reload.
    """
    h = hashlib.sha256()
    if files is None:
        return h.digest()
    for f in dataclasses.fields(files):
        value = getattr(files, f.name)
        if isinstance(value, Path):
            h.update(f.name.encode() + b"\0")
            try:
                h.update(read_tls_file(value))
            except OSError as e:  # loading the contexts reports it; here it only has to differ
                h.update(f"unreadable: {e}".encode())
    return h.digest()


@dataclass(frozen=True)
class Material:
    """A configuration and the TLS contexts built from its files, all loaded and checked."""

    config: Config
    server_tls: SSL.Context | None = None
    client_tls: SSL.Context | None = None
    tls_digest: bytes = b""
    identity: Identity | None = None  # our certificate, the CAs and CRLs, as loaded


def load_material(cfg: Config) -> Material:
    """The TLS contexts `cfg` needs, from its files as they are now; PkiError names what to fix.

    Blocking (reads files): at start, before anything serves, and in a thread on reload.
    """
    tls = cfg.tls
    if not cfg.needs_tls() or tls is None:
        return Material(cfg, tls_digest=tls_digest(None))
    digest = tls_digest(tls)
    identity = load_identity(tls)
    if cfg.name not in identity.names:
        log.warning(
            "[tls] cert %s names %s, not this relay (%s): peers will refuse it",
            tls.cert,
            ", ".join(sorted(identity.names)),
            cfg.name,
        )
    if identity.revoked:
        log.warning("[tls] cert %s is revoked by [tls] crl %s: peers with it refuse us", tls.cert, tls.crl)
    return Material(cfg, server_context(tls), client_context(tls), digest, identity)


def prepare(current: Config) -> Material:
    """Read `current`'s config file again and everything it names; ReloadFailed says what is wrong."""
    path = current.source
    if path is None:
        raise ReloadFailed("this relay was not started from a config file: nothing to re-read")
    try:
        new = config.load(path)
    except LocalError as e:
        raise ReloadFailed(_one_line(e)) from None
    keys = restart_needed(current, new)
    if keys:
        raise ReloadFailed(f"changing {' and '.join(keys)} needs a restart (systemctl restart migrelay)")
    try:
        return load_material(new)
    except LocalError as e:
        raise ReloadFailed(_one_line(e)) from None


def older_crls(
    loaded: Sequence[x509.CertificateRevocationList], new: Sequence[x509.CertificateRevocationList]
) -> str | None:
    """Why `new` would roll back a CRL in force (None if it does not), issuer by issuer.

    A CRL only grows: each reissue carries every earlier revocation and a higher CRL number
    (`migrelay pki revoke` and `pki crl` do so). An older file put back in its place, by
    mistake or by whoever can write it, would let a revoked host in again; to lift a
    revocation, issue a new CRL without it.
    """
    in_force = {crl.issuer: crl for crl in loaded}
    for crl in new:
        old = in_force.get(crl.issuer)
        if old is None:
            continue
        issuer = printable(crl.issuer.rfc4514_string())
        old_number, new_number = _crl_number(old), _crl_number(crl)
        if old_number is not None and new_number is not None:
            if new_number < old_number:
                return f"[tls] crl from {issuer} is number {new_number}, older than number {old_number} in force"
        elif crl.last_update_utc < old.last_update_utc:
            return f"[tls] crl from {issuer} was issued before the one in force"
    return None


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _peers(label: str, names: list[str]) -> list[str]:
    if not names:
        return []
    return [f"{len(names)} peer{'s' if len(names) > 1 else ''} {label} ({', '.join(names)})"]


def describe(old: Material, new: Material, closed_sessions: int = 0) -> str:
    """What a reload changed, for its one log line: "1 peer added (hvC), 1 peer removed (hvD), TLS files changed"."""
    before, after = old.config.peers, new.config.peers
    parts = _peers("added", sorted(after.keys() - before.keys()))
    parts += _peers("removed", sorted(before.keys() - after.keys()))
    parts += _peers("changed", sorted(n for n in before.keys() & after.keys() if before[n] != after[n]))
    if closed_sessions:
        parts.append(f"{closed_sessions} session{'s' if closed_sessions > 1 else ''} of removed peers closed")
    settings = [
        label
        for key, label in RELOADABLE.items()
        if key not in _OWN_LINES and getattr(old.config, key) != getattr(new.config, key)
    ]
    if settings:
        parts.append(f"{', '.join(settings)} changed")
    parts = parts or ["config unchanged"]
    if new.server_tls is not None or new.client_tls is not None:
        # re-read either way: the contexts, and their ticket keys, are new after every reload
        parts.append("TLS files changed" if old.tls_digest != new.tls_digest else "TLS files unchanged")
    return ", ".join(parts)


# Said in describe()'s own words, or not at all (where the file lives is the operator's business)
_OWN_LINES: Final = ("peers", "source")
