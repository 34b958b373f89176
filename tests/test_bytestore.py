"""SharedMemoryByteStore: LangChain's store suites, the §1 "Beyond the LLM cache"
contract in one process, real processes sharing one store (fork and spawn), and
``CacheBackedEmbeddings`` embedding each text once across processes.

Child-process functions live in this module (spawn children import it by name, as
they import ``_workers``).  Every store a test opens lives in its own temp directory
and is closed and unlinked at teardown; waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _samples import CacheFactory, text_generations
from langchain_classic.embeddings import CacheBackedEmbeddings
from langchain_core.embeddings import Embeddings
from langchain_core.stores import BaseStore, ByteStore
from langchain_tests.integration_tests import BaseStoreAsyncTests, BaseStoreSyncTests

from shmcache import (
    CacheStats,
    LockTimeoutError,
    SharedMemoryByteStore,
    ShmCacheError,
)
from shmcache._arena import FORMAT_VERSION
from shmcache._segment import segment_path

MIB = 1 << 20
CHILD_TIMEOUT_S = 60.0
# The ``namespace`` the embedding tests give CacheBackedEmbeddings (the model's name).
EMBED_NAMESPACE = "counting-fake-embeddings-1:"

StoreFactory = Callable[..., SharedMemoryByteStore]


def _ctx(method: str) -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(method)


@pytest.fixture
def make_store(cache_dir: Path) -> Iterator[StoreFactory]:
    """Open byte stores in ``cache_dir`` (1 MiB unless told); all are closed and
    unlinked at teardown."""
    opened: list[SharedMemoryByteStore] = []

    def factory(name: str = "store", **kwargs: Any) -> SharedMemoryByteStore:
        kwargs.setdefault("directory", cache_dir)
        kwargs.setdefault("size_bytes", MIB)
        store = SharedMemoryByteStore(name, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
        store.unlink()


@pytest.fixture
def store(make_store: StoreFactory) -> SharedMemoryByteStore:
    """An empty 1 MiB byte store."""
    return make_store()


def value_for(key: str, size: int, tag: str = "") -> bytes:
    """Bytes that name their key (and a tag), padded deterministically to ``size``."""
    head = f"{key!a}|{tag}|".encode()
    seed = hashlib.sha256(head).digest()
    body = (seed * (size // len(seed) + 1))[: max(size - len(head), 0)]
    return head + body  # exactly ``size`` bytes, or just the head when it is longer


# --- LangChain's standard suites ------------------------------------------------


class TestSharedMemoryByteStoreSync(BaseStoreSyncTests[bytes]):
    @pytest.fixture
    def kv_store(self, tmp_path: Path) -> Iterator[BaseStore[str, bytes]]:
        store = SharedMemoryByteStore("standard", directory=tmp_path, size_bytes=MIB)
        yield store
        store.close()
        store.unlink()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        # An empty value is a stored value (the suite stores the first two).
        return b"value one", b"", bytes(range(256)) * 40


class TestSharedMemoryByteStoreAsync(BaseStoreAsyncTests[bytes]):
    @pytest.fixture
    async def kv_store(self, tmp_path: Path) -> AsyncIterator[BaseStore[str, bytes]]:
        store = SharedMemoryByteStore("standard-async", directory=tmp_path, size_bytes=MIB)
        yield store
        store.close()
        store.unlink()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return b"value one", b"", bytes(range(256)) * 40


# --- one process: what is stored comes back exactly -------------------------------

ODD_KEYS = [
    "",
    "plain",
    "\ud800 lone surrogate",
    "\udfff",
    "\ud83d",  # half of a surrogate pair, alone
    "\ud83d\ude00",  # two lone surrogates, not the emoji they would pair to
    "\U0001f600 emoji",
    "\x00nul\x00",
    "tab\tnew\nline",
    "ünïcødé ключ 鍵",
    "x" * 10_000,
]


def test_is_a_langchain_byte_store(store: SharedMemoryByteStore) -> None:
    # ByteStore is the alias BaseStore[str, bytes]: check against its origin class.
    assert isinstance(store, BaseStore)
    assert ByteStore.__origin__ is BaseStore  # type: ignore[attr-defined]


def test_round_trip_of_odd_keys_and_values(store: SharedMemoryByteStore) -> None:
    pairs = [(key, value_for(key, 10 + 37 * i)) for i, key in enumerate(ODD_KEYS)]
    pairs += [("empty value", b""), ("all bytes", bytes(range(256)) * 100)]
    pairs += [("random", os.urandom(200_000))]
    store.mset(pairs)
    keys = [k for k, _ in pairs]
    got = store.mget(keys)
    assert got == [v for _, v in pairs]
    assert all(type(v) is bytes for v in got)
    assert sorted(store.yield_keys()) == sorted(keys)
    # The same key twice in one mget, and an absent key between them.
    assert store.mget(["plain", "absent", "plain"]) == [pairs[1][1], None, pairs[1][1]]
    assert store.mget([]) == []


def test_compressible_and_incompressible_values_come_back_exactly(
    store: SharedMemoryByteStore,
) -> None:
    rng = random.Random(3)
    words = [b"shared", b"memory", b"segment", b"vector", b"embedding", b"0.125", b"-1.5e-3"]
    text = b" ".join(rng.choice(words) for _ in range(40_000))  # ~280 KB, compresses well
    floats = json.dumps([rng.uniform(-1, 1) for _ in range(1536)]).encode()  # an embedding
    pairs = [("text", text), ("floats", floats), ("noise", os.urandom(100_000)),
             ("zeros", bytes(300_000)), ("short", b"abc" * 90)]
    store.mset(pairs)
    assert store.mget([k for k, _ in pairs]) == [v for _, v in pairs]


def test_empty_value_is_a_hit_not_a_miss(store: SharedMemoryByteStore) -> None:
    store.mset([("empty", b"")])
    before = store.stats()
    assert store.mget(["empty"]) == [b""]
    after = store.stats()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)
    assert list(store.yield_keys()) == ["empty"]


def test_keys_are_exact(store: SharedMemoryByteStore) -> None:
    store.mset([("ab", b"1"), ("a", b"2")])
    assert store.mget(["ab", "a", "b", "ab ", "AB", "\ud83d\ude00", "\U0001f600"]) == [
        b"1", b"2", None, None, None, None, None,
    ]
    store.mset([("\ud83d\ude00", b"pair of lone surrogates")])
    assert store.mget(["\U0001f600", "\ud83d\ude00"]) == [None, b"pair of lone surrogates"]


def test_overwrite_replaces_whatever_the_sizes(store: SharedMemoryByteStore) -> None:
    for size in (10, 50_000, 0, 3, 200_000, 1):
        value = value_for("k", size, tag=str(size))
        store.mset([("k", value)])
        assert store.mget(["k"]) == [value]
    assert list(store.yield_keys()) == ["k"]
    assert store.stats().entries == 1
    # Within one batch the last pair for a key wins, as in a dict.
    store.mset([("dup", b"first"), ("dup", b"second")])
    assert store.mget(["dup"]) == [b"second"]


def test_mdelete_removes_only_what_it_names(store: SharedMemoryByteStore) -> None:
    store.mset([("a", b"1"), ("b", b"2"), ("c", b"3")])
    store.mdelete(["never stored", "a", "\ud800", ""])
    store.mdelete([])
    assert store.mget(["a", "b", "c"]) == [None, b"2", b"3"]
    store.mdelete(["a", "a", "b"])
    assert store.mget(["a", "b", "c"]) == [None, None, b"3"]
    assert list(store.yield_keys()) == ["c"]
    assert store.stats().entries == 1
    # A deleted key can be stored again.
    store.mset([("a", b"again")])
    assert store.mget(["a"]) == [b"again"]


def test_yield_keys_with_and_without_prefix(store: SharedMemoryByteStore) -> None:
    keys = [
        "foo", "foobar", "foo/bar", "fo", "bar", "Foo",
        "föö", "föx", "fo\u0308o",  # precomposed and combining: different strings
        "\U0001f600a", "\U0001f600b", "\ud83d", "\ud83d\ude00", "",
    ]
    store.mset([(k, k.encode("utf-8", "surrogatepass")) for k in keys])
    assert isinstance(store.yield_keys(), Iterator)
    assert sorted(store.yield_keys()) == sorted(keys)
    assert sorted(store.yield_keys(prefix=None)) == sorted(keys)
    assert sorted(store.yield_keys(prefix="")) == sorted(keys)  # str.startswith("")
    expected = {
        "foo": ["foo", "foobar", "foo/bar"],
        "fo": ["foo", "foobar", "foo/bar", "fo", "fo\u0308o"],
        "foobar": ["foobar"],
        "foobarbaz": [],
        "Fo": ["Foo"],
        "fö": ["föö", "föx"],
        "\U0001f600": ["\U0001f600a", "\U0001f600b"],
        "\ud83d": ["\ud83d", "\ud83d\ude00"],  # a lone surrogate as a prefix
        "nothing": [],
    }
    for prefix, matching in expected.items():
        assert sorted(store.yield_keys(prefix=prefix)) == sorted(matching), prefix
    store.mdelete(["foobar"])
    assert sorted(store.yield_keys(prefix="foo")) == ["foo", "foo/bar"]


def test_stats_count_mget_results_and_stored_values(store: SharedMemoryByteStore) -> None:
    start = store.stats()
    assert isinstance(start, CacheStats)
    assert start.size_bytes == MIB
    store.mset([("a", b"1"), ("b", b"22"), ("c", b"")])
    store.mset([("a", b"111")])  # an overwrite is a stored value too
    store.mget(["a", "b", "c", "missing", "a"])
    stats = store.stats()
    assert stats.updates - start.updates == 4
    assert stats.hits - start.hits == 4
    assert stats.misses - start.misses == 1
    assert stats.entries == 3
    assert 0 < stats.used_bytes <= stats.size_bytes


def test_llm_cache_and_byte_store_of_one_name_never_collide(
    make_store: StoreFactory, make_cache: CacheFactory, cache_dir: Path
) -> None:
    cache = make_cache("same")
    store = make_store("same")
    assert store.path != cache.path
    assert Path(store.path).name == f"same.v{FORMAT_VERSION}.bytes.shm"
    assert store.path == segment_path(str(cache_dir), "same", FORMAT_VERSION, kind="bytes")
    assert cache.path == segment_path(str(cache_dir), "same", FORMAT_VERSION)
    cache.update("k", "llm", text_generations("llm value"))
    store.mset([("k", b"store value"), ("other", b"x")])
    assert store.mget(["k"]) == [b"store value"]
    assert cache.lookup("k", "llm") == text_generations("llm value")
    assert sorted(store.yield_keys()) == ["k", "other"]
    assert (cache.stats().entries, store.stats().entries) == (1, 2)
    cache.clear()
    assert store.mget(["k", "other"]) == [b"store value", b"x"]
    cache.update("k", "llm", text_generations("llm value"))
    store.mdelete(["k"])
    assert cache.lookup("k", "llm") == text_generations("llm value")
    store.clear()
    assert list(store.yield_keys()) == []
    assert cache.lookup("k", "llm") == text_generations("llm value")


def test_clear_empties_the_store_for_every_instance(make_store: StoreFactory) -> None:
    first, second = make_store("cleared"), make_store("cleared")
    first.mset([(f"k{i}", b"v") for i in range(50)])
    before = first.stats()
    second.clear()
    assert first.mget(["k0", "k49"]) == [None, None]
    assert list(first.yield_keys()) == []
    after = first.stats()
    assert (after.entries, after.used_bytes) == (0, 0)
    assert after.updates == before.updates  # clear resets no event counter
    first.mset([("k0", b"again")])
    assert second.mget(["k0"]) == [b"again"]


def test_segment_file_is_private_and_exactly_sized(
    make_store: StoreFactory, cache_dir: Path
) -> None:
    store = make_store("sized", size_bytes=2 * MIB)
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
    info = os.stat(store.path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 2 * MIB == store.stats().size_bytes
    store.mset([(f"k{i}", value_for(f"k{i}", 20_000)) for i in range(300)])  # 6 MB
    assert os.stat(store.path).st_size == 2 * MIB  # never grows


def test_a_second_instance_of_the_name_shares_entries(make_store: StoreFactory) -> None:
    first = make_store("twice")
    second = make_store("twice")
    first.mset([("k", b"from first")])
    assert second.mget(["k"]) == [b"from first"]
    second.mdelete(["k"])
    assert first.mget(["k"]) == [None]


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 65, "sp ace", "é"])
def test_bad_names_raise_value_error(cache_dir: Path, name: str) -> None:
    with pytest.raises(ShmCacheError) as info:
        SharedMemoryByteStore(name, directory=cache_dir)
    assert isinstance(info.value, ValueError)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.shm"))


def test_name_type_and_keyword_only_arguments(cache_dir: Path) -> None:
    with pytest.raises(TypeError):
        SharedMemoryByteStore(5, directory=cache_dir)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SharedMemoryByteStore("n", MIB)  # type: ignore[misc]
    store = SharedMemoryByteStore(name="kw", directory=cache_dir, size_bytes=MIB)
    store.close()
    store.unlink()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size_bytes": MIB - 1}, ValueError),
        ({"size_bytes": 1.5}, TypeError),
        ({"ttl": 0}, ValueError),
        ({"ttl": -1}, ValueError),
        ({"ttl": "1"}, TypeError),
        ({"lock_timeout": 0}, ValueError),
        ({"lock_timeout": float("nan")}, ValueError),
    ],
)
def test_bad_options_raise(
    cache_dir: Path, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        SharedMemoryByteStore("opts", directory=cache_dir, **kwargs)  # type: ignore[arg-type]
    if error is ValueError:
        assert isinstance(info.value, ShmCacheError)
    assert not Path(segment_path(str(cache_dir), "opts", FORMAT_VERSION, kind="bytes")).exists()


# --- bad types, values too large, closed stores ------------------------------------

BAD_KEYS = [None, 1, 1.5, b"bytes", ["list"], ("tu", "ple")]
BAD_VALUES = ["a str", None, 1, bytearray(b"ba"), memoryview(b"mv"), [1, 2], {"k": b"v"}]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda v: type(v).__name__)
def test_non_str_keys_raise_type_error_in_every_method(
    store: SharedMemoryByteStore, bad: object
) -> None:
    store.mset([("kept", b"kept")])
    with pytest.raises(TypeError):
        store.mget([bad])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        store.mget(["kept", bad])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        store.mset([(bad, b"value")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        store.mdelete([bad])  # type: ignore[list-item]
    if bad is not None:  # prefix=None means "every key"
        with pytest.raises(TypeError):
            list(store.yield_keys(prefix=bad))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.mdelete(["kept", bad])  # type: ignore[list-item]
    assert store.mget(["kept"]) == [b"kept"]  # every key is checked before any is deleted
    assert list(store.yield_keys()) == ["kept"]


def test_a_single_str_is_not_a_list_of_keys(store: SharedMemoryByteStore) -> None:
    store.mset([("a", b"1"), ("b", b"2")])
    with pytest.raises(TypeError):
        store.mget("ab")
    with pytest.raises(TypeError):
        store.mdelete("ab")
    assert store.mget(["a", "b"]) == [b"1", b"2"]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda v: type(v).__name__)
def test_non_bytes_values_raise_type_error(store: SharedMemoryByteStore, bad: object) -> None:
    with pytest.raises(TypeError):
        store.mset([("k", bad)])  # type: ignore[list-item]
    assert store.mget(["k"]) == [None]
    assert store.stats().updates == 0


@pytest.mark.parametrize(
    "bad_pair", [(7, b"bad key"), ("b", "not bytes"), ("b", bytearray(b"x")), ("b", None)],
    ids=repr,
)
def test_a_bad_pair_in_a_batch_writes_nothing_of_the_batch(
    store: SharedMemoryByteStore, bad_pair: tuple[object, object]
) -> None:
    store.mset([("a", b"old a")])
    before = store.stats()
    batch = [("a", b"new a"), ("x", b"x"), bad_pair, ("c", b"c"), ("d", b"d")]
    with pytest.raises(TypeError):
        store.mset(batch)  # type: ignore[arg-type]
    assert store.mget(["a", "x", "b", "c", "d"]) == [b"old a", None, None, None, None]
    assert list(store.yield_keys()) == ["a"]
    assert store.stats().updates == before.updates


async def test_async_methods_check_types_too(store: SharedMemoryByteStore) -> None:
    await store.amset([("a", b"old a")])
    with pytest.raises(TypeError):
        await store.amget([1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await store.amset([("a", b"new a"), ("b", "not bytes"), ("c", b"c")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await store.amset([(None, b"v")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await store.amdelete([b"a"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        [k async for k in store.ayield_keys(prefix=1)]  # type: ignore[arg-type]
    assert await store.amget(["a", "b", "c"]) == [b"old a", None, None]


def test_value_too_large_raises_and_writes_nothing_of_the_batch(
    store: SharedMemoryByteStore,
) -> None:
    store.mset([("earlier", b"still here"), ("replaced?", b"old")])
    fits = value_for("fits", 300_000)
    store.mset([("fits", fits)])  # a big value that fits is stored
    before = store.stats()
    batch = [("replaced?", b"new"), ("small", b"s"), ("huge", os.urandom(MIB))]
    with pytest.raises(ShmCacheError) as info:
        store.mset(batch)
    assert isinstance(info.value, ValueError)
    assert store.mget(["earlier", "replaced?", "fits", "small", "huge"]) == [
        b"still here", b"old", fits, None, None,
    ]
    assert store.stats().updates == before.updates
    assert sorted(store.yield_keys()) == ["earlier", "fits", "replaced?"]


async def test_async_value_too_large_raises(store: SharedMemoryByteStore) -> None:
    await store.amset([("earlier", b"still here")])
    with pytest.raises(ShmCacheError) as info:
        await store.amset([("small", b"s"), ("huge", os.urandom(2 * MIB))])
    assert isinstance(info.value, ValueError)
    assert await store.amget(["earlier", "small", "huge"]) == [b"still here", None, None]


async def test_closed_store_raises_except_path_close_unlink(make_store: StoreFactory) -> None:
    store = make_store("closed")
    store.mset([("k", b"v")])
    path = store.path
    store.close()
    store.close()  # idempotent
    assert store.path == path
    calls: list[Callable[[], object]] = [
        lambda: store.mget(["k"]),
        lambda: store.mset([("k", b"w")]),
        lambda: store.mdelete(["k"]),
        lambda: list(store.yield_keys()),
        lambda: list(store.yield_keys(prefix="k")),
        store.stats,
        lambda: pickle.dumps(store),
    ]
    for call in calls:
        with pytest.raises(ShmCacheError) as info:
            call()
        assert isinstance(info.value, ValueError)
    for acall in (
        lambda: store.amget(["k"]),
        lambda: store.amset([("k", b"w")]),
        lambda: store.amdelete(["k"]),
    ):
        with pytest.raises(ShmCacheError):
            await acall()
    with pytest.raises(ShmCacheError):
        [k async for k in store.ayield_keys()]
    assert os.path.exists(path)
    store.unlink()
    assert not os.path.exists(path)


def test_context_manager_closes_and_unlink_before_close(cache_dir: Path) -> None:
    with SharedMemoryByteStore("ctx", directory=cache_dir, size_bytes=MIB) as store:
        store.mset([("k", b"v")])
        store.unlink()  # attached processes keep the old segment until they close
        assert store.mget(["k"]) == [b"v"]
    assert not os.path.exists(store.path)
    with pytest.raises(ShmCacheError):
        store.mget(["k"])


def test_pickles_by_name(store: SharedMemoryByteStore) -> None:
    big = os.urandom(20_000)
    store.mset([("k", b"v"), ("big", big)])
    blob = pickle.dumps(store)
    assert big[:64] not in blob and len(blob) < 2000  # the name, not the contents
    clone = pickle.loads(blob)
    try:
        assert isinstance(clone, SharedMemoryByteStore)
        assert clone.path == store.path
        assert clone.mget(["k"]) == [b"v"]
        clone.mset([("from clone", b"c")])
        assert store.mget(["from clone"]) == [b"c"]
    finally:
        if clone is not store:
            clone.close()


# --- expiry and eviction -------------------------------------------------------------


def test_ttl_expires_entries_at_the_writers_deadline(make_store: StoreFactory) -> None:
    ttl = 1.0
    writer = make_store("ttl", ttl=ttl)
    reader = make_store("ttl")  # no ttl of its own: the writer's expiry applies
    started = time.monotonic()
    writer.mset([("short", b"expires"), ("empty", b"")])
    reader.mset([("long", b"stays")])
    assert reader.mget(["short", "empty", "long"]) == [b"expires", b"", b"stays"]
    assert time.monotonic() - started < ttl, "too slow to see the entry before it expired"
    deadline = started + ttl + 10.0
    while reader.mget(["short", "empty"]) != [None, None]:
        assert time.monotonic() < deadline, "the entries never expired"
        time.sleep(0.02)  # poll interval; the condition decides
    assert time.monotonic() - started >= ttl * 0.95  # not before their deadline
    assert writer.mget(["short", "empty", "long"]) == [None, None, b"stays"]
    assert list(reader.yield_keys()) == ["long"]  # expired keys are not listed
    # Rewriting an expired key stores it again.
    reader.mset([("short", b"back")])
    assert writer.mget(["short"]) == [b"back"]


@pytest.mark.parametrize("batch", [10, 300])
def test_eviction_keeps_the_store_consistent(make_store: StoreFactory, batch: int) -> None:
    """3 MiB of values into a 1 MiB segment: no error, and what is listed is there."""
    store = make_store("evict")
    keys = [f"key {i}" for i in range(300)]
    for start in range(0, len(keys), batch):
        store.mset([(k, value_for(k, 10_240)) for k in keys[start : start + batch]])
    stats = store.stats()
    assert stats.updates == len(keys)
    assert stats.evictions > 0
    listed = list(store.yield_keys())
    assert len(listed) == len(set(listed))
    assert 0 < len(listed) < len(keys)
    assert set(listed) <= set(keys)
    assert store.mget(listed) == [value_for(k, 10_240) for k in listed]
    found = store.mget(keys)
    present = {k for k, v in zip(keys, found, strict=True) if v is not None}
    assert present == set(listed)
    assert all(v is None or v == value_for(k, 10_240) for k, v in zip(keys, found, strict=True))
    assert keys[-1] in present  # the newest value is never the one evicted
    assert store.stats().entries == len(listed)
    assert stats.evictions >= len(keys) - len(listed)


# --- the lock: never a wait longer than lock_timeout -----------------------------------


@contextlib.contextmanager
def segment_locked(path: str) -> Iterator[None]:
    """Hold the segment's writer lock (an exclusive ``flock`` on the segment file,
    see ``shmcache/_lock.py``) through a description of our own."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


