"""SharedMemoryNodeCache: LangGraph's node cache in shared memory (DESIGN §1, "Beyond
the LLM cache"; issue 12).

The cache is exercised the way LangGraph's pregel loop calls it: ``get`` / ``aget``
with a tuple of ``FullKey`` = ``(namespace tuple, key)``, ``set`` / ``aset`` with
``{FullKey: (writes, ttl)}`` where ``writes`` is the node's ``deque`` of
``(channel, value)`` pairs, and ``clear(namespaces)`` from ``graph.clear_cache()``.
The graph tests compile real ``StateGraph``s with ``cache=SharedMemoryNodeCache(...)``
and count node runs in a file every process appends to, so "the node ran once on the
host" is read from disk, not from process memory. Expiry is waited for by polling the
condition against a deadline; every segment lives in the test's temp directory and is
closed and unlinked at teardown, every child process is joined (or killed) by pid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import multiprocessing
import os
import pickle
import re
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import pytest
from _samples import CacheFactory
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import Generation
from langchain_core.runnables import RunnableConfig
from langgraph.cache.base import BaseCache, FullKey
from langgraph.cache.memory import InMemoryCache
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, StateGraph
from langgraph.types import CachePolicy
from pydantic import BaseModel

from shmcache import ShmCacheError
from shmcache.langgraph import SharedMemoryNodeCache

pytestmark = pytest.mark.skipif(os.name != "posix", reason="shmcache needs POSIX")

MIB = 1 << 20
CHILD_TIMEOUT_S = 60.0
EXPIRY_DEADLINE_S = 10.0
# Expiry uses the wall clock, the test measures with the monotonic one.
CLOCK_SLACK_S = 0.05
# What LangGraph's pregel loop uses as the first element of a node's namespace.
WRITES_NS = "__pregel_ns_writes"

T = TypeVar("T")
NodeCacheFactory = Callable[..., SharedMemoryNodeCache]


# -- fixtures and helpers -----------------------------------------------------------


@pytest.fixture
def make_node_cache(cache_dir: Path) -> Iterator[NodeCacheFactory]:
    """Open node caches in ``cache_dir``; all are closed and unlinked at teardown."""
    opened: list[SharedMemoryNodeCache] = []

    def factory(name: str = "nodes", **kwargs: Any) -> SharedMemoryNodeCache:
        kwargs.setdefault("directory", cache_dir)
        kwargs.setdefault("size_bytes", MIB)
        cache = SharedMemoryNodeCache(name, **kwargs)
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        cache.close()
        cache.unlink()


@pytest.fixture
def node_cache(make_node_cache: NodeCacheFactory) -> SharedMemoryNodeCache:
    """An empty 1 MiB node cache."""
    return make_node_cache()


def poll_until(what: str, check: Callable[[], T | None], timeout_s: float) -> T:
    """Call ``check`` until it returns something other than None; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)  # poll interval, not synchronisation: the check decides


def shmcache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shmcache" and r.levelno == logging.WARNING
    ]


def node_key(node: str, key: str = "k") -> FullKey:
    """A key shaped like the ones LangGraph builds for a cached node."""
    return ((WRITES_NS, f"app.{node}", node), key)


# -- values nodes return -----------------------------------------------------------


class Report(BaseModel):
    title: str
    score: float
    tags: list[str]


@dataclasses.dataclass
class Record:
    question: str
    words: int
    ratios: list[float]


class Opaque:
    """A class LangGraph's serializer cannot encode (it holds a lambda)."""

    def __init__(self) -> None:
        self.fn = lambda: 1


def tool_call_message(question: str) -> AIMessage:
    return AIMessage(
        content=f"Looking up {question}",
        id="msg-ai-1",
        tool_calls=[{"name": "search", "args": {"q": question, "k": 3}, "id": "call_1"}],
        usage_metadata={"input_tokens": 12, "output_tokens": 30, "total_tokens": 42},
        response_metadata={"model_name": "fake-1", "finish_reason": "tool_calls"},
    )


