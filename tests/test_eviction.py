"""Eviction keeps what is read (S3-FIFO on two logs): read entries survive write churn
while the live set fits; unread ones go first, oldest first."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
from _samples import CacheFactory
from langchain_core.outputs import Generation

import shmcache._arena

LLM = "llm"


@pytest.fixture(autouse=True)
def _uncompressed() -> Iterator[None]:
    """These tests count record bytes: values are stored as they are (where the
    codec compresses, its switch is turned off for the test)."""
    try:
        compress = importlib.import_module("shmcache._compress")
    except ImportError:
        yield
        return
    was = compress.is_enabled()
    compress.set_enabled(False)
    try:
        yield
    finally:
        compress.set_enabled(was)


def _value(tag: str, size: int) -> list[Generation]:
    return [Generation(text=(tag + " ") * (size // (len(tag) + 1)))]


def test_read_entries_survive_rewrites_of_other_keys(make_cache: CacheFactory) -> None:
    """The measured FIFO defect: 200 entries read every round were all evicted by
    rewrites of 50 other keys in a segment several times larger than the live set."""
    cache = make_cache("clock", size_bytes=1 << 20, coalesce=False)
    hot = [f"hot {i}" for i in range(200)]  # ~300 KB live in a ~0.9 MB log
    for key in hot:
        cache.update(key, LLM, _value(key, 1400))
    hits_last_round = 0
    for round_ in range(60):  # ~4 MB of rewrites: the log wraps several times
        hits_last_round = sum(cache.lookup(key, LLM) == _value(key, 1400) for key in hot)
        for j in range(50):
            cache.update(f"churn {j}", LLM, _value(f"churn {j} {round_}", 1400))
    assert hits_last_round == len(hot)
    assert cache._arena.counter(shmcache._arena.W_REINSERTED) > 0  # the log did wrap
    assert cache.check() == []


def test_unread_entries_go_first_oldest_first(make_cache: CacheFactory) -> None:
    cache = make_cache("clock2", size_bytes=1 << 20, coalesce=False)
    keys = [f"k{i}" for i in range(400)]  # ~600 KB of a ~0.9 MB log
    for key in keys:
        cache.update(key, LLM, _value(key, 1400))
    read = keys[:100:2]  # the oldest quarter, every other one, read once
    for key in read:
        assert cache.lookup(key, LLM) is not None
    unread_old = [k for k in keys[:100] if k not in read]
    j = 0
    while cache.stats().evictions < len(unread_old):
        cache.update(f"new {j}", LLM, _value(f"new {j}", 1400))
        j += 1
    assert cache.stats().evictions == len(unread_old)
    assert all(cache.lookup(key, LLM) is None for key in unread_old)
    assert all(cache.lookup(key, LLM) is not None for key in read)
    assert all(cache.lookup(key, LLM) is not None for key in keys[100:])
    assert cache.check() == []


def test_a_rewritten_entry_is_unread_again(make_cache: CacheFactory) -> None:
    """Writing a key clears its reference: a value nobody read since it was written
    gets no protection from reads of its predecessor."""
    cache = make_cache("clock3", size_bytes=1 << 20, coalesce=False)
    cache.update("k", LLM, _value("old", 1400))
    assert cache.lookup("k", LLM) is not None
    cache.update("k", LLM, _value("new", 1400))
    for j in range(800):  # wrap the log more than once without reading "k"
        cache.update(f"f {j}", LLM, _value(f"f {j}", 1400))
    assert cache.lookup("k", LLM) is None


def test_short_answers_that_fit_in_half_the_log_all_hit(make_cache: CacheFactory) -> None:
    """Short answers fill 8-slot buckets unevenly long before the log is full; with
    two-choice buckets a working set in half the log is all there after warm-up."""
    cache = make_cache("short", size_bytes=1 << 20, coalesce=False)
    data_bytes = cache._arena.geometry.data_bytes  # both logs
    value_bytes = cache._arena.record_bytes(len("x" * 330) + 60)  # ~460 B a record
    keys = [f"short {i}" for i in range(data_bytes // 2 // value_bytes)]
    for key in keys:
        cache.update(key, LLM, [Generation(text=key.ljust(330, "."))])
    for _ in range(2):  # warm-up, then the measured round
        hits = sum(cache.lookup(key, LLM) is not None for key in keys)
    assert cache.stats().evictions == 0
    assert hits == len(keys)


def _slot_words(cache: object, prompt: str) -> list[tuple[int, int]]:
    """``(tag word, position word)`` of both candidate slots' matches for ``prompt``
    (live tag or ghost tag), read from the index (private layout, format 3)."""
    from shmcache._keys import key_digest

    arena = cache._arena  # type: ignore[attr-defined]
    digest = key_digest(prompt, LLM)
    tag = (int.from_bytes(digest[:8], "little")) | 1
    found = []
    for bucket in arena._buckets(digest):
        for i in range(shmcache._arena.SLOTS_PER_BUCKET):
            word = int(arena.words[bucket + 1 + i])
            if word in (tag, tag ^ 1):
                found.append((word, int(arena.words[bucket + 9 + i])))
    return found


def test_one_hit_wonders_do_not_push_out_read_entries(make_cache: CacheFactory) -> None:
    """S3-FIFO: a stream of keys written once and never read passes through the small
    log; entries that keep being read stay in the main log, all of them, while the
    stream writes ten times the data space."""
    cache = make_cache("ohw", size_bytes=1 << 20, coalesce=False)
    data_bytes = cache._arena.geometry.data_bytes
    hot = [f"hot {i}" for i in range(150)]  # ~230 KB: a quarter of the data space
    for key in hot:
        cache.update(key, LLM, _value(key, 1400))
    j = 0
    for _ in range(20):  # each round: every hot key read once, half a data space written
        assert sum(cache.lookup(key, LLM) is not None for key in hot) == len(hot)
        for _ in range(data_bytes // 2 // 1500):
            cache.update(f"once {j}", LLM, _value(f"once {j}", 1400))
            j += 1
    assert sum(cache.lookup(key, LLM) is not None for key in hot) == len(hot)
    assert cache.stats().evictions >= j - data_bytes // 1400  # the stream did churn
    assert cache._arena.counter(shmcache._arena.W_PROMOTED) > 0
    assert cache.check() == []


def test_an_evicted_unread_key_leaves_a_ghost_that_never_answers(
    make_cache: CacheFactory,
) -> None:
    """A key dropped unread from the small log leaves a ghost slot: lookups miss, and
    the key's next write goes straight to the main log (counted in W_GHOST_HITS)."""
    cache = make_cache("ghost", size_bytes=1 << 20, coalesce=False)
    hot = [f"hot {i}" for i in range(300)]
    for key in hot:  # fill most of the main log with read entries
        cache.update(key, LLM, _value(key, 1400))
        assert cache.lookup(key, LLM) is not None
        assert cache.lookup(key, LLM) is not None
    j = 0
    ghosts: list[str] = []
    while not ghosts:
        cache.update(f"cold {j}", LLM, _value(f"cold {j}", 1400))
        j += 1
        ghosts = [
            f"cold {k}" for k in range(j)
            if [w for w, _ in _slot_words(cache, f"cold {k}") if not w & 1]
        ]
    ghost = ghosts[0]
    assert cache.lookup(ghost, LLM) is None  # a ghost never answers
    assert cache.check() == []
    before = cache._arena.counter(shmcache._arena.W_GHOST_HITS)
    cache.update(ghost, LLM, _value(ghost, 1400))
    assert cache._arena.counter(shmcache._arena.W_GHOST_HITS) == before + 1
    [(tag, position)] = _slot_words(cache, ghost)
    assert tag & 1 and position >= shmcache._arena._MAIN_BASE  # live, in the main log
    assert cache.lookup(ghost, LLM) == _value(ghost, 1400)
    assert cache.check() == []


def test_check_names_a_damaged_ghost(make_cache: CacheFactory) -> None:
    """Ghost slots carry a check value: damage to one is reported, never answered."""
    cache = make_cache("ghostdmg", size_bytes=1 << 20, coalesce=False)
    j = 0
    found: list[tuple[int, int]] = []
    while not found:
        cache.update(f"k {j}", LLM, _value(f"k {j}", 1400))
        j += 1
        if cache.stats().evictions:
            arena = cache._arena
            found = [
                (b, i)
                for b in range(arena._index_word, arena._index_word + arena.n_buckets * 32, 32)
                for i in range(shmcache._arena.SLOTS_PER_BUCKET)
                if arena.words[b + 1 + i] and not arena.words[b + 1 + i] & 1
            ]
    bucket, i = found[0]
    arena = cache._arena
    arena.words[bucket + 17 + i] ^= 1 << 20  # the ghost's clock stamp
    assert any("damaged ghost" in p for p in cache.check())
    assert all(cache.lookup(f"k {k}", LLM) in (None, _value(f"k {k}", 1400)) for k in range(j))
