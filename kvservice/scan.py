"""Scan: one page of the keys with a prefix, in byte order, read at one revision.

A page is read in one synchronous step (no await), so every item on it is as
of `ScanResponse.revision`; pages of one walk may come from different
revisions, as with etcd's paginated range reads. A page ends at `limit`
keys, or before its bytes would pass `max_bytes` (but holds at least one
key, so a walk always advances); `next_start_after` is the page's last key
when more keys match, and empty on the last page. Keys whose expiry has passed
are skipped (the index lists them until the primary commits their DELETE), so
a page may look at more keys than it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kvservice.engine import Item, Store
from kvservice.errors import InvalidArgument
from kvservice.v1.kv_pb2 import ScanRequest, ScanResponse

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
# Bytes counted per item beyond its key and value: the revision and the framing,
# so a keys-only page of tiny keys is bounded too.
ITEM_OVERHEAD_BYTES: Final = 16


@dataclass(frozen=True)
class ScanLimits:
    max_bytes: int  # setting scan_max_bytes
    max_key_bytes: int  # setting max_key_bytes: bounds prefix and start_after too


def read_page(store: Store, request: ScanRequest, limits: ScanLimits) -> ScanResponse:
    """One page of `request` from `store` as it is now (raises InvalidArgument)."""
    limit = page_limit(request.limit)
    _check_bound("prefix", request.prefix, limits.max_key_bytes)
    _check_bound("start_after", request.start_after, limits.max_key_bytes)
    page = ScanResponse(revision=store.revision)
    items = page.items
    used = 0
    last_key = ""
    for key in store.key_index.keys_from(request.prefix, request.start_after):
        item = _read_item(store, key)
        if item is None:
            continue  # expired, awaiting its DELETE: hidden as from Get
        value = item.value
        if request.keys_only:
            value = b""
        size = len(key.encode()) + len(value) + ITEM_OVERHEAD_BYTES
        if len(items) == limit or (items and used + size > limits.max_bytes):
            page.next_start_after = last_key  # a key is left over: not the last page
            break
        # add() builds the item in place; append(KeyValue(...)) would build it twice.
        items.add(key=key, value=value, revision=item.revision, expires_at_ms=item.expires_at_ms)
        used += size
        last_key = key
    return page


def _read_item(store: Store, key: str) -> Item | None:
    """The one read of the store per listed key: value (decompressed), revision and
    expiry, or None when the key's expiry has passed (the index still lists it until
    the primary's expiry cycle commits its DELETE)."""
    return store.item(key)


def page_limit(requested: int) -> int:
    """Keys per page: 0 means the default; more than MAX_LIMIT is refused, not cut."""
    if requested == 0:
        return DEFAULT_LIMIT
    if requested > MAX_LIMIT:
        raise InvalidArgument(f"limit is {requested}; a Scan page holds at most {MAX_LIMIT} keys")
    return requested


def _check_bound(name: str, text: str, max_bytes: int) -> None:
    # A str of n characters is at most 4n UTF-8 bytes: encode only when it matters.
    if len(text) * 4 > max_bytes and len(text.encode()) > max_bytes:
        raise InvalidArgument(
            f"{name} is {len(text.encode())} bytes; the limit is {max_bytes}"
            " (setting max_key_bytes)"
        )
