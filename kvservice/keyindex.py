"""The store's keys in sorted order, so a prefix scan reads a page without a full pass.

Order: Python compares `str` by code point, and UTF-8 encodes code points so
that byte order equals code point order; iterating the sorted `str` keys is
therefore iterating them in byte order of their UTF-8 encoding, as DESIGN.md
asks (keys are valid UTF-8, never lone surrogates: protobuf rejects those).

Structure, chosen by measurement (bench/results/scan.md): a
`sortedcontainers.SortedList` of the very `str` objects the store's dict
holds (a pointer a key in lists of about a thousand), built on the first
Scan and maintained from then on. An insert or removal is a bisect plus a
short list move (a few microseconds at a million keys), and only a write
that creates or removes a key touches it; an overwrite does not. Until the
first Scan the index costs nothing: recovery, the snapshot writer process
and a replica's snapshot install do not sort the keys, and nodes that are
never asked to Scan never pay for it. The price is that first Scan, which
sorts every key once (about 0.2 s per million keys when they come sorted,
0.7 s when shuffled, measured here).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from itertools import takewhile

from sortedcontainers import SortedList


class KeyIndex:
    """The keys of one store, sorted; the store calls add/discard/rebuild as keys change.

    `source` must be the live collection of the store's keys (its dict): until
    the index is built, add and discard do nothing because the source already
    reflects them, and the build sorts the source as it is then.
    """

    def __init__(self, source: Collection[str]) -> None:
        self._source = source
        self._sorted: SortedList[str] | None = None

    def __len__(self) -> int:
        return len(self._source if self._sorted is None else self._sorted)

    @property
    def built(self) -> bool:
        return self._sorted is not None

    def add(self, key: str) -> None:
        """A key was created (the caller knows it was absent)."""
        if self._sorted is not None:
            self._sorted.add(key)

    def discard(self, key: str) -> None:
        """A key was removed (or never existed: then nothing changes)."""
        if self._sorted is not None:
            self._sorted.discard(key)

    def rebuild(self, source: Collection[str]) -> None:
        """The store took over another collection (a snapshot was loaded or installed)."""
        self._source = source
        self._sorted = None  # sorted again on the next Scan, not now

    def keys_from(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys starting with `prefix` and greater than `start_after`, in order.

        The keys with one prefix are one contiguous run of the sorted order, so
        the walk starts at the first candidate and stops at the first key past
        the run. Lazy: the caller takes only what one page needs.
        """
        keys = self._build()
        if start_after >= prefix:
            candidates = keys.irange(start_after, inclusive=(False, False))
        else:
            candidates = keys.irange(prefix, inclusive=(True, False))
        return takewhile(lambda key: key.startswith(prefix), candidates)

    def _build(self) -> SortedList[str]:
        if self._sorted is None:
            # One sort of every key: linear when they come sorted, O(n log n) otherwise.
            self._sorted = SortedList(self._source)
        return self._sorted
