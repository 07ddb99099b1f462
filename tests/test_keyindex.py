"""KeyIndex against a plain sorted() model, alone and as the Store maintains it."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sortedcontainers import SortedList

from kvservice.engine import BATCH, DELETE, SET, Store, pack
from kvservice.keyindex import KeyIndex, _sorted_list_of_runs
from kvservice.v1.log_pb2 import LogEntry

# Few distinct characters, so keys share prefixes and collide; non-ASCII ones of
# 2, 3 and 4 UTF-8 bytes (é, ключ's к, 中, 😀) test byte order beyond ASCII.
alphabet = st.sampled_from(["a", "b", ":", "é", "к", "中", "😀", "\x00", "\x7f"])
keys = st.text(alphabet, min_size=1, max_size=5)
prefixes = st.text(alphabet, max_size=3)


def model_range(model: set[str], prefix: str, start_after: str) -> list[str]:
    """What keys_from must return, computed on UTF-8 bytes (the order DESIGN.md names)."""
    chosen = [k for k in model if k.startswith(prefix) and k.encode() > start_after.encode()]
    return sorted(chosen, key=str.encode)


class IndexMatchesSortedModel(RuleBasedStateMachine):
    """The model set is the index's live source, as the store's dict is."""

    def __init__(self) -> None:
        super().__init__()
        self.model: set[str] = set()
        self.index = KeyIndex(self.model)

    @rule(key=keys)
    def add(self, key: str) -> None:
        if key not in self.model:  # the store adds only keys it did not hold
            self.model.add(key)
            self.index.add(key)

    @rule(key=keys)
    def discard(self, key: str) -> None:
        self.model.discard(key)
        self.index.discard(key)

    @rule(new=st.sets(keys, max_size=20))
    def rebuild(self, new: set[str]) -> None:
        self.model = set(new)
        self.index.rebuild(self.model)
        assert not self.index.built  # sorted on the next scan, not now

    @rule(prefix=prefixes, start_after=st.one_of(st.just(""), keys))
    def range_matches(self, prefix: str, start_after: str) -> None:
        got = list(self.index.keys_from(prefix, start_after))
        assert got == model_range(self.model, prefix, start_after)
        assert self.index.built

    @invariant()
    def same_size(self) -> None:
        # (Only the size: listing every key here would build the index after every
        # step, and the adds and discards before a build would go untested.)
        assert len(self.index) == len(self.model)


TestIndexMatchesSortedModel = IndexMatchesSortedModel.TestCase
TestIndexMatchesSortedModel.settings = settings(max_examples=200, stateful_step_count=40)


@given(st.lists(keys, max_size=50))
def test_code_point_order_is_utf8_byte_order(items: list[str]) -> None:
    """The premise of the index: sorting str sorts their UTF-8 bytes."""
    assert sorted(items) == sorted(items, key=str.encode)


def test_a_prefix_range_stops_at_the_end_of_its_run() -> None:
    index = KeyIndex(["room:1", "room:10", "room:2", "roomy", "rooms:1", "user:1"])
    assert list(index.keys_from("room:")) == ["room:1", "room:10", "room:2"]
    assert list(index.keys_from("room:", "room:10")) == ["room:2"]
    assert list(index.keys_from("room:", "a")) == ["room:1", "room:10", "room:2"]
    assert list(index.keys_from("room:", "zzz")) == []
    assert list(index.keys_from("nothing")) == []


class StoreIndexMatchesDict(RuleBasedStateMachine):
    """Store.apply and Store.load keep key_index equal to the dict's keys."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store()

    @rule(key=keys)
    def set(self, key: str) -> None:
        self.store.apply(self.store.next_set(key, b"v"))

    @rule(key=keys)
    def delete(self, key: str) -> None:
        self.store.apply(self.store.next_delete(key))

    @rule(sets=st.lists(keys, max_size=4), deletes=st.lists(keys, max_size=4))
    def batch(self, sets: list[str], deletes: list[str]) -> None:
        """A Txn's one BATCH record: nested SETs and DELETEs under one revision."""
        nested = [LogEntry(operation=SET, key=k, value=b"t") for k in sets]
        nested += [LogEntry(operation=DELETE, key=k) for k in deletes]
        revision = self.store.revision + 1
        self.store.apply(LogEntry(revision=revision, operation=BATCH, entries=nested))

    @rule(new=st.sets(keys, max_size=20))
    def load(self, new: set[str]) -> None:
        revision = self.store.revision
        self.store.load({k: pack(revision, b"s") for k in new}, revision)

    @rule(prefix=prefixes)
    def index_is_the_sorted_keys(self, prefix: str) -> None:
        listed = list(self.store.key_index.keys_from(prefix))
        assert listed == sorted(k for k in self.store.data if k.startswith(prefix))


