"""`kvservice wal check` and `kvservice wal repair` on data dirs written by a
real node and then damaged on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvservice.storage import record
from kvservice.storage.segments import list_segments, list_snapshots
from kvservice.v1.kv_pb2 import SetRequest
from tests.faults import disk
from tests.faults.workload import assert_holds, populate
from tests.integration.conftest import ServerProcess, run_cli

pytestmark = pytest.mark.integration

MakeServer = Callable[..., ServerProcess]
EXIT_STORAGE = 3


def written_dir(
    make_server: MakeServer, data_dir: Path, count: int, *flags: str
) -> dict[str, tuple[bytes, int]]:
    """Let a real node write `count` keys into `data_dir` and stop it cleanly."""
    server = make_server(*flags, data_dir=data_dir).start()
    written = populate(server, count)
    assert server.stop(timeout=20) == 0, server.log()
    return written


def wal(command: str, data_dir: Path) -> tuple[int, str]:
    result = run_cli("wal", command, "--data-dir", str(data_dir))
    return result.returncode, result.stdout + result.stderr


def test_wal_check_on_a_clean_data_dir_exits_0(make_server: MakeServer, tmp_path: Path) -> None:
    """`wal check` on a cleanly stopped node's data dir (segments and snapshots) exits 0."""
    data_dir = tmp_path / "data"
    flags = ("--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "4096")
    written_dir(make_server, data_dir, 200, *flags)
    assert list_snapshots(data_dir / "snap"), "no snapshot was taken"
    code, out = wal("check", data_dir)
    assert code == 0, out
    assert "clean" in out
    assert "revision 200" in out


def test_wal_check_names_mid_log_corruption_and_changes_nothing(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """`wal check` exits non-zero naming the damaged file and byte offset, and writes nothing."""
    data_dir = tmp_path / "data"
    written_dir(make_server, data_dir, 30)
    seg = list_segments(data_dir / "wal")[-1]
    victim = disk.records(seg)[10]
    disk.flip_byte(seg, victim.offset + 1)  # inside the header
    damaged = seg.read_bytes()
    code, out = wal("check", data_dir)
    assert code != 0, out
    assert f"{seg}: corrupt record at byte offset {victim.offset}" in out, out
    assert seg.read_bytes() == damaged
    assert not list(seg.parent.glob("*.broken"))


def test_wal_check_reports_a_torn_tail_without_cutting_it(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """`wal check` reports a torn tail (which start-up would cut) and leaves the file alone."""
    data_dir = tmp_path / "data"
    written_dir(make_server, data_dir, 10)
    seg = list_segments(data_dir / "wal")[-1]
    good = seg.stat().st_size
    disk.append(seg, record.encode(b"never finished")[:9])
    code, out = wal("check", data_dir)
    assert code != 0, out
    assert f"torn     {seg}: torn record at byte offset {good}" in out, out
    assert seg.stat().st_size == good + 9


def test_wal_repair_keeps_broken_copy_cuts_at_last_good_record_and_node_starts(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """`wal repair` keeps a `.broken` copy, cuts at the last good record; the node then starts."""
    data_dir = tmp_path / "data"
    written = written_dir(make_server, data_dir, 30)
    seg = list_segments(data_dir / "wal")[-1]
    victim = disk.records(seg)[12]  # holds revision 13
    disk.flip_byte(seg, victim.offset + record.HEADER_SIZE + 4)
    damaged = seg.read_bytes()

    code, out = wal("repair", data_dir)
    assert code == 0, out
    broken = seg.with_name(seg.name + ".broken")
    assert broken.read_bytes() == damaged
    assert seg.read_bytes() == damaged[: victim.offset]
    assert f"cut      {seg} at byte {victim.offset}" in out, out
    assert "lost     revisions after 12 are no longer in the log" in out, out
    code, out = wal("check", data_dir)
    assert code == 0, out

    server = make_server(data_dir=data_dir).start()
    kept = {k: v for k, v in written.items() if v[1] < 13}
    lost = {k: None for k, v in written.items() if v[1] >= 13}
    assert len(kept) == 12
    assert_holds(server, {**kept, **lost})
    with server.client() as client:
        assert client.set(SetRequest(key="after-repair", value=b"x")).revision == 13
    assert server.stop(timeout=20) == 0


def test_wal_repair_moves_segments_after_the_cut_aside(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """Damage in an earlier segment: repair cuts there and renames every later segment `.broken`."""
    data_dir = tmp_path / "data"
    written = written_dir(make_server, data_dir, 150, "--wal-segment-bytes", "4096")
    segments = list_segments(data_dir / "wal")
    assert len(segments) >= 3, segments
    first = segments[0]
    victim = disk.records(first)[-5]
    disk.flip_byte(first, victim.offset + record.HEADER_SIZE)

    server = make_server(data_dir=data_dir).start(wait=False)
    assert server.wait_exit(20) == EXIT_STORAGE, server.log()
    code, out = wal("repair", data_dir)
    assert code == 0, out
    assert list_segments(data_dir / "wal") == [first]
    for later in segments[1:]:
        assert later.with_name(later.name + ".broken").exists(), out
    assert first.stat().st_size == victim.offset

    server = make_server(data_dir=data_dir).start()
    cut_revision = len(disk.records(first)) + 1
    assert_holds(server, {k: (v if v[1] < cut_revision else None) for k, v in written.items()})
    assert server.stop(timeout=20) == 0


def test_wal_check_reports_a_damaged_snapshot(make_server: MakeServer, tmp_path: Path) -> None:
    """`wal check` names a damaged snapshot and exits non-zero, though start-up can fall back."""
    data_dir = tmp_path / "data"
    flags = ("--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "4096")
    written_dir(make_server, data_dir, 300, *flags)
    snaps = list_snapshots(data_dir / "snap")
    assert len(snaps) == 2, snaps
    newest = snaps[0][1]
    disk.flip_byte(newest, newest.stat().st_size // 2)
    code, out = wal("check", data_dir)
    assert code != 0, out
    assert f"damaged  {newest}: corrupt record at byte offset" in out, out
    assert "state    revision 300" in out, out  # the older snapshot and the WAL still cover it


def test_wal_repair_refuses_while_the_node_runs(make_server: MakeServer, tmp_path: Path) -> None:
    """`wal repair` refuses to touch a data dir that a running node holds, and says so."""
    server = make_server(data_dir=tmp_path / "data").start()
    populate(server, 3)
    code, out = wal("repair", server.data_dir)
    assert code == EXIT_STORAGE, out
    assert "stop the node first" in out
    assert server.stop(timeout=20) == 0


@pytest.mark.parametrize("command", ["check", "repair"])
def test_wal_tools_refuse_a_missing_data_dir(tmp_path: Path, command: str) -> None:
    """A typo in --data-dir is refused (exit 2), never reported clean or created."""
    missing = tmp_path / "no-such-dir"
    code, out = wal(command, missing)
    assert code == 2, out
    assert "is not a directory" in out
    assert not missing.exists()