async def ticks_until_done(task: asyncio.Future[Any]) -> int:
    """How many 10 ms ticks this coroutine got to run until ``task`` finished."""
    ticks = 0
    while not task.done():
        ticks += 1
        await asyncio.sleep(0.01)
    return ticks


async def test_writes_time_out_when_the_lock_is_held(make_store: StoreFactory) -> None:
    timeout = 0.2
    store = make_store("locked", lock_timeout=timeout)
    store.mset([("k", b"before")])
    with segment_locked(store.path):
        for write in (
            lambda: store.mset([("k", b"during"), ("new", b"n")]),
            lambda: store.mdelete(["k"]),
        ):
            started = time.monotonic()
            with pytest.raises(LockTimeoutError):
                write()
            assert timeout * 0.9 <= time.monotonic() - started < timeout + 2.0
        # The async writes wait without blocking the event loop: a ticker task runs.
        for awrite in (
            lambda: store.amset([("k", b"during")]),
            lambda: store.amdelete(["k"]),
        ):
            started = time.monotonic()
            waiting = asyncio.ensure_future(awrite())
            ticks = await asyncio.wait_for(ticks_until_done(waiting), 10)
            assert time.monotonic() - started < timeout + 2.0
            with pytest.raises(LockTimeoutError):
                waiting.result()
            assert ticks >= 5, f"the event loop ran only {ticks} ticks while waiting"
        # Readers do not need the lock.
        started = time.monotonic()
        assert store.mget(["k", "new"]) == [b"before", None]
        assert await store.amget(["k"]) == [b"before"]
        assert time.monotonic() - started < timeout + 2.0
        # Listing keys reads under the lock: it gives up at the deadline, never hangs.
        started = time.monotonic()
        with pytest.raises(LockTimeoutError):
            list(store.yield_keys())
        assert time.monotonic() - started < timeout + 2.0
    assert isinstance(LockTimeoutError("x"), ShmCacheError)
    store.mset([("k", b"after")])
    assert store.mget(["k", "new"]) == [b"after", None]


