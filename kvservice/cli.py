"""The `kvservice` command: serve, status, snapshot, wal check|repair, config show."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from connectrpc.errors import ConnectError
from google.protobuf import json_format

from kvservice import __version__, logs
from kvservice.checker import check_nodes
from kvservice.config import ConfigError, Settings, load, shown_value, sources
from kvservice.errors import StorageError
from kvservice.peers import peer_access
from kvservice.remote import Remote, add_remote_flags, remote_transport
from kvservice.replication.state import ReplicationState, new_id, save_state
from kvservice.security import check_settings
from kvservice.server import CannotServe, serve
from kvservice.storage import repair
from kvservice.storage.backup import restore as restore_backup
from kvservice.storage.files import DataDirLocked, lock_data_dir
from kvservice.storage.recovery import recover
from kvservice.storage.snapshot import load_snapshot
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import (
    BackupRequest,
    BackupResponse,
    FailoverRequest,
    PromoteRequest,
    ReplicaOfRequest,
    ReplicationStatusRequest,
    SnapshotRequest,
)

# Named exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # bad flags, env or config file: nothing was started
EXIT_STORAGE = 3  # on-disk state refused: corruption, missing WAL, data dir in use

log = logging.getLogger("kvservice.cli")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, generated from the Settings fields so they never drift."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(field.annotation) or None
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=field.description)  # fmt: skip
        else:
            parser.add_argument(
                flag, dest=name, default=None,
                help=f"{field.description} (default: {field.default})",
                choices=choices if choices and all(isinstance(c, str) for c in choices) else None,
            )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvservice", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvservice {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a node")
    _add_setting_flags(serve)

    wal = commands.add_parser("wal", help="inspect or repair the write-ahead log")
    wal_commands = wal.add_subparsers(dest="wal_command", required=True)
    check = wal_commands.add_parser("check", help="verify snapshots and WAL; exit 3 on damage")
    repair = wal_commands.add_parser(
        "repair", help="cut the WAL at the last good record, keeping .broken copies"
    )
    for sub in (check, repair):
        sub.add_argument("--data-dir", dest="data_dir", default=None, help="data directory")
        sub.add_argument("--config", default=None, help="YAML config file")

    # Commands that call a running node's Admin service.
    for name, help_text in (
        ("snapshot", "ask a running node to write a snapshot now (Admin/Snapshot)"),
        ("status", "print a node's role and replication links as JSON (Admin/ReplicationStatus)"),
    ):
        remote = commands.add_parser(name, help=help_text)
        remote.add_argument("--url", default=None, help="node URL (default: from host and port)")
        remote.add_argument("--config", default=None, help="YAML config file")
        remote.add_argument("--host", default=None, help="node host, when --url is not given")
        remote.add_argument("--port", default=None, help="node port, when --url is not given")
        add_remote_flags(remote)

    promote = commands.add_parser(
        "promote", help="turn a replica into a primary: new history, epoch + 1 (Admin/Promote)"
    )
    promote.add_argument("--url", required=True, help="the replica to promote")
    replicaof = commands.add_parser(
        "replicaof", help="make a node follow a primary, no restart (Admin/ReplicaOf)"
    )
    replicaof.add_argument("--url", required=True, help="the node to repoint")
    replicaof.add_argument("--primary", required=True, help="base URL of the primary to follow")
    backup = commands.add_parser(
        "backup", help="stream a consistent snapshot of a live node to a file (Admin/Backup)"
    )
    backup.add_argument("--url", required=True, help="the node to back up (primary or replica)")
    backup.add_argument("--out", required=True, type=Path, help="the backup file to write")
    restore = commands.add_parser("restore", help="create a data dir from a backup file")
    restore.add_argument("--in", dest="backup_in", required=True, type=Path, help="backup file")
    restore.add_argument("--data-dir", dest="data_dir", required=True, help="data dir to create")
    restore.add_argument(
        "--force", action="store_true",
        help="restore into a non-empty data dir (its contents are moved to pre-restore-*/)",
    )  # fmt: skip
    check = commands.add_parser(
        "check", help="compare a replica's state with its primary's: exit 0 equal, 1 different"
        " (the differing keys are printed), 2 usage or unreachable",
    )  # fmt: skip
    check.add_argument("--primary", required=True, help="the primary's URL")
    check.add_argument("--replica", required=True, help="the replica's URL")
    failover = commands.add_parser(
        "failover", help="planned switchover: primary P hands over to replica R, no write lost"
    )
    failover.add_argument("--url", required=True, help="the current primary")
    failover.add_argument("--to", required=True, help="the replica to promote")
    replicaof.add_argument(
        "--force", action="store_true",
        help="accept that primary even if its epoch is lower (after deciding its data wins)",
    )  # fmt: skip
    for remote in (promote, replicaof, backup, check, failover):
        add_remote_flags(remote)

    config = commands.add_parser("config", help="settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print effective settings and their sources")
    _add_setting_flags(show)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in Settings.model_fields}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = _flags(args)
    try:
        settings = load(flags)
    except ConfigError as exc:
        print(f"kvservice: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        for name, origin in sources(settings, flags).items():
            print(f"{name} = {shown_value(name, getattr(settings, name))}  ({origin})")
        return EXIT_OK
    if args.command in REMOTE_COMMANDS:
        return _remote(args, settings)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "restore":
        return _restore(args.backup_in, settings.data_dir, force=args.force)
    if args.command == "wal":
        return (repair.check if args.wal_command == "check" else repair.repair)(settings.data_dir)
    return _serve(settings)


def _serve(settings: Settings) -> int:
    try:
        check_settings(settings)  # protected mode; credential and certificate files load
        peer_access(settings)  # the token and TLS material this node calls its peers with
    except ConfigError as exc:
        log.critical("cannot start", extra={"error": str(exc)})
        print(f"kvservice: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info("starting", extra={"version": __version__, **_summary(settings)})
    try:
        lock = lock_data_dir(settings.data_dir)
    except (DataDirLocked, OSError) as exc:
        log.critical("cannot start", extra={"error": str(exc)})
        return EXIT_STORAGE
    try:
        recovery = recover(settings.data_dir)
    except StorageError as exc:
        log.critical(
            "cannot start: the data on disk is damaged",
            extra={"error": str(exc), "help": "see docs/runbook.md; `kvservice wal check`"},
        )
        return EXIT_STORAGE
    except OSError as exc:
        log.critical("cannot start: the data directory is unusable", extra={"error": str(exc)})
        return EXIT_STORAGE
    log.info(
        "recovered",
        extra={
            "revision": recovery.store.revision,
            "keys": len(recovery.store),
            "snapshot_revision": recovery.snapshot_revision,
            "records_replayed": recovery.records_replayed,
            "torn_tail_truncated": recovery.torn_tail is not None,
            "seconds": round(recovery.seconds, 3),
        },
    )
    try:
        serve(settings, recovery)
    except CannotServe as exc:
        log.critical("cannot start", extra={"error": str(exc)})
        return EXIT_ERROR
    finally:
        lock.close()
    return EXIT_OK


REMOTE_COMMANDS = ("promote", "replicaof", "failover", "snapshot", "status", "backup", "check")


def _remote(args: argparse.Namespace, settings: Settings) -> int:
    """Commands that call a running node's Admin service (token and TLS: remote.py)."""
    try:
        remote = remote_transport(settings, args.token_file)
    except ConfigError as exc:
        print(f"kvservice: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        return check_nodes(args.primary, args.replica, remote)
    if args.command in ("snapshot", "status"):
        scheme = "https" if settings.tls_cert_file or settings.tls_ca_file else "http"
        args.url = args.url or f"{scheme}://{settings.host}:{settings.port}"
    handler = {"snapshot": _snapshot, "status": _status, "backup": _backup}.get(
        args.command, _role_change
    )
    return handler(args, remote)


def _snapshot(args: argparse.Namespace, remote: Remote) -> int:
    with AdminClientSync(args.url, timeout_ms=600_000, http_client=remote.http_client) as admin:
        try:
            reply = admin.snapshot(SnapshotRequest(), headers=remote.headers)
        except ConnectError as exc:
            print(f"kvservice: snapshot failed: {exc.code.value}: {exc.message}", file=sys.stderr)
            return EXIT_ERROR
    print(f"snapshot at revision {reply.revision}: {reply.path} ({reply.key_count} keys)")
    return EXIT_OK


def _role_change(args: argparse.Namespace, remote: Remote) -> int:
    with AdminClientSync(args.url, timeout_ms=60_000, http_client=remote.http_client) as admin:
        try:
            if args.command == "promote":
                reply: Any = admin.promote(PromoteRequest(), headers=remote.headers)
            elif args.command == "failover":
                reply = admin.failover(FailoverRequest(to=args.to), headers=remote.headers)
            else:
                request = ReplicaOfRequest(primary_url=args.primary, force=args.force)
                reply = admin.replica_of(request, headers=remote.headers)
        except ConnectError as exc:
            print(f"kvservice: {args.command} failed: {exc.code.value}: {exc.message}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_ERROR
    print(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True))
    return EXIT_OK


def _backup(args: argparse.Namespace, remote: Remote) -> int:
    """Write the stream to OUT.tmp, check its SHA-256 and every record, then rename."""
    out: Path = args.out
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    last = BackupResponse()
    try:
        with (
            AdminClientSync(
                args.url, timeout_ms=3_600_000, http_client=remote.http_client
            ) as admin,
            open(tmp, "wb") as f,
        ):
            for chunk in admin.backup(BackupRequest(), headers=remote.headers):
                f.write(chunk.data)
                digest.update(chunk.data)
                last = chunk
            f.flush()
            os.fsync(f.fileno())
        if not last.sha256 or last.sha256 != digest.hexdigest():
            raise StorageError(f"the stream's SHA-256 does not match ({last.sha256 or 'none'})")
        load_snapshot(tmp, check_name=False)
        os.replace(tmp, out)
    except (ConnectError, StorageError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        print(f"kvservice: backup failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps({"out": str(out), "revision": last.revision, "sha256": last.sha256,
                      "bytes": last.size}))  # fmt: skip
    return EXIT_OK


