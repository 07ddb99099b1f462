"""Durability under faults, against real `kvservice serve` processes: SIGKILL
mid-burst, torn and corrupt WAL files, snapshots, failing fsync, full disk."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.storage import record
from kvservice.storage.segments import list_segments, list_snapshots, segment_revision
from kvservice.v1.kv_pb2 import DeleteRequest, GetRequest, SetRequest
from tests.faults import disk
from tests.faults.logs import find
from tests.faults.shim import shim_env
from tests.faults.workload import (
    Burst,
    State,
    assert_holds,
    check_revisions,
    check_writer_order,
    populate,
    read_states,
    verify_recovered,
)
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

MakeServer = Callable[..., ServerProcess]
EXIT_STORAGE = 3


def stop_cleanly(server: ServerProcess) -> None:
    assert server.stop(timeout=20) == 0, server.log()


def last_segment(data_dir: Path) -> Path:
    return list_segments(data_dir / "wal")[-1]


# -- SIGKILL ------------------------------------------------------------------


SMALL = ("--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "16384")
KILL_SETTINGS = {
    "always-defaults": ("--fsync", "always"),
    # Segment rotation, background snapshots and segment purges all race the kill.
    "always-small-segments-and-snapshots": ("--fsync", "always", *SMALL),
    # A process kill (not a power loss) loses nothing acknowledged at any policy:
    # the OS keeps what was written; rotations run on the fsync thread here too.
    "everysec-small-segments-and-snapshots": ("--fsync", "everysec", *SMALL),
    "no-small-segments-and-snapshots": ("--fsync", "no", *SMALL),
}


@pytest.mark.parametrize("settings", sorted(KILL_SETTINGS))
def test_sigkill_during_concurrent_burst_loses_no_acknowledged_write(
    make_server: MakeServer, tmp_path: Path, settings: str
) -> None:
    """SIGKILL during a 16-client burst, 3 rounds on one data dir, loses no ack."""
    flags = KILL_SETTINGS[settings]
    data_dir = tmp_path / "data"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    writers = []
    recovered: dict[str, State] = {}
    for round_no in range(3):
        server = make_server(*flags, data_dir=data_dir).start()
        if recovered:  # everything seen after the previous crash is still there
            assert read_states(server.url, sorted(recovered)) == recovered, f"seed {seed}"
        burst = Burst(server.url, f"r{round_no}", seed=seed + round_no).start()
        burst.wait_for_acks(50)
        time.sleep(rng.uniform(0.05, 0.6))
        killed_at = time.monotonic()
        server.kill()
        burst.join()
        burst.assert_no_error_before(killed_at)
        assert not any(w.finished_all for w in burst.writers), "the kill came after the burst"
        writers += burst.writers

        server = make_server(*flags, data_dir=data_dir).start()
        recovered = verify_recovered(server.url, writers)
        acks = [op for w in writers for op in w.acked]
        check_revisions(acks)
        check_writer_order(writers)
        newest = max(op.revision or 0 for op in acks)
        ready = httpx.get(f"{server.url}/readyz", timeout=5).json()
        assert int(ready["revision"]) >= newest, (ready, newest)
        server.kill()


# -- torn tail ------------------------------------------------------------------


def _cut_in_header(seg: Path, last: disk.Record) -> None:
    disk.truncate(seg, last.offset + 5)


def _cut_in_payload(seg: Path, last: disk.Record) -> None:
    disk.truncate(seg, last.end - 3)


def _zero_fill(seg: Path, last: disk.Record) -> None:
    disk.append(seg, bytes(4096))


def _partial_next_record(seg: Path, last: disk.Record) -> None:
    whole = seg.read_bytes()[last.offset : last.end]
    disk.append(seg, whole[: len(whole) - 4])


def _garbage(seg: Path, last: disk.Record) -> None:
    disk.append(seg, random.Random(7).randbytes(37))


TORN = {
    # name: (damage, whether the last acknowledged record survives)
    "cut-inside-last-header": (_cut_in_header, False),
    "cut-inside-last-payload": (_cut_in_payload, False),
    "zero-filled-tail": (_zero_fill, True),
    "partial-next-record": (_partial_next_record, True),
    "garbage-after-last-record": (_garbage, True),
}


@pytest.mark.parametrize("damage", sorted(TORN))
def test_torn_tail_is_truncated_with_a_warning_and_earlier_data_kept(
    make_server: MakeServer, tmp_path: Path, damage: str
) -> None:
    """A torn last-segment tail is cut at the last good record and logged; the node starts."""
    data_dir = tmp_path / "data"
    server = make_server(data_dir=data_dir).start()
    written = populate(server, 40)
    stop_cleanly(server)
    seg = last_segment(data_dir)
    last = disk.records(seg)[-1]
    hurt, last_survives = TORN[damage]
    hurt(seg, last)

    server = make_server(data_dir=data_dir).start()
    good_end = last.end if last_survives else last.offset
    warnings = find(server.log(), "torn WAL tail truncated")
    assert len(warnings) == 1, server.log()
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["path"] == str(seg)
    assert warnings[0]["offset"] == good_end
    assert seg.stat().st_size == good_end
    expected: dict[str, Any] = dict(written)
    if not last_survives:
        expected[max(written, key=lambda k: written[k][1])] = None
    assert_holds(server, expected)
    # The node goes on from the last good revision.
    with server.client() as client:
        revision = client.set(SetRequest(key="after", value=b"x")).revision
    assert revision == max(r for v in expected.values() if v for r in [v[1]]) + 1
    stop_cleanly(server)


# -- mid-log corruption -----------------------------------------------------------


def test_mid_log_corruption_stops_start_up_naming_file_and_offset(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A flipped byte before the tail makes start-up exit 3, logging the file and byte offset."""
    data_dir = tmp_path / "data"
    server = make_server(data_dir=data_dir).start()
    populate(server, 30)
    stop_cleanly(server)
    seg = last_segment(data_dir)
    victim = disk.records(seg)[12]
    disk.flip_byte(seg, victim.offset + record.HEADER_SIZE + 2)  # inside the payload
    damaged = seg.read_bytes()

    server = make_server(data_dir=data_dir).start(wait=False)
    assert server.wait_exit(20) == EXIT_STORAGE, server.log()
    [refusal] = find(server.log(), "cannot start: the data on disk is damaged")
    assert refusal["level"] == "critical"
    assert str(seg) in refusal["error"]
    assert f"byte offset {victim.offset}" in refusal["error"], refusal
    # Nothing was cut: the damage is still there for an operator to inspect.
    assert seg.read_bytes() == damaged


