"""`migrelay migrate`: one command instead of three hand-composed URIs.

The only module that imports libvirt (lazily, so the relay itself never needs it).
Flow: open a session on the local relay (fresh overlay sockets for this migration),
call migrateToURI3 on the local libvirt (PEER2PEER|LIVE with the session's URIs) in a
worker thread, show progress from the job stats meanwhile, print a summary, and close
the session whatever happens. Ctrl-C aborts the migration job; the guest keeps running
on the source.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from relay.core.errors import Interrupted, LocalError, MigrationFailed
from relay.tools.control_client import request

POLL_INTERVAL_S: Final = 0.5
MIB: Final = 1 << 20


@dataclass(frozen=True)
class MigrateOptions:
    copy_storage_all: bool = False
    copy_storage_inc: bool = False
    migrate_disks: tuple[str, ...] = ()
    parallel: int | None = None
    postcopy: bool = False
    persistent: bool = False
    undefinesource: bool = False
    offline: bool = False
    bandwidth_mib_s: int | None = None
    tls: bool = False
    # the name QEMU checks the destination's certificate against; default: the peer's name
    tls_destination: str | None = None


SESSION_SETTLE_S: Final = 5.0  # after the job, for the session's last streams to close


@dataclass
class Summary:
    seconds: float
    bytes: int  # what crossed the relay for this migration, both directions, all channels
    downtime_ms: int | None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def __str__(self) -> str:
        downtime = f"{self.downtime_ms} ms" if self.downtime_ms is not None else "n/a"
        return (
            f"migrated in {self.seconds:.1f} s: {self.bytes / MIB:.1f} MiB through the relay at "
            f"{self.mb_per_s:.1f} MB/s, downtime {downtime}"
        )


_QEMU_LOG_STAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z\s+")


def one_line(message: str) -> str:
    """libvirt quotes QEMU's stderr, one timestamped line per error: drop the timestamps and
    the repeats, and join what is left into one line."""
    lines: list[str] = []
    for raw in message.splitlines():
        line = _QEMU_LOG_STAMP.sub("", raw.strip())
        if line and not any(seen.endswith(line) for seen in lines):
            lines.append(line)
    return "; ".join(lines)


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LocalError("migrelay migrate needs libvirt-python: pip install 'migrelay[libvirt]'") from None
    # errors arrive as exceptions and are reported once; libvirt's default handler would print them too
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def flags_and_params(lv: Any, options: MigrateOptions, session: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """migrateToURI3 flags and typed parameters for these options and this session."""
    if options.offline and (options.copy_storage_all or options.copy_storage_inc or options.postcopy):
        raise LocalError("--offline moves only the definition: it cannot copy storage or use postcopy")
    if options.copy_storage_all and options.copy_storage_inc:
        raise LocalError("choose one of --copy-storage-all and --copy-storage-inc")
    flags = lv.VIR_MIGRATE_PEER2PEER
    params: dict[str, Any] = {}
    if options.offline:
        # an offline migration must leave a definition behind, or nothing would be migrated
        flags |= lv.VIR_MIGRATE_OFFLINE | lv.VIR_MIGRATE_PERSIST_DEST
    else:
        flags |= lv.VIR_MIGRATE_LIVE
        params[lv.VIR_MIGRATE_PARAM_URI] = session["migrateuri"]
    if options.copy_storage_all or options.copy_storage_inc:
        flags |= lv.VIR_MIGRATE_NON_SHARED_DISK if options.copy_storage_all else lv.VIR_MIGRATE_NON_SHARED_INC
        params[lv.VIR_MIGRATE_PARAM_DISKS_URI] = session["disks_uri"]
    if options.migrate_disks:
        params[lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(options.migrate_disks)
    if options.parallel is not None:
        flags |= lv.VIR_MIGRATE_PARALLEL
        params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = options.parallel
    if options.postcopy:
        flags |= lv.VIR_MIGRATE_POSTCOPY
    if options.persistent:
        flags |= lv.VIR_MIGRATE_PERSIST_DEST
    if options.undefinesource:
        flags |= lv.VIR_MIGRATE_UNDEFINE_SOURCE
    if options.bandwidth_mib_s is not None:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mib_s
    if options.tls:
        flags |= lv.VIR_MIGRATE_TLS
        # A unix migration URI carries no host name, and QEMU needs one to verify the
        # destination's certificate: the peer relay's name is the destination host's.
        params[lv.VIR_MIGRATE_PARAM_TLS_DESTINATION] = options.tls_destination or session["peer"]
    elif options.tls_destination is not None:
        raise LocalError("--tls-destination needs --tls")
    return flags, params


class _Progress:
    """A tqdm bar over the job's data; silent when stderr is not a terminal."""

    def __init__(self, out: TextIO) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=out,
            disable=not out.isatty(),
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
        )
        self.last: dict[str, Any] = {}

    def update(self, stats: dict[str, Any]) -> None:
        if "data_total" not in stats:  # no job (yet), or it just ended
            return
        self.last = stats
        processed = int(stats.get("data_processed", 0))
        remaining = int(stats.get("data_remaining", 0))
        self.bar.total = max(processed + remaining, 1)
        self.bar.n = processed
        dirty = stats.get("memory_dirty_rate")  # pages/s
        page = stats.get("memory_page_size", 4096)
        self.bar.set_description_str("migrating", refresh=False)
        self.bar.set_postfix_str(
            f"remaining {remaining / MIB:.0f} MiB" + (f", dirtying {dirty * page / MIB:.1f} MiB/s" if dirty else ""),
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def migrate(
    domain: str,
    peer: str,
    control_path: Path,
    options: MigrateOptions,
    *,
    local_uri: str = "qemu:///system",
    out: TextIO = sys.stderr,
    on_session: Callable[[dict[str, Any]], None] | None = None,
) -> Summary:
    """Migrate `domain` to `peer` through a fresh relay session; raise on failure or Ctrl-C."""
    lv = _libvirt()
    session = request(control_path, "open", peer=peer)
    try:
        if on_session is not None:
            on_session(session)
        flags, params = flags_and_params(lv, options, session)
        try:
            conn = lv.open(local_uri)
            dom = conn.lookupByName(domain)
        except lv.libvirtError as e:
            raise LocalError(f"{local_uri}: {e.get_error_message()}") from None
        summary = _run(lv, conn, dom, options, session["desturi"], flags, params, out)
        summary.bytes = _session_bytes(control_path, session["id"])
        return summary
    finally:
        request(control_path, "close", id=session["id"])


def _session_bytes(control_path: Path, session_id: str) -> int:
    """Bytes the relay carried for this session, once its streams (QEMU's, NBD's) have closed."""
    deadline = time.monotonic() + SESSION_SETTLE_S
    while True:
        mine = [s for s in request(control_path, "list") if s["id"] == session_id]
        if not mine or mine[0]["active_streams"] == 0 or time.monotonic() > deadline:
            return int(mine[0]["bytes"]) if mine else 0
        time.sleep(0.1)


def _run(
    lv: Any,
    conn: Any,
    dom: Any,
    options: MigrateOptions,
    desturi: str,
    flags: int,
    params: dict[str, Any],
    out: TextIO,
) -> Summary:
    outcome: dict[str, BaseException | None] = {}

    def worker() -> None:
        try:
            dom.migrateToURI3(desturi, params, flags)
            outcome["error"] = None
        except BaseException as e:  # handed to the main thread, which decides
            outcome["error"] = e

    progress = _Progress(out)
    started = time.monotonic()
    thread = threading.Thread(target=worker, name="migrateToURI3", daemon=True)
    thread.start()
    switched = False
    try:
        while thread.is_alive():
            thread.join(POLL_INTERVAL_S)
            try:
                stats = dom.jobStats()
            except lv.libvirtError:
                continue  # the job is finishing; the worker reports how
            progress.update(stats)
            # --postcopy: switch once the first full pass over RAM is done
            if options.postcopy and not switched and stats.get("memory_iteration", 0) >= 1:
                try:
                    dom.migrateStartPostCopy()
                    switched = True
                except lv.libvirtError:
                    pass  # not yet in a state that allows it; the next poll retries
    except KeyboardInterrupt:
        try:
            dom.abortJob()
        except lv.libvirtError as e:
            print(f"migrelay migrate: abort failed: {e.get_error_message()}", file=out)
        thread.join()
        raise Interrupted("interrupted: migration aborted, the guest keeps running on the source") from None
    finally:
        progress.close()
    error = outcome.get("error")
    if error is not None:
        message = error.get_error_message() if isinstance(error, lv.libvirtError) else str(error)
        raise MigrationFailed(f"migration failed: {one_line(message)}")
    seconds = time.monotonic() - started
    downtime = _completed_stats(lv, dom, desturi).get("downtime")
    return Summary(seconds, 0, int(downtime) if downtime is not None else None)


def _completed_stats(lv: Any, dom: Any, desturi: str) -> dict[str, Any]:
    """The completed job's statistics as the destination recorded them (asked through the relay).

    libvirt deletes a completed job's statistics once they are read, unless asked to keep
    them: the operator's `virsh domjobinfo --completed` on the destination must still show
    the migration afterwards, as it does after `virsh migrate`.
    """
    flags = lv.VIR_DOMAIN_JOB_STATS_COMPLETED | lv.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    try:
        dest = lv.open(desturi)
        try:
            stats: dict[str, Any] = dest.lookupByName(dom.name()).jobStats(flags)
        finally:
            dest.close()
    except lv.libvirtError:
        return {}
    return stats