VALUES: dict[str, Any] = {
    "ai_message_with_tool_calls": tool_call_message("Paris"),
    "human_message": HumanMessage(content="What is the weather?", id="msg-h-1"),
    "messages": [
        HumanMessage(content="hi", id="m1"),
        tool_call_message("Rome"),
        ToolMessage(content="sunny", tool_call_id="call_1", id="m3"),
    ],
    "pydantic_model": Report(title="weather", score=0.75, tags=["a", "b"]),
    "dataclass": Record(question="why?", words=1, ratios=[0.5, 1.5]),
    "dict": {"a": [1, 2, {"b": None}], "unicode \u00e9\U0001f600": True, "f": 1.25},
    "list": [1, "two", 3.0, None, [4]],
    "none": None,
    "bytes": b"\x00\xffbinary\x80",
    "str": "",
    "int": 2**62,
    "set": {1, 2, 3},
    "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
    # A node's writes as LangGraph stores them (its tuples come back as lists).
    "writes_deque": deque([["messages", [tool_call_message("Oslo")]], ["n", 3]]),
}
# Values whose round trip is not exact in LangGraph's serializer (tuples come back as
# lists): the node cache must give back what LangGraph's own InMemoryCache gives.
INEXACT_VALUES: dict[str, Any] = {
    "tuple": (1, "a"),
    "writes_deque_of_tuples": deque([("messages", [tool_call_message("Oslo")]), ("n", 3)]),
}


# -- API semantics --------------------------------------------------------------------


def test_is_a_langgraph_base_cache(node_cache: SharedMemoryNodeCache) -> None:
    assert isinstance(node_cache, BaseCache)


def test_round_trip_and_missing_keys_are_absent(node_cache: SharedMemoryNodeCache) -> None:
    a, b, missing = node_key("a"), node_key("b"), node_key("c")
    node_cache.set({a: ({"x": 1}, None), b: ([1, 2], 60)})
    got = node_cache.get([a, missing, b])
    assert got == {a: {"x": 1}, b: [1, 2]}
    assert type(got) is dict
    assert node_cache.get([missing]) == {}
    assert node_cache.get([]) == {}
    # The same key under another namespace, and another key in the same namespace.
    assert node_cache.get([(("other",), "k"), ((WRITES_NS, "app.a", "a"), "k2")]) == {}


def test_keys_are_returned_as_langgraph_looks_them_up(
    node_cache: SharedMemoryNodeCache,
) -> None:
    """The pregel loop indexes the result with the very tuples it passed in."""
    key = node_key("n", "3787e508ea2cf8d3e609c78b448abb14")
    node_cache.set({key: ("v", None)})
    got = node_cache.get((key,))
    assert list(got) == [key]
    assert got[key] == "v"


def test_set_overwrites(node_cache: SharedMemoryNodeCache) -> None:
    key = node_key("n")
    node_cache.set({key: ("old", None)})
    node_cache.set({key: ("new", None)})
    assert node_cache.get([key]) == {key: "new"}
    node_cache.set({key: ({"newer": [1]}, 60)})
    assert node_cache.get([key]) == {key: {"newer": [1]}}


def test_per_entry_ttl(node_cache: SharedMemoryNodeCache) -> None:
    """Each entry expires after its own ttl (an int as CachePolicy gives, or a float);
    None never expires; an overwrite sets a new ttl."""
    short_int, short_float = node_key("int"), node_key("float")
    long_, forever = node_key("long"), node_key("forever")
    made_mortal, made_immortal = node_key("mortal"), node_key("immortal")
    node_cache.set({made_mortal: ("m0", None), made_immortal: ("i0", 1)})
    start = time.monotonic()
    node_cache.set(
        {
            short_int: ("i", 1),
            short_float: ("f", 0.5),
            long_: ("l", 3600),
            forever: ("n", None),
            made_mortal: ("m1", 1),
            made_immortal: ("i1", None),
        }
    )
    everything = [short_int, short_float, long_, forever, made_mortal, made_immortal]
    assert node_cache.get(everything) == {
        short_int: "i",
        short_float: "f",
        long_: "l",
        forever: "n",
        made_mortal: "m1",
        made_immortal: "i1",
    }

    def short_ones_expired() -> float | None:
        got = node_cache.get([short_int, short_float, made_mortal])
        return time.monotonic() if not got else None

    expired_at = poll_until("the 1 s entries to expire", short_ones_expired, EXPIRY_DEADLINE_S)
    assert expired_at - start >= 1 - CLOCK_SLACK_S, "an entry expired before its ttl"
    assert node_cache.get(everything) == {long_: "l", forever: "n", made_immortal: "i1"}

    # An expired key can be stored again.
    node_cache.set({short_int: ("again", None)})
    assert node_cache.get([short_int]) == {short_int: "again"}
    # ttl 0 (as InMemoryCache: expired when written) is never a hit.
    node_cache.set({short_float: ("zero", 0)})
    assert node_cache.get([short_float]) == {}