# --- async: native, no thread-pool hop ----------------------------------------------


class _RefusingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A default executor that fails any work handed to it: a thread-pool hop shows."""

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        raise AssertionError("the store handed work to the event loop's thread pool")


async def test_async_methods_run_on_the_loop(store: SharedMemoryByteStore) -> None:
    loop = asyncio.get_running_loop()
    executor = _RefusingExecutor(max_workers=1)
    loop.set_default_executor(executor)
    try:
        pairs = [(key, value_for(key, 100 + i)) for i, key in enumerate(ODD_KEYS)]
        pairs.append(("empty", b""))
        await store.amset(pairs)
        assert await store.amget([k for k, _ in pairs]) == [v for _, v in pairs]
        assert sorted([k async for k in store.ayield_keys()]) == sorted(k for k, _ in pairs)
        assert sorted([k async for k in store.ayield_keys(prefix="\ud83d")]) == [
            "\ud83d", "\ud83d\ude00",
        ]
        await store.amdelete(["plain", "absent"])
        assert await store.amget(["plain", "empty"]) == [None, b""]
    finally:
        executor.shutdown()
    assert store.mget(["empty"]) == [b""]  # sync and async see the same store


async def test_many_concurrent_tasks_share_one_store(store: SharedMemoryByteStore) -> None:
    async def task(i: int) -> list[bytes | None]:
        keys = [f"task {i} key {j}" for j in range(20)]
        await store.amset([(k, value_for(k, 500)) for k in keys])
        return await store.amget(keys)

    results = await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(30))), 30)
    for i, got in enumerate(results):
        assert got == [value_for(f"task {i} key {j}", 500) for j in range(20)]
    assert len([k async for k in store.ayield_keys(prefix="task ")]) == 600


# --- real processes ------------------------------------------------------------------


def child_get_and_set(store: SharedMemoryByteStore, keys: list[str],
                      pairs: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Pool task: read ``keys`` and store ``pairs`` through the store it was given."""
    found = store.mget(keys)
    store.mset(pairs)
    return {"pid": os.getpid(), "found": found, "keys": sorted(store.yield_keys())}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_one_process_writes_another_reads(store: SharedMemoryByteStore, method: str) -> None:
    parent_pairs = [(k, value_for(k, 3000 + i)) for i, k in enumerate(ODD_KEYS)]
    parent_pairs.append(("empty", b""))
    store.mset(parent_pairs)
    child_pairs = [("from child", os.urandom(50_000)), ("\udc80 child", b"")]
    keys = [k for k, _ in parent_pairs] + ["absent"]
    with _ctx(method).Pool(1) as pool:
        result = pool.apply_async(child_get_and_set, (store, keys, child_pairs)).get(
            CHILD_TIMEOUT_S
        )
    assert result["pid"] != os.getpid()
    assert result["found"] == [v for _, v in parent_pairs] + [None]
    assert result["keys"] == sorted(k for k, _ in parent_pairs + child_pairs)
    assert store.mget([k for k, _ in child_pairs]) == [v for _, v in child_pairs]


