"""Eviction keeps what is read (CLOCK): read entries survive write churn while the
live set fits; unread ones go first, oldest first."""

from __future__ import annotations

from _samples import CacheFactory
from langchain_core.outputs import Generation

import shmcache._arena

LLM = "llm"


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
    log_size = cache._arena.geometry.log_size
    value_bytes = cache._arena.record_bytes(len("x" * 330) + 60)  # ~460 B a record
    keys = [f"short {i}" for i in range(log_size // 2 // value_bytes)]
    for key in keys:
        cache.update(key, LLM, [Generation(text=key.ljust(330, "."))])
    for _ in range(2):  # warm-up, then the measured round
        hits = sum(cache.lookup(key, LLM) is not None for key in keys)
    assert cache.stats().evictions == 0
    assert hits == len(keys)
