"""Several processes sharing one cache: fork, spawn, a chat model, races, crashes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from _samples import CacheFactory, CountingChatModel, model_calls
from _workers import (
    checking_reader,
    endless_writer,
    invoke_chat_model,
    lookup_text,
    open_by_name_and_write,
    parse_text,
    racing_writer,
    write_and_close,
)
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache

CHILD_TIMEOUT_S = 60


def _ctx(method: str) -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(method)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_cache_made_before_the_child_works_in_it(make_cache: CacheFactory, method: str) -> None:
    cache = make_cache("shared")
    cache.update("from parent", "llm", [Generation(text="parent value")])
    with _ctx(method).Pool(1) as pool:
        assert pool.apply(lookup_text, (cache, "from parent", "llm")) == "parent value"
        pool.apply(write_and_close, (cache, "from child", "child value", 3))
    assert cache.lookup("from child", "llm") == [Generation(text="child value")]


def test_separate_processes_opening_by_name_share_entries(
    make_cache: CacheFactory, cache_dir: Path
) -> None:
    cache = make_cache("byname")
    with _ctx("spawn").Pool(2) as pool:
        pool.starmap(
            open_by_name_and_write,
            [("byname", str(cache_dir), f"p{i}", f"v{i}") for i in range(4)],
        )
    assert [lookup_text(cache, f"p{i}", "llm") for i in range(4)] == ["v0", "v1", "v2", "v3"]


def test_stats_include_other_processes_after_they_close(make_cache: CacheFactory) -> None:
    cache = make_cache("stats")
    with _ctx("fork").Pool(1) as pool:
        pool.apply(write_and_close, (cache, "p", "v", 5))
    cache.lookup("p", "llm")
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.updates) == (6, 1, 1)


def test_chat_model_runs_once_across_processes(
    make_cache: CacheFactory, cache_dir: Path, tmp_path: Path
) -> None:
    make_cache("chat")  # created here so teardown unlinks it
    count_file = str(tmp_path / "calls")
    args = ("chat", str(cache_dir), count_file, "What is the weather in Paris?")
    with _ctx("spawn").Pool(1) as pool:
        first = pool.apply(invoke_chat_model, args)
    with _ctx("spawn").Pool(1) as pool:
        second = pool.apply(invoke_chat_model, args)
    assert model_calls(count_file) == 1
    assert first == second
    assert first["type"] == "AIMessage"
    assert first["content"] == "answer to What is the weather in Paris?"
    assert first["tool_calls"][0]["name"] == "lookup"


def test_chat_model_hit_in_this_process_after_other_process_call(
    make_cache: CacheFactory, cache_dir: Path, tmp_path: Path
) -> None:
    cache = make_cache("chat2")
    count_file = str(tmp_path / "calls")
    with _ctx("spawn").Pool(1) as pool:
        pool.apply(invoke_chat_model, ("chat2", str(cache_dir), count_file, "hello"))
    model = CountingChatModel(count_file=count_file, cache=cache)
    message = model.invoke("hello")
    assert model_calls(count_file) == 1
    assert message.content == "answer to hello"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_racing_writers_and_readers_never_see_a_wrong_value(
    make_cache: CacheFactory, method: str
) -> None:
    # small: the log wraps many times.  The readers only peek: coalesce=False, as the
    # contract says for code that looks keys up and never stores them.
    cache = make_cache("race", size_bytes=1 << 20, coalesce=False)
    keys, seconds = 600, 2.0  # ~1 MB of live values: more than the log holds
    ctx = _ctx(method)
    with ctx.Pool(4) as pool:
        writers = [pool.apply_async(racing_writer, (cache, w, keys, seconds)) for w in (1, 2)]
        readers = [pool.apply_async(checking_reader, (cache, keys, seconds)) for _ in (1, 2)]
        updates = sum(w.get(CHILD_TIMEOUT_S) for w in writers)
        results = [r.get(CHILD_TIMEOUT_S) for r in readers]
    verified = sum(v for v, _ in results)
    assert updates > 100 and verified > 100
    stats = cache.stats()
    assert stats.updates == updates
    assert stats.evictions > 0
    for key in range(keys):
        found = cache.lookup(f"prompt {key}", "llm")
        if found is not None:
            assert parse_text(found[0].text)[0] == key
    assert cache.check() == []


@pytest.mark.timeout(120)
def test_writers_killed_at_random_instants_leave_a_sound_cache(
    make_cache: CacheFactory, cache_dir: Path
) -> None:
    cache = make_cache("crash", lock_timeout=2.0)
    rng = random.Random(1234)
    ctx = _ctx("fork")
    kills = 0
    for _ in range(25):
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=endless_writer, args=("crash", str(cache_dir), write_fd))
        child.start()
        try:
            os.close(write_fd)
            assert os.read(read_fd, 1) == b"1"  # it has written at least once
            # Let it get somewhere random inside its write loop, then kill it.
            deadline = time.monotonic() + rng.uniform(0, 0.02)
            while time.monotonic() < deadline:
                pass
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            kills += 1
        finally:
            child.join(10)
            os.close(read_fd)
        assert child.exitcode == -signal.SIGKILL
        # The next writer proceeds and every stored value is intact.
        cache.update("after crash", "llm", [Generation(text="still writable")])
        assert lookup_text(cache, "after crash", "llm") == "still writable"
        checking_reader(cache, 50, 0.01)
        for key in range(50):
            found = cache.lookup(f"prompt {key}", "llm")
            if found is not None:
                assert parse_text(found[0].text)[0] == key
    assert kills == 25
    assert cache.check() == []


def test_lock_is_per_process_after_fork(make_cache: CacheFactory) -> None:
    """A child must not share its parent's flock (DESIGN §3): it waits, then times out."""
    cache = make_cache("forklock", lock_timeout=0.2)
    assert cache._lock.acquire(1.0)
    try:
        with _ctx("fork").Pool(1) as pool:
            took = pool.apply(_try_lock_in_child, (cache,))
        assert took is False
    finally:
        cache._lock.release()
    with _ctx("fork").Pool(1) as pool:
        assert pool.apply(_try_lock_in_child, (cache,)) is True


def _try_lock_in_child(cache: SharedMemoryCache) -> bool:
    if cache._lock.acquire(0.2):
        cache._lock.release()
        return True
    return False


def _count_then_die(cache: SharedMemoryCache) -> None:
    cache.update("p", "llm", [Generation(text="v")])
    for _ in range(7):
        cache.lookup("p", "llm")
    cache.lookup("absent", "llm")
    os._exit(0)  # no close, no atexit: what a terminated pool worker does


def test_counts_of_a_process_that_never_closed_are_in_stats(make_cache: CacheFactory) -> None:
    cache = make_cache("slots")
    child = _ctx("fork").Process(target=_count_then_die, args=(cache,))
    child.start()
    child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.updates) == (7, 1, 1)
    # Its slot is reclaimed (folded, not lost) once the table needs it.
    others = [make_cache("slots") for _ in range(3)]
    assert all(other.stats().hits == 7 for other in others)


def _read_once(cache: SharedMemoryCache) -> None:
    cache.lookup("p", "llm")
    cache.lookup("absent", "llm")


def test_a_forked_readers_counts_show_at_once(make_cache: CacheFactory) -> None:
    """A child's first lookup claims its own counter slot: no flush needed."""
    cache = make_cache("fresh-slot")
    cache.update("p", "llm", [Generation(text="v")])
    with _ctx("fork").Pool(1) as pool:
        pool.apply(_read_once, (cache,))
        stats = cache.stats()  # the worker is still alive and never closed
    assert (stats.hits, stats.misses) == (1, 1)