# -- snapshots ----------------------------------------------------------------------

# repl_backlog_bytes at its minimum: otherwise a primary keeps 64 MiB of WAL behind its snapshots.
SNAPSHOT_FLAGS = (
    "--snapshot-threshold-bytes", "4096", "--wal-segment-bytes", "4096",
    "--repl-backlog-bytes", "4096",
)  # fmt: skip


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_snapshots_replace_old_segments_and_recover_everything(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """Snapshots appear under snap/, covered WAL segments go, and a restart recovers everything."""
    data_dir = tmp_path / "data"
    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    written = populate(server, 400)
    snap_dir, wal_dir = data_dir / "snap", data_dir / "wal"
    wait_for(lambda: len(list_snapshots(snap_dir)) >= 2, 10, "two snapshots")
    stop_cleanly(server)
    snaps = list_snapshots(snap_dir)
    assert 1 <= len(snaps) <= 2, snaps  # older ones are pruned
    segments = list_segments(wal_dir)
    assert segment_revision(segments[0]) > 1, "the first WAL segment was never removed"
    # What is left of the WAL reaches back to the oldest snapshot kept.
    assert segment_revision(segments[0]) <= snaps[-1][0] + 1

    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    [recovered] = find(server.log(), "recovered")
    assert recovered["snapshot_revision"] == snaps[0][0]
    assert recovered["revision"] == max(r for _, r in written.values())
    assert_holds(server, written)
    stop_cleanly(server)


def test_damaged_newest_snapshot_is_reported_and_not_loaded(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A damaged newest snapshot is logged and skipped; the older one and the WAL rebuild it."""
    data_dir = tmp_path / "data"
    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    written = populate(server, 400)
    snap_dir = data_dir / "snap"
    wait_for(lambda: len(list_snapshots(snap_dir)) >= 2, 10, "two snapshots")
    stop_cleanly(server)
    (newest_rev, newest), (older_rev, _) = list_snapshots(snap_dir)[:2]
    damaged_at = disk.records(newest)[1].offset + record.HEADER_SIZE + 3
    disk.flip_byte(newest, damaged_at)

    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    [skipped] = find(server.log(), "damaged snapshot skipped")
    assert skipped["level"] == "error"
    assert str(newest) in skipped["error"]
    [recovered] = find(server.log(), "recovered")
    assert recovered["snapshot_revision"] == older_rev < newest_rev
    assert recovered["revision"] == max(r for _, r in written.values())
    assert_holds(server, written)
    stop_cleanly(server)


def test_wal_lost_behind_a_snapshot_still_restarts_twice(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A snapshot ahead of the end of the WAL (lost at power off) keeps later restarts working."""
    data_dir = tmp_path / "data"
    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    written = populate(server, 300)
    wait_for(lambda: len(list_snapshots(data_dir / "snap")) >= 1, 10, "a snapshot")
    stop_cleanly(server)
    snap_rev = list_snapshots(data_dir / "snap")[0][0]
    # The page cache lost every WAL record from the segment holding the snapshot
    # revision on (the snapshot itself was fsynced): that segment is empty, later
    # ones are gone.
    for seg in reversed(list_segments(data_dir / "wal")):
        if segment_revision(seg) > snap_rev:
            seg.unlink()
        else:
            disk.truncate(seg, 0)
            break
    survivors = {k: v for k, v in written.items() if v[1] <= snap_rev}

    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    assert_holds(server, survivors)
    more = populate(server, 5, prefix="later")
    assert min(r for _, r in more.values()) == snap_rev + 1
    stop_cleanly(server)

    server = make_server(*SNAPSHOT_FLAGS, data_dir=data_dir).start()
    assert_holds(server, {**survivors, **more})
    stop_cleanly(server)


# -- failing fsync ---------------------------------------------------------------------


def test_failing_fsync_turns_writes_unavailable_and_keeps_acknowledged_data(
    make_server: MakeServer, tmp_path: Path, fault_shim: Path
) -> None:
    """After a failed fsync writes get `unavailable`, /readyz 503, reads work; no ack is lost."""
    data_dir = tmp_path / "data"
    trigger = tmp_path / "fail-fsync-now"
    env = shim_env(fault_shim, data_dir, fsync_trigger=trigger)
    server = make_server("--fsync", "always", data_dir=data_dir, env=env).start()
    written = populate(server, 50)
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200

    trigger.touch()
    with server.client() as client:
        with pytest.raises(ConnectError) as failed:
            client.set(SetRequest(key="doomed", value=b"x"))
        assert failed.value.code == Code.UNAVAILABLE
        assert "fsync" in failed.value.message
        assert "no longer accepts writes" in failed.value.message
        # Fail-stop: with the disk "healed" the node still refuses rather than retry the fsync.
        trigger.unlink()
        for request in (SetRequest(key="k0001", value=b"y"), SetRequest(key="new", value=b"y")):
            with pytest.raises(ConnectError) as refused:
                client.set(request)
            assert refused.value.code == Code.UNAVAILABLE
        with pytest.raises(ConnectError) as refused:
            client.delete(DeleteRequest(key="k0002"))
        assert refused.value.code == Code.UNAVAILABLE
        got = client.get(GetRequest(key="k0003"))
        assert (got.found, got.value, got.revision) == (True, *written["k0003"])
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.headers["content-type"].startswith("application/json")
    assert ready.json()["ready"] is False
    assert "fsync" in ready.json()["reason"]
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    [critical] = find(server.log(), "wal failed: node is now read-only")
    assert critical["level"] == "critical"
    server.stop(timeout=20)

    server = make_server("--fsync", "always", data_dir=data_dir).start()
    assert_holds(server, written)  # the refused overwrite and delete changed nothing
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    with server.client() as client:
        assert client.set(SetRequest(key="healed", value=b"z")).revision > 50
    stop_cleanly(server)


# -- full disk -------------------------------------------------------------------------


def _fill_until_refused(
    server: ServerProcess, limit: int = 2000
) -> tuple[dict[str, Any], ConnectError]:
    """Write 1 KiB values until the node refuses one; return the acknowledged ones and the error."""
    acked: dict[str, Any] = {}
    with server.client(proto_json=False) as client:
        for i in range(limit):
            key, value = f"fill{i:05d}", os.urandom(1024)
            try:
                acked[key] = (value, client.set(SetRequest(key=key, value=value)).revision)
            except ConnectError as exc:
                return acked, exc
    raise AssertionError(f"{limit} writes of 1 KiB were all accepted; the disk never filled")


def _check_full_disk_behaviour(
    server: ServerProcess, acked: dict[str, Any], refusal: ConnectError
) -> None:
    assert refusal.code == Code.UNAVAILABLE, refusal
    assert "disk refused a WAL write" in refusal.message, refusal.message
    assert "No space left on device" in refusal.message, refusal.message
    assert server.proc is not None
    assert server.proc.poll() is None, "the process died"
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "No space left" in ready.json()["reason"]
    with server.client() as client:
        with pytest.raises(ConnectError) as again:
            client.set(SetRequest(key="tiny", value=b"1"))
        assert again.value.code == Code.UNAVAILABLE
    assert_holds(server, acked)


def test_full_disk_tmpfs_makes_writes_unavailable_and_loses_nothing(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """On a full (tmpfs) disk writes get `unavailable`, reads go on, no ack is lost."""
    mount = tmp_path / "small-disk"
    with disk.tmpfs(mount, 256 * 1024) as failure:
        if failure is not None:
            pytest.skip(f"cannot mount a tmpfs here ({failure}); the shim variant covers ENOSPC")
        data_dir = mount / "data"
        server = make_server("--fsync", "always", data_dir=data_dir).start()
        try:
            acked, refusal = _fill_until_refused(server)
            assert len(acked) > 50
            _check_full_disk_behaviour(server, acked, refusal)
            server.stop(timeout=20)
            disk.resize_tmpfs(mount, 8 * 1024 * 1024)
            server = make_server("--fsync", "always", data_dir=data_dir).start()
            assert_holds(server, acked)
            with server.client() as client:
                client.set(SetRequest(key="room-again", value=os.urandom(1024)))
            stop_cleanly(server)
        finally:
            server.kill()


def test_full_disk_injected_enospc_mid_record_loses_nothing(
    make_server: MakeServer, tmp_path: Path, fault_shim: Path
) -> None:
    """ENOSPC after half a record (injected) leaves no partial record behind and loses no ack."""
    data_dir = tmp_path / "data"
    trigger = tmp_path / "disk-full-now"
    env = shim_env(fault_shim, data_dir, write_trigger=trigger)
    server = make_server("--fsync", "always", data_dir=data_dir, env=env).start()
    acked = populate(server, 30)
    trigger.touch()
    _, refusal = _fill_until_refused(server, limit=1)
    _check_full_disk_behaviour(server, acked, refusal)
    server.stop(timeout=20)
    # The half-written record was cut off: the segment ends on a record boundary.
    seg = last_segment(data_dir)
    assert disk.records(seg)[-1].end == seg.stat().st_size
    trigger.unlink()
    server = make_server("--fsync", "always", data_dir=data_dir).start()
    assert find(server.log(), "torn WAL tail truncated") == []
    assert_holds(server, acked)
    stop_cleanly(server)
