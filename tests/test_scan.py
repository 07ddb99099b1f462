"""Scan pages read from a Store: order, prefix, cursor, count and byte bounds, bad input."""

from __future__ import annotations

import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.engine import Store
from kvservice.errors import InvalidArgument
from kvservice.scan import DEFAULT_LIMIT, ITEM_OVERHEAD_BYTES, MAX_LIMIT, ScanLimits, read_page
from kvservice.v1.kv_pb2 import ScanRequest, ScanResponse
from kvservice.v1.log_pb2 import LogEntry

LIMITS = ScanLimits(max_bytes=1 << 20, max_key_bytes=1024)


def store_with(items: dict[str, bytes]) -> Store:
    store = Store()
    for key, value in items.items():
        store.apply(store.next_set(key, value))
    return store


def walk(store: Store, request: ScanRequest, limits: ScanLimits = LIMITS) -> list[ScanResponse]:
    """Every page of a scan, following next_start_after to the end."""
    pages = [read_page(store, request, limits)]
    while pages[-1].next_start_after:
        request.start_after = pages[-1].next_start_after
        pages.append(read_page(store, request, limits))
        assert len(pages) < 10_000
    return pages


def keys_of(pages: list[ScanResponse]) -> list[str]:
    return [item.key for page in pages for item in page.items]


def test_a_page_lists_a_prefix_in_order_with_values_and_revisions() -> None:
    store = store_with({"room:2": b"b", "room:1": b"a", "user:1": b"u", "room:10": b"c"})
    page = read_page(store, ScanRequest(prefix="room:"), LIMITS)
    assert [(i.key, i.value, i.revision) for i in page.items] == [
        ("room:1", b"a", 2), ("room:10", b"c", 4), ("room:2", b"b", 1),
    ]  # fmt: skip
    assert page.revision == 4
    assert page.next_start_after == ""  # the last page says so


def test_an_empty_prefix_lists_every_key() -> None:
    store = store_with({"b": b"", "a": b"", "c": b""})
    assert keys_of([read_page(store, ScanRequest(), LIMITS)]) == ["a", "b", "c"]


def test_pages_follow_the_cursor_and_the_last_page_has_none() -> None:
    store = store_with({f"k:{i:03d}": b"v" for i in range(25)})
    pages = walk(store, ScanRequest(prefix="k:", limit=10))
    assert [len(p.items) for p in pages] == [10, 10, 5]
    assert pages[0].next_start_after == "k:009"
    assert keys_of(pages) == [f"k:{i:03d}" for i in range(25)]


def test_an_exact_multiple_of_the_limit_ends_without_an_empty_page() -> None:
    store = store_with({f"k:{i}": b"v" for i in range(10)})
    pages = walk(store, ScanRequest(limit=5))
    assert [len(p.items) for p in pages] == [5, 5]


def test_limit_zero_means_the_default_and_over_the_maximum_is_refused() -> None:
    store = store_with({f"k:{i:04d}": b"" for i in range(DEFAULT_LIMIT + 5)})
    assert len(read_page(store, ScanRequest(), LIMITS).items) == DEFAULT_LIMIT
    assert len(read_page(store, ScanRequest(limit=MAX_LIMIT), LIMITS).items) == DEFAULT_LIMIT + 5
    with pytest.raises(InvalidArgument, match="limit is 1001; a Scan page holds at most 1000"):
        read_page(store, ScanRequest(limit=MAX_LIMIT + 1), LIMITS)


def test_pages_are_bounded_by_bytes_but_hold_at_least_one_key() -> None:
    store = store_with({"a": b"x" * 100, "b": b"x" * 100, "c": b"x" * 5000, "d": b"x" * 10})
    limits = ScanLimits(max_bytes=2 * (1 + 100 + ITEM_OVERHEAD_BYTES), max_key_bytes=1024)
    pages = walk(store, ScanRequest(), limits)
    # a+b fill the budget exactly; c alone is over it but a page holds at least one key.
    assert [[i.key for i in p.items] for p in pages] == [["a", "b"], ["c"], ["d"]]


def test_keys_only_leaves_values_out_and_out_of_the_byte_count() -> None:
    store = store_with({"a": b"x" * 1000, "b": b"x" * 1000})
    limits = ScanLimits(max_bytes=1500, max_key_bytes=1024)
    page = read_page(store, ScanRequest(keys_only=True), limits)
    assert [(i.key, i.value, i.revision) for i in page.items] == [("a", b"", 1), ("b", b"", 2)]
    assert page.next_start_after == ""