def test_float_ttl_expires_in_time(node_cache: SharedMemoryNodeCache) -> None:
    key = node_key("quick")
    start = time.monotonic()
    node_cache.set({key: ("v", 0.3)})
    expired_at = poll_until(
        "the 0.3 s entry to expire",
        lambda: time.monotonic() if not node_cache.get([key]) else None,
        EXPIRY_DEADLINE_S,
    )
    assert expired_at - start >= 0.3 - CLOCK_SLACK_S


# Keys that a namespace joined with a separator would confuse (langgraph #8660, #8851).
COLLIDING_KEYS: list[FullKey] = [
    (("a", "b:c"), "k"),
    (("a:b", "c"), "k"),
    (("a", "b", "c"), "k"),
    (("a|b",), "k"),
    (("a", "b"), "k"),
    (("ab",), "k"),
    (("a",), "b:k"),
    (("a",), "b|k"),
    (("a", "b:k"), ""),
    (("a\x00b",), "k"),
    (("a", ""), "k"),
    (("", "a"), "k"),
    (("a",), "k"),
    ((), "a:k"),
    ((), "k"),
    (("",), "k"),
    (("a",), ""),
    (("a.b",), "k"),
    (("a/b",), "k"),
]


def test_namespaces_are_matched_exactly(node_cache: SharedMemoryNodeCache) -> None:
    assert len(set(COLLIDING_KEYS)) == len(COLLIDING_KEYS)
    node_cache.set({key: (i, None) for i, key in enumerate(COLLIDING_KEYS)})
    got = node_cache.get(COLLIDING_KEYS)
    assert got == {key: i for i, key in enumerate(COLLIDING_KEYS)}
    # Near misses of stored keys are misses.
    near = [(("a", "b", "c", ""), "k"), (("a:b:c",), "k"), (("a", "b"), "c:k"), (("b",), "k")]
    assert node_cache.get(near) == {}


def stored_namespaces(
    cache: SharedMemoryNodeCache, keys: Sequence[FullKey]
) -> set[tuple[str, ...]]:
    return {ns for ns, _ in cache.get(keys)}


def test_clear_namespaces_exactly(node_cache: SharedMemoryNodeCache) -> None:
    keys = [*COLLIDING_KEYS, (("a",), "second key in a"), (("a", "b"), "second key in a,b")]
    node_cache.set({key: (i, None) for i, key in enumerate(keys)})
    everything = {ns for ns, _ in keys}
    assert stored_namespaces(node_cache, keys) == everything

    node_cache.clear([("a",)])  # not ("a", "b"), ("ab",), ("a:b", ...), ("a|b",)
    assert stored_namespaces(node_cache, keys) == everything - {("a",)}

    node_cache.clear(namespaces=[("a", "b"), ()])
    assert stored_namespaces(node_cache, keys) == everything - {("a",), ("a", "b"), ()}

    node_cache.clear((("a|b",), ("missing", "namespace")))  # any Sequence of namespaces
    left = everything - {("a",), ("a", "b"), (), ("a|b",)}
    assert stored_namespaces(node_cache, keys) == left
    assert node_cache.get([(("a", "b:c"), "k"), (("a:b", "c"), "k")]) == {
        (("a", "b:c"), "k"): 0,
        (("a:b", "c"), "k"): 1,
    }

    node_cache.clear([])
    assert stored_namespaces(node_cache, keys) == left, "clear([]) cleared something"

    node_cache.clear(None)
    assert node_cache.get(keys) == {}

    node_cache.set({key: (i, None) for i, key in enumerate(keys)})
    node_cache.clear()
    assert node_cache.get(keys) == {}


def test_clear_is_seen_by_every_instance(make_node_cache: NodeCacheFactory) -> None:
    first = make_node_cache("shared")
    second = pickle.loads(pickle.dumps(first))
    try:
        assert second.path == first.path
        first.set({node_key("a"): ("va", None), node_key("b"): ("vb", None)})
        assert second.get([node_key("a"), node_key("b")]) == {
            node_key("a"): "va",
            node_key("b"): "vb",
        }
        second.clear([node_key("a")[0]])
        assert first.get([node_key("a"), node_key("b")]) == {node_key("b"): "vb"}
        second.clear(None)
        assert first.get([node_key("b")]) == {}
    finally:
        second.close()