def _use_inherited(store: SharedMemoryByteStore) -> None:
    """fork child: use the parent's instance as inherited (its lock fd re-made)."""
    code = 0 if store.mget(["parent"]) == [b"p"] else 3
    store.mset([("child", b"c")])
    store.mdelete(["parent"])
    store.close()
    os._exit(code)


@pytest.mark.timeout(60)
def test_an_instance_inherited_across_fork_works(store: SharedMemoryByteStore) -> None:
    store.mset([("parent", b"p")])
    child = _ctx("fork").Process(target=_use_inherited, args=(store,))
    child.start()
    child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    assert store.mget(["parent", "child"]) == [None, b"c"]
    store.mset([("parent again", b"p2")])  # the child's close left the parent attached
    assert store.mget(["parent again"]) == [b"p2"]


def disjoint_writer(name: str, directory: str, writer: int, keys: int, start: Any) -> None:
    """Process target: after the start barrier, store ``keys`` keys of its own in small
    batches, reading each batch back; exit 0 only if every read was exact."""
    code = 0
    with SharedMemoryByteStore(name, directory=directory, size_bytes=4 * MIB) as store:
        start.wait(CHILD_TIMEOUT_S)
        mine = [f"writer {writer} key {i} \u00e9" for i in range(keys)]
        for begin in range(0, keys, 7):
            batch = [(k, value_for(k, 200 + (i * 131) % 1500))
                     for i, k in enumerate(mine[begin : begin + 7], start=begin)]
            store.mset(batch)
            if store.mget([k for k, _ in batch]) != [v for _, v in batch]:
                code = 3
    os._exit(code)  # as a multiprocessing child: no atexit; close() flushed the counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_concurrent_writers_of_disjoint_keys(
    make_store: StoreFactory, cache_dir: Path, method: str
) -> None:
    store = make_store("disjoint", size_bytes=4 * MIB)  # ~0.8 MB of values: no eviction
    writers, keys = 3, 200
    ctx = _ctx(method)
    start = ctx.Barrier(writers)
    children = [
        ctx.Process(target=disjoint_writer, args=("disjoint", str(cache_dir), w, keys, start))
        for w in range(writers)
    ]
    try:
        for child in children:
            child.start()
        for child in children:
            child.join(CHILD_TIMEOUT_S)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(10)
    assert [child.exitcode for child in children] == [0] * writers
    expected = {
        f"writer {w} key {i} \u00e9": None for w in range(writers) for i in range(keys)
    }
    listed = list(store.yield_keys())
    assert sorted(listed) == sorted(expected)
    values = store.mget(list(expected))
    assert all(v is not None and v.startswith(f"{k!a}|".encode()) for k, v in
               zip(expected, values, strict=True))
    stats = store.stats()
    assert stats.updates == writers * keys
    assert stats.evictions == 0
    assert stats.entries == writers * keys


