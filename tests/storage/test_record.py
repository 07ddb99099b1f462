"""Record codec: round trips, and torn tails told apart from corruption."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.errors import CorruptRecord, TornRecord
from kvservice.storage import record

payloads = st.lists(st.binary(max_size=300), min_size=1, max_size=8)


def frame(items: list[bytes]) -> bytes:
    return b"".join(record.encode(p) for p in items)


@given(payloads)
def test_round_trip(items: list[bytes]) -> None:
    """Every framed payload comes back unchanged, at the offset it was written."""
    buf = frame(items)
    decoded = list(record.scan(buf))
    assert [p for _, p in decoded] == items
    offsets = [0]
    for p in items[:-1]:
        offsets.append(offsets[-1] + record.HEADER_SIZE + len(p))
    assert [o for o, _ in decoded] == offsets


@settings(max_examples=60)
@given(payloads, st.data())
def test_every_truncation_of_the_last_record_is_torn(
    items: list[bytes], data: st.DataObject
) -> None:
    """Cutting the last record anywhere inside it is a torn tail at that record's offset."""
    buf = frame(items)
    last_start = len(buf) - record.HEADER_SIZE - len(items[-1])
    cut = data.draw(st.integers(min_value=last_start + 1, max_value=len(buf) - 1))
    with pytest.raises(TornRecord) as info:
        list(record.scan(buf[:cut]))
    assert info.value.offset == last_start


def test_every_truncation_point_exhaustively() -> None:
    """All cut points of a small last record, header and payload alike, are torn."""
    buf = frame([b"first", b"the last record"])
    last_start = record.HEADER_SIZE + 5
    for cut in range(last_start + 1, len(buf)):
        with pytest.raises(TornRecord):
            list(record.scan(buf[:cut]))
    assert len(list(record.scan(buf[:last_start]))) == 1


@settings(max_examples=200)
@given(payloads.filter(lambda items: len(items) >= 2), st.data())
def test_a_flipped_bit_before_the_last_record_is_corruption(
    items: list[bytes], data: st.DataObject
) -> None:
    """Damage followed by valid data is corruption, reported at the damaged record."""
    buf = bytearray(frame(items))
    last_start = len(buf) - record.HEADER_SIZE - len(items[-1])
    position = data.draw(st.integers(min_value=0, max_value=last_start - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    buf[position] ^= 1 << bit
    with pytest.raises(CorruptRecord) as info:
        list(record.scan(bytes(buf), "seg.wal"))
    assert info.value.offset <= position
    assert "seg.wal" in str(info.value)
    assert f"byte offset {info.value.offset}" in str(info.value)


@given(payloads)
def test_a_flipped_bit_in_the_last_payload_is_torn(items: list[bytes]) -> None:
    """A bad checksum on the very last record counts as a torn write."""
    if not items[-1]:
        return
    buf = bytearray(frame(items))
    buf[-1] ^= 0x01
    with pytest.raises(TornRecord):
        list(record.scan(bytes(buf)))


@given(payloads, st.integers(min_value=1, max_value=4096))
def test_zero_filled_tail_is_torn(items: list[bytes], zeros: int) -> None:
    """Zeros after the last record (a file extended before its data landed) are a torn tail."""
    buf = frame(items)
    with pytest.raises(TornRecord) as info:
        list(record.scan(buf + b"\0" * zeros))
    assert info.value.offset == len(buf)


def test_empty_buffer_has_no_records() -> None:
    assert list(record.scan(b"")) == []


@given(payloads, st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_decoder_agrees_with_scan_however_the_bytes_arrive(
    items: list[bytes], splits: list[int]
) -> None:
    """Fed in arbitrary pieces, the incremental decoder yields exactly what scan() does."""
    buf = frame(items)
    decoder = record.Decoder()
    got: list[tuple[int, bytes]] = []
    pos = 0
    for size in [*splits, len(buf)]:
        got += decoder.feed(buf[pos : pos + size])
        pos += size
    decoder.close()
    assert got == list(record.scan(buf))


@given(payloads, st.data())
def test_decoder_reports_a_stream_cut_inside_a_record(
    items: list[bytes], data: st.DataObject
) -> None:
    buf = frame(items)
    cut = data.draw(st.integers(min_value=1, max_value=len(buf) - 1))
    decoder = record.Decoder("snap")
    decoder.feed(buf[:cut])
    ends = {0}
    for p in items:
        ends.add(max(ends) + record.HEADER_SIZE + len(p))
    if cut in ends:
        decoder.close()  # a clean boundary
    else:
        with pytest.raises(TornRecord):
            decoder.close()


@given(payloads, st.data())
def test_decoder_treats_any_flipped_bit_as_corruption(
    items: list[bytes], data: st.DataObject
) -> None:
    buf = bytearray(frame(items))
    position = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
    buf[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    with pytest.raises((CorruptRecord, TornRecord)) as info:
        decode_all(bytes(buf))
    assert info.value.offset <= position


def decode_all(buf: bytes) -> list[tuple[int, bytes]]:
    decoder = record.Decoder("snap")
    records = decoder.feed(buf)
    decoder.close()
    return records