async def test_async_twins(node_cache: SharedMemoryNodeCache) -> None:
    a, b, ab = (("a",), "k"), (("b",), "k"), (("a", "b"), "k")
    await node_cache.aset({a: ("va", None), b: ({"v": [1]}, 60), ab: ("vab", 0.3)})
    assert await node_cache.aget([a, b, ab, (("c",), "k")]) == {
        a: "va",
        b: {"v": [1]},
        ab: "vab",
    }
    assert node_cache.get([a]) == {a: "va"}  # one segment for both flavours

    start = time.monotonic()
    while await node_cache.aget([ab]):
        assert time.monotonic() - start < EXPIRY_DEADLINE_S, "0.3 s entry never expired"
        await asyncio.sleep(0.02)  # poll interval; the loop condition decides

    await node_cache.aclear([])
    assert await node_cache.aget([a, b]) == {a: "va", b: {"v": [1]}}
    await node_cache.aclear([("a",)])
    assert await node_cache.aget([a, b]) == {b: {"v": [1]}}
    await node_cache.aclear(None)
    assert await node_cache.aget([a, b]) == {}
    await node_cache.aset({a: ("again", None)})
    await node_cache.aclear()
    assert await node_cache.aget([a]) == {}


# -- bad input ------------------------------------------------------------------------

BAD_KEYS: list[Any] = [
    ("abc", "k"),  # a str namespace: would read as ("a", "b", "c")
    (["a"], "k"),  # a list is not a namespace tuple
    (("a", 1), "k"),
    (("a", None), "k"),
    (("a",), 1),
    (("a",), b"k"),
    (("a",), None),
    (("a",), "k", "extra"),
    (("a",),),
    "just a string",
    None,
    42,
]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_key_is_a_type_error(node_cache: SharedMemoryNodeCache, bad: Any) -> None:
    good = node_key("good")
    with pytest.raises(TypeError):
        node_cache.get([good, bad])
    with pytest.raises(TypeError):
        node_cache.set({good: ("v", None), bad: ("v", None)})


@pytest.mark.parametrize("bad", BAD_KEYS[:4], ids=repr)
async def test_bad_key_is_a_type_error_async(node_cache: SharedMemoryNodeCache, bad: Any) -> None:
    with pytest.raises(TypeError):
        await node_cache.aget([bad])
    with pytest.raises(TypeError):
        await node_cache.aset({bad: ("v", None)})


@pytest.mark.parametrize(
    "bad", ["a", ("a", ("b",)), [["a"]], [("a", 1)], [None], [("a",), "b"], 5], ids=repr
)
def test_bad_namespaces_to_clear_are_a_type_error(
    node_cache: SharedMemoryNodeCache, bad: Any
) -> None:
    key = node_key("kept")
    node_cache.set({key: ("v", None)})
    with pytest.raises(TypeError):
        node_cache.clear(bad)
    assert node_cache.get([key]) == {key: "v"}


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (-1, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        ("10", TypeError),
        (b"1", TypeError),
        ([1], TypeError),
    ],
    ids=repr,
)
def test_bad_ttl(node_cache: SharedMemoryNodeCache, ttl: Any, error: type[Exception]) -> None:
    key = node_key("ttl")
    with pytest.raises(error) as raised:
        node_cache.set({key: ("v", ttl)})
    if error is ValueError:
        assert isinstance(raised.value, ShmCacheError)
    assert node_cache.get([key]) == {}


def test_value_too_large_is_skipped_with_a_warning(
    node_cache: SharedMemoryNodeCache, caplog: pytest.LogCaptureFixture
) -> None:
    big, small = node_key("big"), node_key("small")
    before = node_cache.stats()
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        node_cache.set({big: (b"x" * (2 * MIB), None), small: ("fits", None)})
    assert node_cache.get([big, small]) == {small: "fits"}
    assert len(shmcache_warnings(caplog)) == 1, caplog.text
    assert node_cache.stats().skipped == before.skipped + 1


def test_unserializable_value_is_skipped_with_a_warning(
    node_cache: SharedMemoryNodeCache, caplog: pytest.LogCaptureFixture
) -> None:
    odd, plain = node_key("odd"), node_key("plain")
    node_cache.set({odd: ("previous", None)})
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        node_cache.set({odd: (Opaque(), None), plain: ("fine", None)})
    assert len(shmcache_warnings(caplog)) == 1, caplog.text
    got = node_cache.get([odd, plain])
    assert got[plain] == "fine"
    # Not stored: the key keeps its previous value (or is gone), never a broken one.
    assert got.get(odd, "previous") == "previous"


# -- values through LangGraph's serializer -------------------------------------------


@pytest.mark.parametrize("name", list(VALUES))
def test_value_types_round_trip(node_cache: SharedMemoryNodeCache, name: str) -> None:
    value = VALUES[name]
    key = node_key(name)
    node_cache.set({key: (value, None)})
    got = node_cache.get([key])[key]
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, list):
        assert [type(v) for v in got] == [type(v) for v in value]
    if isinstance(value, AIMessage):
        assert got.tool_calls == value.tool_calls
        assert got.usage_metadata == value.usage_metadata
    # A fresh object on every hit: mutating it does not reach the cache.
    if isinstance(got, (list, dict)):
        assert node_cache.get([key])[key] is not got


