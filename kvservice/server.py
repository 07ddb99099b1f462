"""Running a node under uvicorn, with kvservice's shutdown rules."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from kvservice.app import create_app
from kvservice.config import Settings
from kvservice.engine import Store
from kvservice.feed import CommitFeed
from kvservice.metrics import Metrics, NodeGauges, ReplicationGauges
from kvservice.node import ExpirySettings, Node
from kvservice.ops import Limits
from kvservice.peers import peer_access
from kvservice.replication.manager import ReplicationManager
from kvservice.replication.state import load_state
from kvservice.security import harden
from kvservice.snapshots import Snapshotter
from kvservice.storage.recovery import Recovery
from kvservice.storage.retention import Retention
from kvservice.storage.segments import data_dirs, list_segments
from kvservice.storage.wal import Wal
from kvservice.watch import WatchHub

log = logging.getLogger("kvservice.server")


class CannotServe(Exception):
    """The server could not start listening; uvicorn has logged why."""


class Server(uvicorn.Server):
    """uvicorn's server, but any second SIGTERM/SIGINT forces exit, and a signal
    that led to a clean shutdown is not re-raised (so the exit status is 0)."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_first_signal = on_first_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now", extra={"signal": signal.Signals(sig).name})
            self.force_exit = True
        else:
            log.info("shutting down", extra={"signal": signal.Signals(sig).name})
            self.on_first_signal()
            self.should_exit = True


# How long the event loop may hold the GIL while another thread waits for it.
# Python's default is 5 ms; the fsync thread needs the GIL back after every
# fdatasync, and at fsync=always every waiting write waits for that handoff,
# so a busy loop would add up to 5 ms to each group commit.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def build_node(settings: Settings, recovery: Recovery, metrics: Metrics) -> Node:
    """Assemble a node from its parts: the one place that wires WAL, commit feed,
    retention, snapshots and metrics together (nothing below imports metrics)."""
    assert recovery.active_segment is not None
    wal, feed, snapshotter = _storage(
        settings, recovery.store.revision, recovery.active_segment,
        _mtime(recovery.snapshot_path), metrics,
    )  # fmt: skip
    node = Node(
        recovery.store, wal, feed, snapshotter,
        Limits(
            settings.max_key_bytes, settings.max_value_bytes, settings.max_batch_ops,
            settings.compression_min_bytes if settings.compression == "zstd" else None,
        ),
        expiry=ExpirySettings(settings.expiry_cycle_ms, settings.expiry_keys_per_cycle),
    )  # fmt: skip
    metrics.observe_recovery(recovery)
    wal_dir, _ = data_dirs(settings.data_dir)
    # Read through `node`: a full resync replaces its store, WAL and snapshotter.
    metrics.watch(
        NodeGauges(
            keys=lambda: len(node.store),
            revision=lambda: node.store.revision,
            durable_revision=lambda: node.wal.durable_revision,
            wal_written_bytes=lambda: node.wal.stats.bytes_written,
            writes_accepted=lambda: 0 if node.write_failure else 1,
            wal_segments=lambda: len(list_segments(wal_dir)),
            wal_dir=wal_dir,
            last_snapshot_unix=lambda: node.snapshotter.last_snapshot_unix,
            expired_keys=lambda: node.expired_total,
        )
    )
    return node


def _storage(
    settings: Settings,
    revision: int,
    active_segment: Path,
    last_snapshot_unix: float | None,
    metrics: Metrics,
) -> tuple[Wal, CommitFeed, Snapshotter]:
    """The WAL, commit feed and snapshotter of a store at `revision`."""
    wal_dir, _ = data_dirs(settings.data_dir)
    feed = CommitFeed(revision)
    wal = Wal(
        wal_dir,
        policy=settings.fsync,
        segment_bytes=settings.wal_segment_bytes,
        active_segment=active_segment,
        last_revision=revision,
        on_fsync=metrics.observe_fsync,
        on_durable=feed.advance,
    )
    keep = settings.repl_backlog_bytes if settings.role == "primary" else 0
    retention = Retention(wal_dir, settings.wal_retention_max_bytes, keep_bytes=keep)
    snapshotter = Snapshotter(
        settings.data_dir,
        wal,
        retention,
        threshold_bytes=settings.snapshot_threshold_bytes,
        last_snapshot_unix=last_snapshot_unix,
        on_written=metrics.snapshot_seconds.observe,
        on_failed=metrics.snapshot_failures.inc,
    )
    return wal, feed, snapshotter


def build_replication(settings: Settings, node: Node, metrics: Metrics) -> ReplicationManager:
    """The node's replication role (state from `<data-dir>/replication.json`)."""

    def rebuild(store: Store) -> None:
        # After a full resync or a rewind installed a staged snapshot: the log goes on
        # in a new segment.
        active = list_segments(data_dirs(settings.data_dir)[0])[-1]
        wal, feed, snapshotter = _storage(settings, store.revision, active, time.time(), metrics)
        node.swap_storage(store, wal, feed, snapshotter)
        wal.start()
        manager.sync_node_role()  # the new retention keeps what the role needs

    state = load_state(settings.data_dir)
    manager = ReplicationManager(settings, state, node, rebuild, peer_access(settings))
    metrics.watch_replication(
        ReplicationGauges(
            role=lambda: manager.role,
            epoch=lambda: manager.state.epoch,
            applied_revision=lambda: node.store.revision,
            replica_lag_seconds=lambda: (
                view.lag_seconds if (view := manager.link_view()) is not None else None
            ),
            senders=lambda: [
                (
                    v.url,
                    v.connected,
                    v.lag_revisions,
                    v.lag_seconds,
                    v.full_resyncs,
                    v.partial_resyncs,
                    v.retries,
                )
                for v in manager.sender_views()
            ],
            digest_mismatches=lambda: manager.digest_mismatches,
            durable_lags=lambda: [(s.url, s.durable_lag) for s in manager.senders.values()],
        )
    )
    return manager


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# CPython's collector after recovery (bench/results/snapshot-gc.md, 1M keys loaded):
# under a Set load the default thresholds run ~98 young collections a second, 49 ms of
# CPU per second (about 8 % of the node), with gen-2 pauses up to 35 ms; 64 requests in
# flight keep at most ~8,000 young objects alive, so a gen-0 threshold of 50,000
# removes them all. Freezing what recovery left makes the rare full collection scan
# ~0 objects (0.003 ms instead of ~20 ms). The store's dict of str -> bytes is not
# tracked by the collector at all. Cost: up to 50,000 objects of cyclic garbage wait.
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(settings: Settings, recovery: Recovery) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    metrics = Metrics()
    node = build_node(settings, recovery, metrics)
    replication = build_replication(settings, node, metrics)
    tune_gc()
    app = create_app(node, settings, metrics, replication)
    watches: WatchHub = app.state.watches

    def on_first_signal() -> None:
        node.begin_drain()
        # uvicorn waits for open connections before the lifespan shutdown runs:
        # watch streams never end by themselves, so end them now.
        watches.drain_soon()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_seconds)),
    )
    # TLS, slow-client limits, SIGHUP reload (of the peer credentials too)
    harden(config, settings, lambda: replication.peers.reload(settings))
    try:
        Server(config, on_first_signal=on_first_signal).run()
    except SystemExit as exc:
        # uvicorn exits with its own code 3 when it cannot listen (port in use, no
        # permission); in kvservice 3 means the data dir was refused, so re-raise.
        raise CannotServe(f"cannot listen on {settings.host}:{settings.port}") from exc
    finally:
        # After a forced exit the lifespan shutdown never ran: still fsync and close.
        node.close_sync()
