"""SharedMemoryCache in one process: the §1 contract, argument checks, skips, TTL."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
from _samples import CacheFactory, chat_generation, text_generations
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, Generation, GenerationChunk

from shmcache import (
    CacheClosedError,
    CacheStats,
    SegmentCorruptError,
    SegmentPermissionError,
    SegmentSpaceError,
    SharedMemoryCache,
    ShmCacheError,
)
from shmcache._arena import FORMAT_VERSION


def test_hit_returns_new_list_of_fresh_equal_objects(cache: SharedMemoryCache) -> None:
    value = [chat_generation(), GenerationChunk(text="chunk")]
    cache.update("prompt", "llm", value)
    first = cache.lookup("prompt", "llm")
    second = cache.lookup("prompt", "llm")
    assert type(first) is list and first == value
    assert [type(g) for g in first] == [ChatGeneration, GenerationChunk]
    assert first is not second and first[0] is not second[0]
    assert first[0].message is not second[0].message
    # LangChain mutates what it gets on a hit: that must not reach the cache.
    first[0].message.usage_metadata["total_cost"] = 0  # type: ignore[attr-defined,index]
    assert cache.lookup("prompt", "llm") == value


def test_miss_and_keys_are_exact(cache: SharedMemoryCache) -> None:
    cache.update("ab", "c", text_generations("one"))
    assert cache.lookup("a", "bc") is None  # framing: no ambiguity between the two
    assert cache.lookup("ab", "c") == text_generations("one")
    assert cache.lookup("ab", "c ") is None


def test_any_str_is_a_key(cache: SharedMemoryCache) -> None:
    odd = ["", "\ud800 lone surrogate", "\x00nul", "emoji \U0001f600", "x" * 100_000]
    for i, key in enumerate(odd):
        cache.update(key, key, text_generations(str(i)))
    for i, key in enumerate(odd):
        assert cache.lookup(key, key) == text_generations(str(i))


def test_update_replaces(cache: SharedMemoryCache) -> None:
    cache.update("p", "l", text_generations("old"))
    cache.update("p", "l", text_generations("new"))
    assert cache.lookup("p", "l") == text_generations("new")
    assert cache.stats().entries == 1


@pytest.mark.parametrize("bad", [None, 1, b"bytes", ["list"]])
def test_non_str_keys_raise_type_error(cache: SharedMemoryCache, bad: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        cache.lookup(bad, "l")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        cache.lookup("p", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        cache.update(bad, "l", text_generations("x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["text", None, 42, [HumanMessage("hi")], [Generation(text="ok"), "str"], {"a": 1}]
)
def test_update_rejects_non_generation_sequences(cache: SharedMemoryCache, bad: object) -> None:
    cache.update("p", "l", text_generations("kept"))
    with pytest.raises(TypeError, match="sequence of Generation"):
        cache.update("p", "l", bad)  # type: ignore[arg-type]
    assert cache.lookup("p", "l") == text_generations("kept")


def _unstorable_values() -> list[tuple[str, list[Generation]]]:
    def with_kwargs(value: object) -> list[Generation]:
        return [ChatGeneration(message=AIMessage(content="x", additional_kwargs={"k": value}))]

    return [
        ("empty", []),
        ("tuple", with_kwargs((1, 2))),
        ("set", with_kwargs({1, 2})),
        ("int beyond 64 bits", with_kwargs(2**70)),
        ("non-str key", with_kwargs({1: "a"})),
        ("pydantic object", with_kwargs(Generation(text="inner"))),
        ("generation_info tuple", [Generation(text="x", generation_info={"t": (1,)})]),
    ]


@pytest.mark.parametrize(("why", "value"), _unstorable_values())
def test_unstorable_values_are_skipped_with_one_warning(
    cache: SharedMemoryCache,
    caplog: pytest.LogCaptureFixture,
    why: str,
    value: list[Generation],
) -> None:
    cache.update("p", "l", text_generations("kept"))
    before = cache.stats()
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        cache.update("p", "l", value)
    warnings = [r for r in caplog.records if r.name == "shmcache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, why
    assert cache.lookup("p", "l") == text_generations("kept")
    after = cache.stats()
    assert after.skipped == before.skipped + 1
    assert after.updates == before.updates


def test_subclass_outside_langchain_core_is_skipped(cache: SharedMemoryCache) -> None:
    class MyGeneration(Generation):
        pass

    cache.update("p", "l", [MyGeneration(text="x")])
    assert cache.lookup("p", "l") is None
    assert cache.stats().skipped == 1


def test_too_large_value_is_skipped(cache: SharedMemoryCache) -> None:
    cache.update("p", "l", text_generations("kept"))
    cache.update("big", "l", text_generations("x" * (600 * 1024)))
    assert cache.lookup("big", "l") is None
    assert cache.lookup("p", "l") == text_generations("kept")
    assert cache.stats().skipped == 1


def test_warnings_are_rate_limited(
    cache: SharedMemoryCache, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        for _ in range(5):
            cache.update("p", "l", [])
    assert len([r for r in caplog.records if r.name == "shmcache"]) == 1
    assert cache.stats().skipped == 5


def test_eviction_keeps_file_size_and_newest_entries(make_cache: CacheFactory) -> None:
    cache = make_cache(size_bytes=1 << 20)
    value = [chat_generation()]
    for i in range(3000):
        cache.update(f"prompt {i}", "llm", value)
    stats = cache.stats()
    assert os.path.getsize(cache.path) == 1 << 20 == stats.size_bytes
    assert stats.evictions > 0
    assert stats.updates == 3000
    assert stats.entries < 3000
    assert stats.used_bytes <= stats.size_bytes
    for i in range(2990, 3000):
        assert cache.lookup(f"prompt {i}", "llm") == value
    assert cache.lookup("prompt 0", "llm") is None
    assert cache.check() == []


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_ttl_expires_entries_at_the_writers_deadline(
    make_cache: CacheFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)
    writer = make_cache("ttl", ttl=10)
    reader = make_cache("ttl")  # no ttl of its own: the writer's expiry applies
    writer.update("p", "l", text_generations("v"))
    clock.now += 9.5
    assert reader.lookup("p", "l") == text_generations("v")
    clock.now += 1
    assert reader.lookup("p", "l") is None
    assert writer.lookup("p", "l") is None
    assert reader.stats().entries == 1  # expired entries count until reused


def test_clear_all_and_by_llm_string(cache: SharedMemoryCache) -> None:
    for i in range(20):
        cache.update(f"p{i}", "llm-a" if i % 2 else "llm-b", text_generations(str(i)))
    cache.clear(llm_string="llm-a")
    assert cache.stats().entries == 10
    assert all(cache.lookup(f"p{i}", "llm-a") is None for i in range(1, 20, 2))
    assert all(cache.lookup(f"p{i}", "llm-b") is not None for i in range(0, 20, 2))
    cache.clear(llm_string="not used")
    assert cache.stats().entries == 10
    cache.clear()
    stats = cache.stats()
    assert (stats.entries, stats.used_bytes) == (0, 0)
    assert stats.updates == 20  # clear resets no event counters
    assert all(cache.lookup(f"p{i}", "llm-b") is None for i in range(0, 20, 2))
    cache.update("p0", "llm-b", text_generations("again"))
    assert cache.lookup("p0", "llm-b") == text_generations("again")
    assert cache.check() == []


def test_clear_rejects_bad_arguments(cache: SharedMemoryCache) -> None:
    cache.update("p", "l", text_generations("kept"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        cache.clear(prompt="p")
    with pytest.raises(TypeError, match="llm_string must be a str"):
        cache.clear(llm_string=3)
    assert cache.lookup("p", "l") == text_generations("kept")


def test_stats_counts(cache: SharedMemoryCache) -> None:
    cache.update("p", "l", text_generations("v"))
    cache.lookup("p", "l")
    cache.lookup("p", "l")
    cache.lookup("q", "l")
    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.misses, stats.updates, stats.entries) == (2, 1, 1, 1)
    assert stats.used_bytes > 0 and stats.size_bytes == 1 << 20
    with pytest.raises(AttributeError):
        stats.hits = 5  # type: ignore[misc]


def test_close_and_unlink(cache_dir: Path) -> None:
    cache = SharedMemoryCache("closing", directory=cache_dir, size_bytes=1 << 20)
    path = cache.path
    cache.update("p", "l", text_generations("v"))
    cache.close()
    cache.close()  # idempotent
    assert cache.path == path
    for call in (
        lambda: cache.lookup("p", "l"),
        lambda: cache.update("p", "l", text_generations("v")),
        lambda: cache.clear(),
        lambda: cache.stats(),
    ):
        with pytest.raises(CacheClosedError) as info:
            call()
        assert isinstance(info.value, ShmCacheError) and isinstance(info.value, ValueError)
    assert os.path.exists(path)
    cache.unlink()
    assert not os.path.exists(path)
    cache.unlink()  # nothing left to remove: no error


def test_unlink_while_open_keeps_this_process_attached(cache_dir: Path) -> None:
    cache = SharedMemoryCache("unlinked", directory=cache_dir, size_bytes=1 << 20)
    cache.update("p", "l", text_generations("v"))
    cache.unlink()
    assert cache.lookup("p", "l") == text_generations("v")
    fresh = SharedMemoryCache("unlinked", directory=cache_dir, size_bytes=1 << 20)
    assert fresh.lookup("p", "l") is None  # a new, empty segment under the name
    fresh.close()
    fresh.unlink()
    cache.close()


def test_context_manager_closes(cache_dir: Path) -> None:
    with SharedMemoryCache("ctx", directory=cache_dir, size_bytes=1 << 20) as cache:
        cache.update("p", "l", text_generations("v"))
    assert cache.closed
    with pytest.raises(CacheClosedError):
        cache.lookup("p", "l")
    cache.unlink()


def test_pickle_round_trip_attaches_to_the_same_segment(cache: SharedMemoryCache) -> None:
    cache.update("p", "l", text_generations("v"))
    clone = pickle.loads(pickle.dumps(cache))
    try:
        assert clone.path == cache.path
        assert clone.lookup("p", "l") == text_generations("v")
        assert (clone.ttl, clone.lock_timeout) == (cache.ttl, cache.lock_timeout)
    finally:
        clone.close()


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 65, "sp ace", "é"])
def test_bad_names_raise_value_error(cache_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid cache name"):
        SharedMemoryCache(name, directory=cache_dir)


def test_name_type_and_keyword_only_arguments(cache_dir: Path) -> None:
    with pytest.raises(TypeError, match="name must be a str"):
        SharedMemoryCache(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SharedMemoryCache("n", 1 << 20)  # type: ignore[misc]
    cache = SharedMemoryCache(name="kw", directory=cache_dir, size_bytes=1 << 20)
    assert cache.name == "kw"
    cache.close()
    cache.unlink()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size_bytes": (1 << 20) - 1}, ValueError, "at least 1048576"),
        ({"size_bytes": 1.5}, TypeError, "size_bytes must be an int"),
        ({"ttl": 0}, ValueError, "ttl must be"),
        ({"ttl": -1}, ValueError, "ttl must be"),
        ({"ttl": "1"}, TypeError, "ttl must be a number"),
        ({"lock_timeout": 0}, ValueError, "lock_timeout must be"),
        ({"lock_timeout": float("nan")}, ValueError, "lock_timeout must be"),
    ],
)
def test_bad_options_raise(
    cache_dir: Path, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SharedMemoryCache("opts", directory=cache_dir, **kwargs)  # type: ignore[arg-type]
    assert not (cache_dir / f"opts.v{FORMAT_VERSION}.shm").exists()


def test_segment_is_private_and_exactly_sized(cache: SharedMemoryCache, cache_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
    info = os.stat(cache.path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 1 << 20
    assert Path(cache.path).name == f"test.v{FORMAT_VERSION}.shm"


def test_existing_segment_keeps_its_size(
    make_cache: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    make_cache("sized", size_bytes=2 << 20)
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        other = make_cache("sized", size_bytes=4 << 20)
    assert other.stats().size_bytes == 2 << 20
    assert "already exists with size_bytes=2097152" in caplog.text


def test_damaged_record_is_a_miss_and_check_reports_it(cache: SharedMemoryCache) -> None:
    for i in range(10):
        cache.update(f"p{i}", "l", text_generations(f"value {i}" * 20))
    with open(cache.path, "r+b") as handle:
        data = handle.read()
        at = data.index(b"value 3value 3")
        handle.seek(at)
        handle.write(b"VALUE")
    assert cache.lookup("p3", "l") is None
    assert all(cache.lookup(f"p{i}", "l") is not None for i in range(10) if i != 3)
    problems = cache.check()
    assert problems and any("crc" in p for p in problems)


def test_damaged_header_names_the_fixing_command(cache_dir: Path) -> None:
    cache = SharedMemoryCache("hdr", directory=cache_dir, size_bytes=1 << 20)
    cache.close()
    with open(cache.path, "r+b") as handle:
        handle.seek(30)
        handle.write(b"\xff\xff")
    with pytest.raises(SegmentCorruptError, match="shmcache rm hdr") as info:
        SharedMemoryCache("hdr", directory=cache_dir, size_bytes=1 << 20)
    assert isinstance(info.value, ShmCacheError)
    cache.unlink()


async def test_async_methods(cache: SharedMemoryCache) -> None:
    await cache.aupdate("p", "l", [chat_generation()])
    assert await cache.alookup("p", "l") == [chat_generation()]
    assert await cache.alookup("q", "l") is None
    await cache.aclear(llm_string="other")
    assert await cache.alookup("p", "l") is not None
    await cache.aclear()
    assert await cache.alookup("p", "l") is None
    with pytest.raises(TypeError):
        await cache.aupdate("p", "l", "not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await cache.aclear(bogus=1)


def test_update_after_a_miss_stores_under_its_own_key(cache: SharedMemoryCache) -> None:
    prompt, llm = "the prompt", "the llm"
    assert cache.lookup(prompt, llm) is None
    cache.update("another prompt", llm, text_generations("other"))  # not the missed key
    assert cache.lookup(prompt, llm) is None
    cache.update(prompt, llm, text_generations("mine"))  # the very objects that missed
    assert cache.lookup(prompt, llm) == text_generations("mine")
    assert cache.lookup("another prompt", llm) == text_generations("other")


@pytest.mark.parametrize("size", [(1 << 20) + 1, (1 << 20) + 4, 5_000_002])
def test_any_size_from_the_minimum_works_and_is_exact(make_cache: CacheFactory, size: int) -> None:
    cache = make_cache("odd-size", size_bytes=size)
    cache.update("p", "l", text_generations("v"))
    assert os.path.getsize(cache.path) == size == cache.stats().size_bytes
    again = make_cache("odd-size", size_bytes=size)
    assert again.lookup("p", "l") == text_generations("v")
    assert again.check() == []


def test_default_size_attaches_to_another_size_without_warning(
    make_cache: CacheFactory, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_cache("sized2", size_bytes=2 << 20)
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        other = SharedMemoryCache("sized2", directory=cache_dir)
    assert other.stats().size_bytes == 2 << 20
    assert caplog.records == []
    other.close()


def test_a_closed_cache_does_not_pickle(cache_dir: Path) -> None:
    cache = SharedMemoryCache("pickled", directory=cache_dir, size_bytes=1 << 20)
    cache.close()
    with pytest.raises(CacheClosedError):
        pickle.dumps(cache)
    cache.unlink()


def test_odd_things_at_the_segment_path_are_shmcache_errors(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    (cache_dir / f"isdir.v{FORMAT_VERSION}.shm").mkdir()
    with pytest.raises(SegmentPermissionError, match="is a directory"):
        SharedMemoryCache("isdir", directory=cache_dir)
    with pytest.raises(SegmentSpaceError, match="larger than any file"):
        SharedMemoryCache("huge", directory=cache_dir, size_bytes=2**70)
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"isdir.v{FORMAT_VERSION}.shm"]