@pytest.mark.parametrize("name", [*VALUES, *INEXACT_VALUES])
def test_values_come_back_as_from_langgraphs_in_memory_cache(
    node_cache: SharedMemoryNodeCache, name: str
) -> None:
    value = {**VALUES, **INEXACT_VALUES}[name]
    key = node_key(name)
    reference = InMemoryCache()
    reference.set({key: (value, None)})
    node_cache.set({key: (value, None)})
    want, got = reference.get([key])[key], node_cache.get([key])[key]
    assert got == want
    assert type(got) is type(want)


def test_default_serde_is_langgraphs_without_pickle(node_cache: SharedMemoryNodeCache) -> None:
    assert isinstance(node_cache.serde, JsonPlusSerializer)
    assert node_cache.serde.pickle_fallback is False


class CountingSerializer(JsonPlusSerializer):
    """LangGraph's serializer, allow-listing this module's classes, counting its calls."""

    def __init__(self) -> None:
        super().__init__(
            pickle_fallback=False,
            allowed_msgpack_modules=[(__name__, "Report"), (__name__, "Record")],
        )
        self.dumps = 0
        self.loads = 0

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        self.dumps += 1
        return super().dumps_typed(obj)

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        self.loads += 1
        return super().loads_typed(data)


def test_values_go_through_the_given_serde(make_node_cache: NodeCacheFactory) -> None:
    serde = CountingSerializer()
    cache = make_node_cache("serde", serde=serde)
    assert cache.serde is serde
    value = {"report": VALUES["pydantic_model"], "record": VALUES["dataclass"]}
    cache.set({node_key("n"): (value, None)})
    assert serde.dumps >= 1
    assert cache.get([node_key("n")]) == {node_key("n"): value}
    assert serde.loads >= 1


# -- lifetime, files, kinds -------------------------------------------------------------


def test_segment_file_is_the_nodes_kind(
    make_node_cache: NodeCacheFactory, make_cache: CacheFactory, cache_dir: Path
) -> None:
    nodes = make_node_cache("same")
    assert Path(nodes.path).parent == cache_dir
    assert re.fullmatch(r"same\.v\d+\.nodes\.shm", Path(nodes.path).name), nodes.path
    assert Path(nodes.path).exists()
    assert Path(nodes.path).stat().st_mode & 0o777 == 0o600

    # An LLM cache of the same name is another file; clearing one leaves the other.
    llm = make_cache("same")
    assert llm.path != nodes.path
    nodes.set({node_key("n"): ("node value", None)})
    llm.update("prompt", "llm", [Generation(text="llm value")])
    llm.clear()
    assert nodes.get([node_key("n")]) == {node_key("n"): "node value"}
    llm.update("prompt", "llm", [Generation(text="llm value")])
    nodes.clear(None)
    assert llm.lookup("prompt", "llm") == [Generation(text="llm value")]
    assert nodes.get([node_key("n")]) == {}


def test_size_bytes_is_the_file_length(make_node_cache: NodeCacheFactory) -> None:
    cache = make_node_cache("sized", size_bytes=2 * MIB)
    assert os.path.getsize(cache.path) == 2 * MIB
    assert cache.stats().size_bytes == 2 * MIB


def test_stats_count_node_cache_traffic(node_cache: SharedMemoryNodeCache) -> None:
    before = node_cache.stats()
    node_cache.set({node_key("a"): (1, None), node_key("b"): (2, None)})
    node_cache.get([node_key("a"), node_key("b"), node_key("missing")])
    after = node_cache.stats()
    assert after.updates - before.updates == 2
    assert after.hits - before.hits == 2
    assert after.misses - before.misses == 1
    assert after.entries == 2
    assert 0 < after.used_bytes <= after.size_bytes == MIB


def test_close_unlink_and_pickle(make_node_cache: NodeCacheFactory) -> None:
    cache = make_node_cache("life")
    cache.set({node_key("n"): ("v", None)})
    clone = pickle.loads(pickle.dumps(cache))
    try:
        assert isinstance(clone, SharedMemoryNodeCache)
        assert clone.path == cache.path
        assert clone.get([node_key("n")]) == {node_key("n"): "v"}
    finally:
        clone.close()
    path = cache.path
    cache.close()
    cache.close()  # idempotent
    assert cache.path == path
    for call in (
        lambda: cache.get([node_key("n")]),
        lambda: cache.set({node_key("n"): ("v", None)}),
        lambda: cache.clear(None),
        cache.stats,
    ):
        with pytest.raises(ShmCacheError) as raised:
            call()
        assert isinstance(raised.value, ValueError)
    cache.unlink()
    assert not Path(path).exists()


