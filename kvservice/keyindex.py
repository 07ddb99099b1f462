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

That sort must not hold the event loop (seconds at ten million keys, during
which the node would answer nothing), and CPython's sort never lets go of it,
not even in a thread. So the service builds the index in steps (`ready()`): a
sample of the keys gives splitters, each step files BUILD_STEP_KEYS keys into
the ranges between them, then each range is sorted in a step of its own, and
the ranges, in order, are the sorted keys. Keys created or removed meanwhile
are logged and applied at the end. Scans wait for the build; everything else
runs between its steps.
"""

from __future__ import annotations

import asyncio
import random
from bisect import bisect_right
from collections.abc import Collection, Iterator
from itertools import takewhile

from sortedcontainers import SortedList

# Keys filed or sorted per event-loop step of a build: ~10-20 ms of work here.
BUILD_STEP_KEYS = 20_000
# Sampled keys per range of a build: enough that ranges come out near even.
SAMPLE_PER_RANGE = 32


class KeyIndex:
    """The keys of one store, sorted; the store calls add/discard/rebuild as keys change.

    `source` must be the live collection of the store's keys (its dict): until
    the index is built, add and discard do nothing because the source already
    reflects them, and the build sorts the source as it is then.
    """

    def __init__(self, source: Collection[str], *, step_keys: int = BUILD_STEP_KEYS) -> None:
        self._source = source
        self._sorted: SortedList[str] | None = None
        self._step_keys = step_keys
        self._building: asyncio.Future[None] | None = None
        # While a stepped build runs: keys created (True) or removed (False) since it
        # copied the source, applied in order when it ends.
        self._changes: list[tuple[bool, str]] | None = None

    def __len__(self) -> int:
        return len(self._source if self._sorted is None else self._sorted)

    @property
    def built(self) -> bool:
        return self._sorted is not None

    def add(self, key: str) -> None:
        """A key was created (the caller knows it was absent)."""
        if self._sorted is not None:
            self._sorted.add(key)
        elif self._changes is not None:
            self._changes.append((True, key))

    def discard(self, key: str) -> None:
        """A key was removed (or never existed: then nothing changes)."""
        if self._sorted is not None:
            self._sorted.discard(key)
        elif self._changes is not None:
            self._changes.append((False, key))

    def rebuild(self, source: Collection[str]) -> None:
        """The store took over another collection (a snapshot was loaded or installed)."""
        self._stop_building()
        self._source = source
        self._sorted = None  # sorted again on the next Scan, not now

    async def ready(self) -> None:
        """Build the index unless it is built, in steps (see the module's docstring).
        Concurrent callers share one build; one that gives up does not stop it."""
        while self._sorted is None:
            if self._building is None or self._building.done():
                self._building = asyncio.ensure_future(self._build_in_steps())
            building = self._building
            try:
                await asyncio.shield(building)
            except asyncio.CancelledError:
                if not building.cancelled():
                    raise  # the caller was cancelled
                # (the build was stopped: the store took over other keys; build those)

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
            self._stop_building()  # (a caller that did not await ready(): tests, tools)
            # One sort of every key: linear when they come sorted, O(n log n) otherwise.
            self._sorted = SortedList(self._source)
        return self._sorted

    def _stop_building(self) -> None:
        if self._building is not None:
            self._building.cancel()
            self._building = None
        self._changes = None

    async def _build_in_steps(self) -> None:
        source = self._source
        keys = list(source)  # (one C-level copy; from here on changes are logged)
        changes: list[tuple[bool, str]] = []
        self._changes = changes
        load: int = SortedList.DEFAULT_LOAD_FACTOR
        runs = await _sorted_runs_in_steps(keys, self._step_keys, load)
        if self._source is not source or self._changes is not changes:
            return  # replaced or built meanwhile
        index = _sorted_list_of_runs(runs)
        for added, key in changes:
            if added:
                index.add(key)
            else:
                index.discard(key)
        self._changes = None
        self._sorted = index


async def _sorted_runs_in_steps(keys: list[str], step: int, run: int) -> list[list[str]]:
    """`keys` (distinct) sorted, as consecutive runs of at most `run` keys, yielding to
    the event loop between steps of about `step` keys: a sample sort, whose ranges
    need no merging."""
    ranges = max(1, -(-len(keys) // step))
    sample = sorted(random.sample(keys, min(len(keys), ranges * SAMPLE_PER_RANGE)))
    splitters = sorted({sample[len(sample) * i // ranges] for i in range(1, ranges)})
    filed: list[list[str]] = [[] for _ in range(len(splitters) + 1)]
    for start in range(0, len(keys), step):
        for key in keys[start : start + step]:
            filed[bisect_right(splitters, key)].append(key)
        await asyncio.sleep(0)
    runs: list[list[str]] = []
    for part in filed:
        part.sort()
        runs.extend(part[pos : pos + run] for pos in range(0, len(part), run))
        await asyncio.sleep(0)
    return runs


def _sorted_list_of_runs(runs: list[list[str]]) -> SortedList[str]:
    """A SortedList made of consecutive sorted runs (none empty, none longer than its
    load factor), without sorting again: at ten million keys even the linear pass of
    a sort over sorted input holds the loop for a third of a second. These are
    sortedcontainers' internals, set as SortedList._update sets them (pinned by
    pyproject's <3; tests/test_keyindex.py checks the result against SortedList)."""
    index: SortedList[str] = SortedList()
    index._lists = runs  # type: ignore[attr-defined]
    index._maxes = [part[-1] for part in runs]  # type: ignore[attr-defined]
    index._len = sum(map(len, runs))  # type: ignore[attr-defined]
    return index