def _restore(backup: Path, data_dir: Path, *, force: bool) -> int:
    try:
        lock = lock_data_dir(data_dir)
    except (DataDirLocked, OSError) as exc:
        print(f"kvservice: restore refused: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    try:
        loaded, header = restore_backup(backup, data_dir, force=force)
        # The backup's history is this node's previous one: it continues it.
        save_state(
            data_dir,
            ReplicationState(
                node_id=new_id(), epoch=header.epoch,
                prev_replication_id=header.replication_id, prev_end_revision=loaded.revision,
            ),
        )  # fmt: skip
    except (StorageError, OSError) as exc:
        print(f"kvservice: restore failed: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        lock.close()
    print(json.dumps({"data_dir": str(data_dir), "revision": loaded.revision,
                      "keys": len(loaded.data), "replication_id": header.replication_id,
                      "epoch": header.epoch}))  # fmt: skip
    return EXIT_OK


def _status(args: argparse.Namespace, remote: Remote) -> int:
    with AdminClientSync(args.url, timeout_ms=10_000, http_client=remote.http_client) as admin:
        try:
            reply = admin.replication_status(ReplicationStatusRequest(), headers=remote.headers)
        except ConnectError as exc:
            print(f"kvservice: status failed: {exc.code.value}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
    print(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True))
    return EXIT_OK


def _summary(settings: Settings) -> dict[str, Any]:
    return {
        name: shown_value(name, value) if not isinstance(value, Path) else str(value)
        for name, value in settings.model_dump().items()
    }


if __name__ == "__main__":
    sys.exit(main())
