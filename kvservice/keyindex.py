"""The store's keys in sorted order, so a prefix scan reads a page without a full pass.

Order: Python compares `str` by code point, and UTF-8 encodes code points so
that byte order equals code point order; iterating the sorted `str` keys is
therefore iterating them in byte order of their UTF-8 encoding, as DESIGN.md
asks (keys are valid UTF-8, never lone surrogates: protobuf rejects those).

Structure, chosen by measurement (bench/results/scan.md): a
`sortedcontainers.SortedList` of the very `str` objects the store's dict
holds, so each key costs a pointer in a list of about a thousand (about
9-14 bytes a key), an insert or removal is a bisect plus a short list move
(a few microseconds at a million keys), and only a write that creates or
removes a key touches it; an overwrite does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import takewhile

from sortedcontainers import SortedList


class KeyIndex:
    """The keys of one store, sorted; the store calls add/discard/rebuild as keys change."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys: SortedList[str] = SortedList(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        """A key was created (the caller knows it was absent)."""
        self._keys.add(key)

    def discard(self, key: str) -> None:
        """A key was removed (or never existed: then nothing changes)."""
        self._keys.discard(key)

    def rebuild(self, keys: Iterable[str]) -> None:
        """Replace the whole index (a snapshot was loaded or installed)."""
        # One sort of all the keys: linear when they come sorted, O(n log n) otherwise.
        self._keys = SortedList(keys)

    def keys_from(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys starting with `prefix` and greater than `start_after`, in order.

        The keys with one prefix are one contiguous run of the sorted order, so
        the walk starts at the first candidate and stops at the first key past
        the run. Lazy: the caller takes only what one page needs.
        """
        if start_after >= prefix:
            candidates = self._keys.irange(start_after, inclusive=(False, False))
        else:
            candidates = self._keys.irange(prefix, inclusive=(True, False))
        return takewhile(lambda key: key.startswith(prefix), candidates)