def test_the_index_is_sorted_on_the_first_scan_not_at_load() -> None:
    """Recovery, the snapshot writer and a snapshot install never sort the keys."""
    store = Store()
    store.load({k: pack(1, b"v") for k in ("b", "a")}, 1)
    store.apply(store.next_set("c", b"v"))
    store.apply(store.next_delete("a"))
    assert not store.key_index.built
    assert list(store.key_index.keys_from("")) == ["b", "c"]
    assert store.key_index.built
    store.apply(store.next_set("a", b"v"))
    assert list(store.key_index.keys_from("")) == ["a", "b", "c"]


TestStoreIndexMatchesDict = StoreIndexMatchesDict.TestCase
TestStoreIndexMatchesDict.settings = settings(max_examples=100, stateful_step_count=40)


# -- the stepped build (the service's first Scan) -------------------------------------


def test_a_sorted_list_built_from_sorted_keys_is_a_sorted_list() -> None:
    """_sorted_list_of_runs skips SortedList's own sort: the result must behave the
    same, whatever the runs' lengths (up to the load factor)."""
    words = sorted(f"k{i:05d}" for i in range(2500))
    runs, pos = [], 0
    for length in (1, 1000, 7, 999, 493):  # (the lengths a stepped build makes vary)
        runs.append(words[pos : pos + length])
        pos += length
    mine, theirs = _sorted_list_of_runs(runs), SortedList(words)
    assert list(mine) == list(theirs)
    for key in ("k00000", "k01234", "k99999", "a", "k01234x"):
        mine.add(key)
        theirs.add(key)
    for key in ("k00001", "k02499", "absent"):
        mine.discard(key)
        theirs.discard(key)
    assert list(mine) == list(theirs)
    assert list(mine.irange("k012", "k013")) == list(theirs.irange("k012", "k013"))
    assert mine.bisect_left("k02000") == theirs.bisect_left("k02000")


@settings(max_examples=25, deadline=None)
@given(st.sets(keys, min_size=0, max_size=400), st.lists(st.tuples(st.booleans(), keys)))
def test_a_stepped_build_with_writes_between_its_steps_lists_every_key(
    initial: set[str], changes: list[tuple[bool, str]]
) -> None:
    """The store creates and removes keys while the build yields between steps; the
    index built at the end lists exactly the keys the store then holds, in order."""
    model = set(initial)
    index = KeyIndex(model, step_keys=7)
    turns = 0

    async def writer() -> None:
        nonlocal turns
        await asyncio.sleep(0)  # (the build starts first)
        for create, key in changes:
            if create and key not in model:
                model.add(key)
                index.add(key)
            elif not create:
                model.discard(key)
                index.discard(key)
            turns += index._changes is not None  # (a build was under way)
            await asyncio.sleep(0)

    async def scenario() -> None:
        await asyncio.gather(index.ready(), writer())

    asyncio.run(scenario())
    assert index.built
    assert list(index.keys_from("")) == model_range(model, "", "")
    if len(initial) > 7 and changes:
        assert turns > 0, "the writer ran between the build's steps"


def test_a_build_stopped_by_a_new_source_builds_that_one() -> None:
    first = {f"a{i}" for i in range(1000)}
    second = {f"b{i}" for i in range(500)}
    index = KeyIndex(first, step_keys=50)

    async def scenario() -> None:
        build = asyncio.ensure_future(index.ready())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        index.rebuild(second)  # (a snapshot was installed meanwhile)
        await build

    asyncio.run(scenario())
    assert list(index.keys_from("")) == sorted(second)