async def test_closed_cache_async_calls_raise(make_node_cache: NodeCacheFactory) -> None:
    cache = make_node_cache("closed-async")
    cache.close()
    with pytest.raises(ShmCacheError):
        await cache.aget([node_key("n")])
    with pytest.raises(ShmCacheError):
        await cache.aset({node_key("n"): ("v", None)})
    with pytest.raises(ShmCacheError):
        await cache.aclear(None)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65])
def test_bad_name_is_a_value_error(cache_dir: Path, name: str) -> None:
    with pytest.raises(ShmCacheError) as raised:
        SharedMemoryNodeCache(name, directory=cache_dir, size_bytes=MIB)
    assert isinstance(raised.value, ValueError)


# -- a real StateGraph ------------------------------------------------------------------


class State(TypedDict, total=False):
    question: str
    messages: list[Any]
    report: Report
    record: Record
    blob: bytes
    extra: dict[str, Any]
    nothing: None
    answer: str


def record_run(config: RunnableConfig, what: str) -> None:
    """Append one line (pid, what) to the run file: any process's runs are counted."""
    fd = os.open(config["configurable"]["runs_file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{os.getpid()} {what}\n".encode())
    finally:
        os.close(fd)


def node_runs(runs_file: str | Path) -> list[str]:
    """Every run recorded in ``runs_file`` as ``"<pid> <what>"``, in order."""
    try:
        return Path(runs_file).read_text().splitlines()
    except FileNotFoundError:
        return []


def prepare(state: State) -> State:
    """Cheap, not cached."""
    return {"question": " ".join(state["question"].split())}


def expensive(state: State, config: RunnableConfig) -> State:
    """The node worth caching: returns the value types nodes really return."""
    question = state["question"]
    record_run(config, question)
    return {
        "messages": [HumanMessage(content=question, id="q-1"), tool_call_message(question)],
        "report": Report(title=f"about {question}", score=len(question) / 100, tags=["t"]),
        "record": Record(question=question, words=len(question.split()), ratios=[0.25]),
        "blob": question.encode() + b"\x00\xff",
        "extra": {"nested": {"list": [1, 2.5, None], "question": question}},
        "nothing": None,
    }


def finish(state: State) -> State:
    """Uses the cached values' attributes: a value that came back as the wrong type
    (a dict instead of the model or dataclass) fails the run."""
    report, record = state["report"], state["record"]
    call = state["messages"][-1].tool_calls[0]
    return {"answer": f"{report.title}: {record.words} words, tool {call['name']}"}


def build_graph(cache: BaseCache[Any], ttl: int | None = None) -> Any:
    builder = StateGraph(State)
    builder.add_node("prepare", prepare)
    builder.add_node("expensive", expensive, cache_policy=CachePolicy(ttl=ttl))
    builder.add_node("finish", finish)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "expensive")
    builder.add_edge("expensive", "finish")
    builder.add_edge("finish", END)
    return builder.compile(cache=cache)