def racing_writer(store: SharedMemoryByteStore, writer: int, keys: int, seconds: float) -> int:
    """Pool task: overwrite random keys with values naming (key, writer, seq) and of
    varying size until the deadline; return how many values it stored."""
    rng = random.Random(writer)
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        batch = []
        for _ in range(rng.randrange(1, 6)):
            key = f"race {rng.randrange(keys)}"
            batch.append((key, value_for(key, rng.randrange(0, 9000), tag=f"{writer}/{seq}")))
            seq += 1
        store.mset(batch)
        if rng.random() < 0.05:
            store.mdelete([f"race {rng.randrange(keys)}"])
    return seq


def _value_problem(key: str, value: bytes | None) -> str | None:
    if value is None:
        return None
    head = f"{key!a}|".encode()
    if not value.startswith(head):
        return f"{key}: a value of another key {value[:40]!r}"
    tag = value[len(head):].split(b"|", 1)[0].decode()
    if value != value_for(key, len(value), tag=tag):
        return f"{key}: torn value ({len(value)} bytes)"
    return None


def checking_reader(
    store: SharedMemoryByteStore, keys: int, seconds: float
) -> tuple[int, list[str]]:
    """Pool task: mget random keys until the deadline; return (values checked, problems)."""
    rng = random.Random(os.getpid())
    deadline = time.monotonic() + seconds
    checked, problems = 0, []
    while time.monotonic() < deadline:
        wanted = [f"race {rng.randrange(keys)}" for _ in range(rng.randrange(1, 8))]
        for key, value in zip(wanted, store.mget(wanted), strict=True):
            problem = _value_problem(key, value)
            if problem:
                problems.append(problem)
            checked += value is not None
        for key in list(store.yield_keys(prefix="race 1"))[:5]:
            if not key.startswith("race 1"):
                problems.append(f"yield_keys(prefix='race 1') gave {key!r}")
    return checked, problems[:10]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_racing_writers_and_readers_never_see_a_wrong_value(
    store: SharedMemoryByteStore, method: str
) -> None:
    keys, seconds = 300, 1.5  # ~1.3 MB of live values in a 1 MiB segment: eviction
    with _ctx(method).Pool(4) as pool:
        writers = [pool.apply_async(racing_writer, (store, w, keys, seconds)) for w in (1, 2)]
        readers = [pool.apply_async(checking_reader, (store, keys, seconds)) for _ in (1, 2)]
        stored = sum(w.get(CHILD_TIMEOUT_S) for w in writers)
        results = [r.get(CHILD_TIMEOUT_S) for r in readers]
    assert [p for _, problems in results for p in problems] == []
    assert stored > 100 and sum(checked for checked, _ in results) > 100
    listed = list(store.yield_keys())
    found = store.mget(listed)
    for key, value in zip(listed, found, strict=True):
        assert value is not None, f"{key!r} listed but absent"
        assert _value_problem(key, value) is None
    assert store.stats().evictions > 0