def test_start_after_before_the_prefix_starts_at_the_prefix_and_after_it_is_empty() -> None:
    store = store_with({"a:1": b"", "b:1": b"", "b:2": b"", "c:1": b""})
    assert keys_of([read_page(store, ScanRequest(prefix="b:", start_after="a"), LIMITS)]) == [
        "b:1", "b:2",
    ]  # fmt: skip
    assert keys_of([read_page(store, ScanRequest(prefix="b:", start_after="c"), LIMITS)]) == []


def test_non_ascii_keys_come_in_utf8_byte_order() -> None:
    # U+00E9 (2 bytes), U+043A (2), U+4E2D (3), U+1F600 (4): byte order is code point order,
    # and all sort after ASCII "z". A UTF-16 order would put U+1F600 before U+4E2D.
    keys = ["room:😀", "room:中", "room:z", "room:é", "room:к", "room:A"]
    store = store_with(dict.fromkeys(keys, b""))
    pages = walk(store, ScanRequest(prefix="room:", limit=2))
    assert keys_of(pages) == sorted(keys, key=str.encode)
    assert keys_of(pages) == ["room:A", "room:z", "room:é", "room:к", "room:中", "room:😀"]


def test_deleted_keys_are_gone_and_new_ones_appear() -> None:
    store = store_with({"k:1": b"", "k:2": b"", "k:3": b""})
    store.apply(store.next_delete("k:2"))
    store.apply(store.next_set("k:0", b"new"))
    assert keys_of([read_page(store, ScanRequest(prefix="k:"), LIMITS)]) == ["k:0", "k:1", "k:3"]


def test_expired_keys_are_hidden_and_live_ones_carry_their_expiry() -> None:
    """As Get: a key whose expiry has passed is not listed, even before its DELETE."""
    now = [1_000_000]
    store = Store(clock=lambda: now[0])
    for key, expires in (("t:a", 0), ("t:b", 1_000_500), ("t:c", 1_002_000)):
        entry = store.next_set(key, b"v")
        entry.expires_at_ms = expires
        store.apply(entry)
    page = read_page(store, ScanRequest(prefix="t:"), LIMITS)
    assert [(i.key, i.expires_at_ms) for i in page.items] == [
        ("t:a", 0), ("t:b", 1_000_500), ("t:c", 1_002_000),
    ]  # fmt: skip
    now[0] = 1_001_000
    walked = walk(store, ScanRequest(prefix="t:", limit=1))
    assert keys_of(walked) == ["t:a", "t:c"]


def test_compressed_values_come_back_as_written() -> None:
    store = Store()
    entry = store.next_set("z:1", zstd.ZstdCompressor().compress(b"chat " * 100))
    entry.value_encoding = LogEntry.VALUE_ENCODING_ZSTD
    store.apply(entry)
    [item] = read_page(store, ScanRequest(prefix="z:"), LIMITS).items
    assert item.value == b"chat " * 100


def test_an_oversized_prefix_or_start_after_is_invalid() -> None:
    store = store_with({"a": b""})
    limits = ScanLimits(max_bytes=1 << 20, max_key_bytes=8)
    with pytest.raises(InvalidArgument, match="prefix is 9 bytes; the limit is 8"):
        read_page(store, ScanRequest(prefix="x" * 9), limits)
    with pytest.raises(InvalidArgument, match="start_after is 10 bytes"):
        read_page(store, ScanRequest(start_after="é" * 5), limits)


@settings(max_examples=100)
@given(
    items=st.dictionaries(
        st.text(st.sampled_from("ab:é中😀"), min_size=1, max_size=4), st.binary(max_size=40)
    ),
    prefix=st.text(st.sampled_from("ab:é"), max_size=2),
    limit=st.integers(1, 7),
    max_bytes=st.integers(1, 200),
)
def test_a_walk_lists_each_matching_key_once_in_order(
    items: dict[str, bytes], prefix: str, limit: int, max_bytes: int
) -> None:
    """Whatever the bounds, following the cursor yields exactly the matching keys."""
    store = store_with(items)
    limits = ScanLimits(max_bytes=max_bytes, max_key_bytes=1024)
    pages = walk(store, ScanRequest(prefix=prefix, limit=limit), limits)
    expected = sorted((k for k in items if k.startswith(prefix)), key=str.encode)
    assert keys_of(pages) == expected
    assert all(len(p.items) <= limit for p in pages)
    assert all(p.items for p in pages[:-1])
    assert [i.value for p in pages for i in p.items] == [items[k] for k in expected]