def run_graph(graph: Any, question: str, runs_file: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Invoke ``graph`` (through ``stream``); return the final state and the names of
    the nodes LangGraph answered from the cache."""
    config: RunnableConfig = {"configurable": {"runs_file": str(runs_file)}}
    final: dict[str, Any] = {}
    cached: list[str] = []
    for mode, chunk in graph.stream(
        {"question": question}, config, stream_mode=["updates", "values"]
    ):
        if mode == "values":
            final = chunk
        elif chunk.get("__metadata__", {}).get("cached"):
            cached.extend(name for name in chunk if name != "__metadata__")
    return final, cached


def expected_state(question: str) -> dict[str, Any]:
    """What the graph returns for ``question``, computed without a cache."""
    state: dict[str, Any] = {"question": question}
    state.update(expensive(state, {"configurable": {"runs_file": os.devnull}}))
    state.update(finish(state))  # type: ignore[arg-type]
    return state


def assert_same_state(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    assert dict(got) == dict(want)
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    assert [type(m) for m in got["messages"]] == [HumanMessage, AIMessage]
    assert got["messages"][1].tool_calls == want["messages"][1].tool_calls


def test_cached_node_runs_once(node_cache: SharedMemoryNodeCache, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    graph = build_graph(node_cache)
    first, cached = run_graph(graph, "weather in Paris", runs)
    assert cached == []
    assert_same_state(first, expected_state("weather in Paris"))
    second, cached = run_graph(graph, "weather in Paris", runs)
    assert cached == ["expensive"]
    assert_same_state(second, first)  # every value type came back, class for class
    assert len(node_runs(runs)) == 1

    # The key is the node's input: whitespace normalised by `prepare` is the same input.
    assert (
        graph.invoke(
            {"question": "  weather   in Paris "}, {"configurable": {"runs_file": str(runs)}}
        )
        == first
    )
    assert len(node_runs(runs)) == 1

    run_graph(graph, "weather in Rome", runs)
    assert [r.split(" ", 1)[1] for r in node_runs(runs)] == ["weather in Paris", "weather in Rome"]

    # A graph compiled again (another worker would do this) finds the same entries.
    _, cached = run_graph(build_graph(node_cache), "weather in Rome", runs)
    assert cached == ["expensive"] and len(node_runs(runs)) == 2

    graph.clear_cache()  # clear(namespaces) with every node's exact namespace
    run_graph(graph, "weather in Paris", runs)
    assert len(node_runs(runs)) == 3
    node_cache.clear(None)
    run_graph(graph, "weather in Paris", runs)
    assert len(node_runs(runs)) == 4


async def test_cached_node_runs_once_async(
    node_cache: SharedMemoryNodeCache, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    graph = build_graph(node_cache)
    config: RunnableConfig = {"configurable": {"runs_file": str(runs)}}
    first = await graph.ainvoke({"question": "async question"}, config)
    second = await graph.ainvoke({"question": "async question"}, config)
    assert_same_state(second, first)
    assert_same_state(first, expected_state("async question"))
    assert len(node_runs(runs)) == 1
    # Sync and async runs share the entries.
    assert graph.invoke({"question": "async question"}, config) == first
    assert len(node_runs(runs)) == 1
    await graph.aclear_cache()
    await graph.ainvoke({"question": "async question"}, config)
    assert len(node_runs(runs)) == 2


def test_cache_policy_ttl_is_honoured(node_cache: SharedMemoryNodeCache, tmp_path: Path) -> None:
    ttl = 2
    runs = tmp_path / "runs"
    graph = build_graph(node_cache, ttl=ttl)
    start = time.monotonic()
    first, _ = run_graph(graph, "short-lived", runs)
    second, cached = run_graph(graph, "short-lived", runs)
    assert cached == ["expensive"], "a hit well within the ttl"
    assert_same_state(second, first)

    def ran_again() -> float | None:
        run_graph(graph, "short-lived", runs)
        return time.monotonic() if len(node_runs(runs)) == 2 else None

    again_at = poll_until("the cached node to expire", ran_again, EXPIRY_DEADLINE_S)
    assert again_at - start >= ttl - CLOCK_SLACK_S, "the entry expired before its ttl"
    # The new run stored a fresh entry with a fresh ttl.
    _, cached = run_graph(graph, "short-lived", runs)
    assert cached == ["expensive"]
    assert len(node_runs(runs)) == 2


def both_ways(state: State, config: RunnableConfig) -> State:
    record_run(config, config["metadata"]["langgraph_node"])
    return {"answer": f"answer to {state['question']}"}


def test_clearing_one_node_leaves_a_similarly_named_one(
    node_cache: SharedMemoryNodeCache, tmp_path: Path
) -> None:
    """graph.clear_cache(["a"]) clears ("__pregel_ns_writes", fn, "a") only, not the
    namespace of node "ab" (same function, a name that extends "a")."""
    runs = tmp_path / "runs"
    builder = StateGraph(State)
    builder.add_node("a", both_ways, cache_policy=CachePolicy())
    builder.add_node("ab", both_ways, cache_policy=CachePolicy())
    builder.add_edge(START, "a")
    builder.add_edge("a", "ab")
    builder.add_edge("ab", END)
    graph = builder.compile(cache=node_cache)
    config: RunnableConfig = {"configurable": {"runs_file": str(runs)}}

    def nodes_run() -> list[str]:
        return sorted(line.split(" ", 1)[1] for line in node_runs(runs))

    graph.invoke({"question": "q"}, config)
    graph.invoke({"question": "q"}, config)
    assert nodes_run() == ["a", "ab"]
    graph.clear_cache(["a"])
    graph.invoke({"question": "q"}, config)
    assert nodes_run() == ["a", "a", "ab"]
    graph.clear_cache(["ab"])
    graph.invoke({"question": "q"}, config)
    assert nodes_run() == ["a", "a", "ab", "ab"]


class PayloadState(TypedDict, total=False):
    kind: str
    payload: Any


def payload_node(state: PayloadState, config: RunnableConfig) -> PayloadState:
    record_run(config, state["kind"])
    if state["kind"] == "too large":
        return {"payload": "x" * (2 * MIB)}
    return {"payload": Opaque()}


@pytest.mark.parametrize("kind", ["too large", "not serializable"])
def test_value_the_cache_cannot_keep_never_fails_the_graph(
    node_cache: SharedMemoryNodeCache,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    runs = tmp_path / "runs"
    builder = StateGraph(PayloadState)
    builder.add_node("payload", payload_node, cache_policy=CachePolicy(ttl=60))
    builder.add_edge(START, "payload")
    builder.add_edge("payload", END)
    graph = builder.compile(cache=node_cache)
    config: RunnableConfig = {"configurable": {"runs_file": str(runs)}}
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        for _ in range(2):
            result = graph.invoke({"kind": kind}, config)
            if kind == "too large":
                assert result == {"kind": kind, "payload": "x" * (2 * MIB)}
            else:
                assert set(result) == {"kind", "payload"}
                assert isinstance(result["payload"], Opaque)
    assert len(node_runs(runs)) == 2, "a value that was not stored cannot be a hit"
    assert shmcache_warnings(caplog), caplog.text
    assert node_cache.stats().skipped >= 1


# -- across processes -------------------------------------------------------------------


def _graph_child(cache: SharedMemoryNodeCache, runs_file: str, question: str, conn: Any) -> None:
    """Process target: run the graph once, send back (status, pid, state, cached nodes).

    Under ``fork`` the cache is the parent's instance, inherited; under ``spawn`` it
    arrives pickled (by name). The child closes it: that detaches this process only.
    """
    try:
        state, cached = run_graph(build_graph(cache), question, runs_file)
        conn.send(("ok", os.getpid(), state, cached))
    except BaseException:
        conn.send(("error", os.getpid(), traceback.format_exc(), []))
    finally:
        conn.close()
        cache.close()


def run_in_child(
    method: str, cache: SharedMemoryNodeCache, runs_file: Path, question: str
) -> tuple[int, dict[str, Any], list[str]]:
    """Run the graph in a new ``method`` process; return its pid, state and cached nodes."""
    ctx = multiprocessing.get_context(method)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_graph_child, args=(cache, str(runs_file), question, send))
    process.start()
    send.close()
    try:
        if not receive.poll(CHILD_TIMEOUT_S):
            pytest.fail(f"{method} child {process.pid} sent nothing in {CHILD_TIMEOUT_S} s")
        status, pid, state, cached = receive.recv()
        assert status == "ok", f"{method} child {pid} failed:\n{state}"
        process.join(CHILD_TIMEOUT_S)
        assert process.exitcode == 0, f"{method} child {pid} exited {process.exitcode}"
        return pid, state, cached
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
        receive.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cached_node_runs_once_across_processes(
    make_node_cache: NodeCacheFactory, tmp_path: Path, method: str
) -> None:
    cache = make_node_cache(f"graph-{method}")
    runs = tmp_path / "runs"
    question = "what does a shared node cache save?"

    pid_a, state_a, cached_a = run_in_child(method, cache, runs, question)
    assert cached_a == []
    assert node_runs(runs) == [f"{pid_a} {question}"]
    assert_same_state(state_a, expected_state(question))

    pid_b, state_b, cached_b = run_in_child(method, cache, runs, question)
    assert pid_b != pid_a
    assert cached_b == ["expensive"]
    assert node_runs(runs) == [f"{pid_a} {question}"], "process B ran the node again"
    assert_same_state(state_b, state_a)

    # This process (where the segment was created) sees the children's entry too.
    state_here, cached_here = run_graph(build_graph(cache), question, runs)
    assert cached_here == ["expensive"]
    assert_same_state(state_here, state_a)

    other = "a different question"
    pid_c, state_c, cached_c = run_in_child(method, cache, runs, other)
    assert cached_c == []
    assert node_runs(runs) == [f"{pid_a} {question}", f"{pid_c} {other}"]
    assert_same_state(state_c, expected_state(other))

    cache.clear(None)
    pid_d, state_d, cached_d = run_in_child(method, cache, runs, question)
    assert cached_d == []
    assert node_runs(runs)[2:] == [f"{pid_d} {question}"]
    assert_same_state(state_d, state_a)

    # And the entry process D stored is a hit for yet another process.
    _, _, cached_e = run_in_child(method, cache, runs, question)
    assert cached_e == ["expensive"]
    assert len(node_runs(runs)) == 3
    assert cache.stats().entries == 1  # clear(None) removed the other question's