# --- CacheBackedEmbeddings across processes -------------------------------------------


def fake_vector(text: str, dims: int = 12) -> list[float]:
    """A deterministic embedding: the text's sha256 as floats in [-1, 1)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return [(b - 128) / 128 + i * 1e-9 for i, b in enumerate(digest[:dims])]


class CountingEmbeddings(Embeddings):
    """Deterministic embeddings; each text it embeds is one line appended (O_APPEND)
    to ``count_file``, so texts embedded by any process can be counted."""

    def __init__(self, count_file: str) -> None:
        self.count_file = count_file

    def _record(self, texts: Sequence[str]) -> None:
        lines = "".join(json.dumps([os.getpid(), t]) + "\n" for t in texts)
        fd = os.open(self.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self._record(texts)
        return [fake_vector(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(0)
        return self.embed_documents(texts)


def embedded_texts(count_file: str) -> Counter[str]:
    """Text -> how many times any process embedded it."""
    if not os.path.exists(count_file):
        return Counter()
    with open(count_file) as handle:
        return Counter(json.loads(line)[1] for line in handle)


def cached_embedder(store: SharedMemoryByteStore, count_file: str) -> CacheBackedEmbeddings:
    return CacheBackedEmbeddings.from_bytes_store(
        CountingEmbeddings(count_file), store, namespace=EMBED_NAMESPACE, key_encoder="sha256"
    )


def embed_in_child(name: str, directory: str, count_file: str, texts: list[str],
                   use_async: bool) -> dict[str, Any]:
    """Pool task: open the store by name, embed ``texts`` through CacheBackedEmbeddings."""
    with SharedMemoryByteStore(name, directory=directory, size_bytes=4 * MIB) as store:
        embedder = cached_embedder(store, count_file)
        if use_async:
            vectors = asyncio.run(embedder.aembed_documents(texts))
        else:
            vectors = embedder.embed_documents(texts)
    return {"pid": os.getpid(), "vectors": vectors}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cache_backed_embeddings_embed_each_text_once_across_processes(
    make_store: StoreFactory, cache_dir: Path, tmp_path: Path, method: str
) -> None:
    store = make_store("embeddings", size_bytes=4 * MIB)
    count_file = str(tmp_path / "embedded.jsonl")
    texts = [f"document {i}: shared memory for embeddings" for i in range(30)]
    # (no lone surrogates: CacheBackedEmbeddings' key encoder utf-8-encodes texts)
    texts += ["", "ünïcødé ✓", "\U0001f600"]
    rng = random.Random(7)
    jobs = [  # overlapping lists, no text twice within one list
        (texts[0:12], False),
        (texts[6:20], True),
        (rng.sample(texts[0:25], 25), False),
        (texts[15:], True),
        (rng.sample(texts, len(texts)), False),
    ]
    results = []
    # maxtasksperchild=1: every job runs in a process of its own, one after another.
    with _ctx(method).Pool(1, maxtasksperchild=1) as pool:
        for job_texts, use_async in jobs:
            args = ("embeddings", str(cache_dir), count_file, job_texts, use_async)
            results.append(pool.apply_async(embed_in_child, args).get(CHILD_TIMEOUT_S))
    pids = {r["pid"] for r in results}
    assert len(pids) == len(jobs) and os.getpid() not in pids
    # Each distinct text was embedded exactly once, by whichever process saw it first.
    assert embedded_texts(count_file) == Counter(set(texts))
    for (job_texts, _), result in zip(jobs, results, strict=True):
        assert result["vectors"] == [fake_vector(t) for t in job_texts]
    # This process finds them all in the store too (sync and async), embedding nothing.
    embedder = cached_embedder(store, count_file)
    assert embedder.embed_documents(texts) == [fake_vector(t) for t in texts]
    assert asyncio.run(embedder.aembed_documents(texts[::-1])) == [
        fake_vector(t) for t in texts[::-1]
    ]
    assert embedded_texts(count_file) == Counter(set(texts))
    keys = list(store.yield_keys(prefix=EMBED_NAMESPACE))
    assert len(keys) == len(texts) == store.stats().entries


async def test_async_embeddings_across_concurrent_tasks(
    store: SharedMemoryByteStore, tmp_path: Path
) -> None:
    """aembed_documents from concurrent tasks: a second round embeds only new texts."""
    count_file = str(tmp_path / "embedded.jsonl")
    embedder = cached_embedder(store, count_file)
    groups = [[f"text {g} {i}" for i in range(10)] for g in range(5)]
    first = await asyncio.gather(*(embedder.aembed_documents(g) for g in groups))
    assert embedded_texts(count_file) == Counter(t for g in groups for t in g)
    second_round = [[*g[::-1], "new " + g[0]] for g in groups]
    again = await asyncio.gather(*(embedder.aembed_documents(g) for g in second_round))
    for group, vectors in zip(groups + second_round, first + again, strict=True):
        assert vectors == [fake_vector(t) for t in group]
    # The second round embedded only its new texts.
    new_texts = ["new " + g[0] for g in groups]
    assert embedded_texts(count_file) == Counter([t for g in groups for t in g] + new_texts)
