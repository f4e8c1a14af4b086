"""Argument parsing and exit codes; no logic lives here.

Exit status: 0 success, 1 a check or transfer failed, 2 bad input (one line on stderr).
Each command imports what it needs when it runs, so `--help` and `pki` start without
trio or OpenSSL.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay import __version__
from relay.core import config
from relay.core.errors import InternalError, Interrupted, LocalError, RemoteError
from relay.tools import pki  # cryptography only: no trio, no OpenSSL

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_CONTROL = Path(config.DEFAULT_SOCKET_DIR) / config.CONTROL_SOCKET_NAME


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4G, 512M)") from None


def _interval(text: str) -> float:
    from relay.tools.status import MIN_WATCH_INTERVAL_S

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds >= MIN_WATCH_INTERVAL_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"the refresh interval is at least {MIN_WATCH_INTERVAL_S}s, not {text}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="migrelay", description="Daemon libvirt/QEMU live migrations over one mutual-TLS port."
    )
    p.add_argument("--version", action="version", version=f"migrelay {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the relay daemon")
    s.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    s.add_argument("--no-splice", action="store_true", help="copy through a buffer even on plaintext legs")

    c = sub.add_parser("check", help="validate config and certificates, try every peer")
    c.add_argument("--config", "-c", type=Path, required=True)
    c.add_argument("--print", action="store_true", help="print the effective configuration")

    k = sub.add_parser("pki", help="make a CA, host certificates and the CA's CRL")
    ksub = k.add_subparsers(dest="pki_command", required=True)
    ki = ksub.add_parser("init", help="create DIR/ca.pem and DIR/ca-key.pem")
    ki.add_argument("dir", type=Path)
    ki.add_argument("--days", type=int, default=pki.CA_DAYS)
    kc = ksub.add_parser("issue", help="create DIR/NAME.pem and DIR/NAME-key.pem signed by DIR's CA")
    kc.add_argument("dir", type=Path)
    kc.add_argument("name")
    kc.add_argument("--dns", action="append", default=[], help="extra DNS name (repeatable)")
    kc.add_argument("--ip", action="append", default=[], help="extra IP address (repeatable)")
    kc.add_argument("--days", type=int, default=pki.HOST_DAYS)
    kr = ksub.add_parser("revoke", help="revoke DIR/NAME.pem: add it to DIR/crl.pem, signed by DIR's CA")
    kr.add_argument("dir", type=Path)
    kr.add_argument("name")
    crl_days = f"days until the CRL's next update (default {pki.CRL_DAYS})"
    kr.add_argument("--days", type=int, default=pki.CRL_DAYS, help=crl_days)
    kl = ksub.add_parser("crl", help="reissue DIR/crl.pem with a fresh next update (creates an empty one)")
    kl.add_argument("dir", type=Path)
    kl.add_argument("--days", type=int, default=pki.CRL_DAYS, help=crl_days)

    def control_options(parser: argparse.ArgumentParser) -> None:
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--control", type=Path, help=f"control socket (default {DEFAULT_CONTROL})")
        where.add_argument("--config", "-c", type=Path, help="take the control socket from this config")

    se = sub.add_parser("session", help="per-migration overlay sockets (for concurrent migrations)")
    sesub = se.add_subparsers(dest="session_command", required=True)
    so = sesub.add_parser("open", help="new <self>_<id>-migration.sock and -nbd.sock for PEER; prints the URIs as JSON")
    so.add_argument("peer")
    control_options(so)
    sc = sesub.add_parser("close", help="remove a session's sockets (running streams continue)")
    sc.add_argument("id")
    control_options(sc)
    control_options(sesub.add_parser("list", help="open sessions, as JSON"))

    st = sub.add_parser("status", help="peers, streams in flight and sessions of the running relay")
    st.add_argument("--json", action="store_true", help="as JSON (with --watch: one line per refresh)")
    st.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_interval,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    control_options(st)

    r = sub.add_parser(
        "reload", help="make the running relay re-read its config and certificates (as SIGHUP); says how it went"
    )
    control_options(r)

    m = sub.add_parser("migrate", help="live-migrate a libvirt domain to PEER through a fresh relay session")
    m.add_argument("domain")
    m.add_argument("peer")
    m.add_argument("--connect", default="qemu:///system", help="local libvirt URI (default qemu:///system)")
    m.add_argument("--copy-storage-all", action="store_true", help="copy all non-shared disks (NBD)")
    m.add_argument("--copy-storage-inc", action="store_true", help="copy disks incrementally (shared backing)")
    m.add_argument("--migrate-disks", default="", help="comma-separated target devs to copy (e.g. vda,vdb)")
    m.add_argument("--parallel", type=int, metavar="N", help="multifd with N connections")
    m.add_argument("--postcopy", action="store_true", help="switch to postcopy after the first pass over RAM")
    m.add_argument("--persistent", action="store_true", help="define the domain on the destination")
    m.add_argument("--undefinesource", action="store_true", help="undefine it on the source afterwards")
    m.add_argument("--offline", action="store_true", help="move only the definition of a stopped domain")
    m.add_argument("--bandwidth", type=int, metavar="MiB/s", help="cap the migration bandwidth")
    m.add_argument("--tls", action="store_true", help="QEMU's own TLS inside the relay's (needs QEMU TLS setup)")
    m.add_argument(
        "--tls-destination", metavar="NAME", help="name on the destination's QEMU certificate (default: PEER)"
    )
    control_options(m)

    b = sub.add_parser("bench", help="throughput, CPU, latency and memory against socat, stunnel and HAProxy")
    b.add_argument("--setups", default="", help="comma-separated (default: all)")
    b.add_argument("--streams", default="1,4,16", help="concurrent stream counts (default 1,4,16)")
    b.add_argument("--size", type=_size, default=_size("1G"), help="bytes per throughput run (default 1G)")
    b.add_argument(
        "--reps",
        type=int,
        default=3,
        help="interleaved repetitions of the stream and latency runs (default 3; 0: none)",
    )
    b.add_argument("--rtt-count", type=int, default=2000, help="1 KiB round trips per latency run")
    b.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNG")
    b.add_argument("--migration-reps", type=int, default=2, help="real 1 GiB QEMU migrations per setup (0: skip)")
    b.add_argument(
        "--postcopy-reps",
        type=int,
        default=5,
        help="real postcopy migrations of a 256 MiB guest reading all its RAM, per setup (default 5; 0: skip)",
    )
    b.add_argument(
        "--flood-reps", type=int, help="a stream beside 2000 slow connections, and without (default: --reps; 0: skip)"
    )

    d = sub.add_parser("demo", help="two relays on loopback, fresh certificates, a stream through them")
    d.add_argument("--size", type=_size, default=_size("4G"), help="bytes to send (default 4G)")
    d.add_argument("--transport", choices=["tls", "tcp", "unix"], default="tls")
    return p


def _serve(args: argparse.Namespace) -> int:
    from relay.daemon.server import Daemon, run_daemon

    run_daemon(Daemon(config.load(args.config), allow_splice=not args.no_splice))
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from relay.tools.check import check

    cfg = config.load(args.config)
    if args.print:
        print(cfg.as_toml(), end="")
    findings = check(cfg)
    for finding in findings:
        print(finding)
    return EXIT_FAILED if any(f.level == "error" for f in findings) else EXIT_OK


def _pki(args: argparse.Namespace) -> int:
    if args.pki_command == "init":
        path = pki.init_ca(args.dir, days=args.days)
        print(f"wrote {path} and {args.dir / 'ca-key.pem'} (0600)")
    elif args.pki_command == "issue":
        cert, key = pki.issue(args.dir, args.name, dns=args.dns, ips=args.ip, days=args.days)
        print(f"wrote {cert} and {key} (0600)")
    else:
        if args.pki_command == "revoke":
            written = pki.revoke(args.dir, args.name, days=args.days)
            what = "revoked" if written.newly_revoked else "was already revoked"
            print(f"{args.name} {what}", end="; ")
        else:
            written = pki.reissue_crl(args.dir, days=args.days)
        print(
            f"wrote {written.path}: {written.revoked} revoked, next update {written.next_update:%Y-%m-%d}; "
            "copy it to every relay's [tls] crl and reload them"
        )
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from relay.tools.demo import demo

    return EXIT_OK if demo(args.size, sys.stdout, args.transport).ok else EXIT_FAILED


def _control_path(args: argparse.Namespace) -> Path:
    if args.control is not None:
        return Path(args.control)
    if args.config is not None:
        return config.load(args.config).control_path
    return DEFAULT_CONTROL


def _session(args: argparse.Namespace) -> int:
    from relay.tools.control_client import request

    path = _control_path(args)
    if args.session_command == "open":
        result = request(path, "open", peer=args.peer)
    elif args.session_command == "close":
        result = request(path, "close", id=args.id)
    else:
        result = request(path, "list")
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from relay.tools.control_client import request
    from relay.tools.status import render, watch, with_rates

    path = _control_path(args)

    def fetch() -> dict[str, Any]:
        result: dict[str, Any] = request(path, "status")
        return result

    if args.watch is not None:
        watch(fetch, args.watch, sys.stdout, as_json=args.json)  # until Ctrl-C: exit status 130
    snapshot = with_rates(fetch(), None)
    print(json.dumps(snapshot, indent=2) if args.json else render(snapshot))
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    from relay.tools.control_client import request

    result = request(_control_path(args), "reload")
    print(f"reloaded: {result['reloaded']}")
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from relay.tools.migrate import MigrateOptions, migrate

    options = MigrateOptions(
        copy_storage_all=args.copy_storage_all,
        copy_storage_inc=args.copy_storage_inc,
        migrate_disks=tuple(d for d in args.migrate_disks.split(",") if d),
        parallel=args.parallel,
        postcopy=args.postcopy,
        persistent=args.persistent,
        undefinesource=args.undefinesource,
        offline=args.offline,
        bandwidth_mib_s=args.bandwidth,
        tls=args.tls,
        tls_destination=args.tls_destination,
    )

    def announce(session: dict[str, str]) -> None:
        print(f"session {session['id']}: {session.get('migrateuri', '')}", file=sys.stderr)

    summary = migrate(args.domain, args.peer, _control_path(args), options, local_uri=args.connect, on_session=announce)
    print(f"{args.domain} -> {args.peer}: {summary}")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from relay.tools.bench import run

    setups = [n for n in args.setups.split(",") if n]
    streams = [int(n) for n in args.streams.split(",")]
    run.main(
        setups,
        streams,
        args.size,
        args.reps,
        args.rtt_count,
        args.migration_reps,
        args.flood_reps,
        args.out,
        postcopy_reps=args.postcopy_reps,
    )
    return EXIT_OK


COMMANDS = {
    "serve": _serve,
    "check": _check,
    "pki": _pki,
    "session": _session,
    "status": _status,
    "reload": _reload,
    "migrate": _migrate,
    "bench": _bench,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="migrelay %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return COMMANDS[args.command](args)
    except LocalError as e:
        print(f"migrelay {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"migrelay {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RemoteError, InternalError) as e:
        print(f"migrelay {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
