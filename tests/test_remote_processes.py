"""The remote tier across threads and real processes (issue 11).

* A burst of threads on two "hosts" (two segment directories, one Redis), released
  together: one model call; the computing caller finishes only once every other
  caller is *known* to wait (counted waits), never after a sleep.
* Processes on two hosts share through Redis; their remote counts are exact in
  ``stats()`` after they end by ``os._exit``.
* A computing process SIGKILLed: a process of the same host proves it dead and
  takes over at once; with no host-mate, another host's waiter takes over when the
  Redis lease lapses (``coalesce_timeout``).
* A writer process keeps writing while Redis is killed and restarted: it never sees
  an exception, and its writes reach Redis again by themselves.
* A cache opened before ``fork`` (gunicorn ``--preload``) works in the child.

Children are forked; each is SIGKILLed and reaped in ``finally`` (``forked``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from _hardening_helpers import forked, wait_exit
from _samples import text_generations
from coalesce_apps.coalesce_support import (
    WaitCounter,
    append_line,
    instrument_waits,
    poll_until,
    read_lines,
    receive,
    send,
)
from langchain_core.outputs import Generation
from test_remote_support import RedisServer, shared_server, unique_name

from shmcache import SharedMemoryCache, _remote
from shmcache._keys import key_digest

LLM = "llm-config"
PROMPT = "what is the weather in Paris?"
ANSWER = text_generations("mild")
SAFE_TIMEOUT_S = 0.5
DEADLINE_S = 20.0


@pytest.fixture
def server() -> RedisServer:
    return shared_server()


@pytest.fixture
def name() -> str:
    return unique_name("rp")


def open_host(
    root: Path, host: str, name: str, url: str, **kwargs: Any
) -> SharedMemoryCache:
    kwargs.setdefault("remote_timeout", SAFE_TIMEOUT_S)
    return SharedMemoryCache(name, directory=root / host, size_bytes=1 << 20, remote=url,
                             **kwargs)


def count_remote_polls(cache: SharedMemoryCache) -> WaitCounter:
    """Note each poll of Redis by a lookup that waits for another host's caller."""
    tier = cache._remote
    assert tier is not None
    counter = WaitCounter()
    poll = tier.poll

    def polling(*args: Any) -> Any:
        counter.note()
        return poll(*args)

    tier.poll = polling  # type: ignore[method-assign]
    return counter


@pytest.fixture
def caches() -> Iterator[list[SharedMemoryCache]]:
    opened: list[SharedMemoryCache] = []
    yield opened
    for cache in opened:
        cache.close()
        cache.unlink()


# -- one model call per burst, across hosts ---------------------------------------------


def test_cross_host_burst_costs_one_model_call(
    tmp_path: Path, server: RedisServer, name: str, caches: list[SharedMemoryCache]
) -> None:
    per_host = 4
    a = open_host(tmp_path, "a", name, server.url)
    b = open_host(tmp_path, "b", name, server.url)
    caches += [a, b]
    waits = [instrument_waits(a), instrument_waits(b)]
    polls = [count_remote_polls(a), count_remote_polls(b)]
    calls: list[int] = []
    barrier = threading.Barrier(2 * per_host)

    def everyone_waits() -> bool:
        # The computing caller's host-mates wait locally; on the other host one caller
        # polls Redis and its host-mates wait for it locally.
        local = sum(w.count for w in waits)
        return local >= 2 * per_host - 2 and sum(p.count for p in polls) >= 1

    def caller(cache: SharedMemoryCache) -> list[Generation]:
        barrier.wait(DEADLINE_S)
        got = cache.lookup(PROMPT, LLM)
        if got is not None:
            return got
        calls.append(threading.get_ident())  # the model call
        poll_until(everyone_waits, DEADLINE_S, "every other caller to wait")
        cache.update(PROMPT, LLM, ANSWER)
        return ANSWER

    with ThreadPoolExecutor(2 * per_host) as pool:
        results = [pool.submit(caller, c) for c in [a] * per_host + [b] * per_host]
        values = [f.result(DEADLINE_S) for f in results]
    assert values == [ANSWER] * (2 * per_host)
    assert len(calls) == 1
    sa, sb = a.stats(), b.stats()
    assert sa.coalesced + sb.coalesced == 2 * per_host - 1
    assert sa.remote_hits + sb.remote_hits == 1  # the other host's poller got it
    assert sa.hits + sb.hits == 2 * per_host - 1


# -- processes sharing ---------------------------------------------------------------------


def test_processes_on_two_hosts_share_and_count_exactly(
    tmp_path: Path, server: RedisServer, name: str
) -> None:
    n = 20

    def writer() -> int:
        cache = open_host(tmp_path, "a", name, server.url, ttl=60)
        for i in range(n):
            cache.update(f"p{i}", LLM, text_generations(f"v{i}"))
        return 0  # os._exit: no close(), no atexit flush

    def reader() -> int:
        cache = open_host(tmp_path, "b", name, server.url, coalesce=False)
        ok = all(cache.lookup(f"p{i}", LLM) == text_generations(f"v{i}") for i in range(n))
        ok = ok and cache.lookup("absent", LLM) is None
        return 0 if ok else 1

    for target in (writer, reader):
        with forked(target) as pid:
            assert wait_exit(pid, DEADLINE_S) == 0
    b = open_host(tmp_path, "b", name, server.url)
    try:
        stats = b.stats()
        assert (stats.remote_hits, stats.remote_misses, stats.remote_errors) == (n, 1, 0)
        assert (stats.hits, stats.misses, stats.updates) == (n, 1, n)
    finally:
        b.close()
        b.unlink()
        SharedMemoryCache(name, directory=tmp_path / "a", size_bytes=1 << 20).unlink()


# -- a computing process killed -----------------------------------------------------------


def _computing_child(root: Path, name: str, url: str, ready_w: int, timeout_s: float
                     ) -> Callable[[], int]:
    def child() -> int:
        cache = open_host(root, "a", name, url, coalesce_timeout=timeout_s)
        if cache.lookup(PROMPT, LLM) is not None:
            return 2
        send(ready_w, "computing")
        threading.Event().wait()  # "calls the model" until it is killed
        return 0

    return child


def _redis_lease(raw: redis.Redis, name: str) -> bytes | None:
    value = raw.get(_remote.Keys(name).lease(key_digest(PROMPT, LLM)))
    return value if isinstance(value, bytes) else None


def test_killed_computing_process_is_taken_over_by_its_host_at_once(
    tmp_path: Path, server: RedisServer, name: str, caches: list[SharedMemoryCache]
) -> None:
    timeout_s = 6.0  # the Redis lease would lapse only after this
    raw = server.client()
    r, w = os.pipe()
    try:
        with forked(_computing_child(tmp_path, name, server.url, w, timeout_s)) as pid:
            assert receive(r, DEADLINE_S) == "computing"
            assert _redis_lease(raw, name) is not None
            a2 = open_host(tmp_path, "a", name, server.url, coalesce_timeout=timeout_s)
            b = open_host(tmp_path, "b", name, server.url, coalesce_timeout=timeout_s)
            caches += [a2, b]
            local_waits, b_polls = instrument_waits(a2), count_remote_polls(b)
            took_over = threading.Event()
            go_on = threading.Event()

            def host_mate() -> list[Generation] | None:
                got = a2.lookup(PROMPT, LLM)
                if got is None:  # host A's new computing caller
                    took_over.set()
                    assert go_on.wait(DEADLINE_S)
                    a2.update(PROMPT, LLM, ANSWER)  # the same thread, as LangChain does
                return got

            with ThreadPoolExecutor(2) as pool:
                on_a = pool.submit(host_mate)
                on_b = pool.submit(b.lookup, PROMPT, LLM)
                poll_until(lambda: local_waits.count >= 1 and b_polls.count >= 1,
                           DEADLINE_S, "both to wait")
                os.kill(pid, 9)
                killed = time.monotonic()
                assert took_over.wait(DEADLINE_S)
                took = time.monotonic() - killed
                lease = _redis_lease(raw, name)
                assert lease is not None and lease.split(b":")[1] != b"0"  # now a2's
                go_on.set()
                assert on_a.result(DEADLINE_S) is None
                assert on_b.result(DEADLINE_S) == ANSWER
        print(f"host-mate took the killed process's leases over in {took:.2f} s")
        assert took < 3.0 < timeout_s
        assert _redis_lease(raw, name) is None
    finally:
        os.close(r)
        os.close(w)
        raw.close()


def test_killed_host_lease_lapses_for_other_hosts(
    tmp_path: Path, server: RedisServer, name: str, caches: list[SharedMemoryCache]
) -> None:
    timeout_s = 1.5
    raw = server.client()
    r, w = os.pipe()
    try:
        with forked(_computing_child(tmp_path, name, server.url, w, timeout_s)) as pid:
            assert receive(r, DEADLINE_S) == "computing"
            b = open_host(tmp_path, "b", name, server.url, coalesce_timeout=timeout_s)
            caches.append(b)
            polls = count_remote_polls(b)
            took: list[float] = []

            def other_host() -> list[Generation] | None:
                got = b.lookup(PROMPT, LLM)
                took.append(time.monotonic())
                if got is None:  # B computes, after the lapse
                    b.update(PROMPT, LLM, ANSWER)
                return got

            with ThreadPoolExecutor(1) as pool:
                on_b = pool.submit(other_host)
                poll_until(lambda: polls.count >= 1, DEADLINE_S, "B to wait")
                os.kill(pid, 9)  # host A is "gone": nobody there can prove it dead
                killed = time.monotonic()
                assert on_b.result(DEADLINE_S) is None
        print(f"another host took over {took[0] - killed:.2f} s after the kill "
              f"(coalesce_timeout={timeout_s})")
        assert took[0] - killed < timeout_s + 1.5
        assert _redis_lease(raw, name) is None
    finally:
        os.close(r)
        os.close(w)
        raw.close()


# -- Redis killed and restarted under a writer process --------------------------------------


def test_writer_process_survives_redis_restart(tmp_path: Path, name: str) -> None:
    server = RedisServer().start()
    progress = tmp_path / "progress.jsonl"
    stop = tmp_path / "stop"

    def writer() -> int:
        cache = open_host(tmp_path, "a", name, server.url, coalesce=False,
                          remote_timeout=0.05)
        i = 0
        while not stop.exists():
            i += 1
            cache.lookup(f"k{i}", LLM)
            cache.update(f"k{i}", LLM, text_generations(str(i)))
            if i % 20 == 0:
                append_line(progress, {"i": i})
            time.sleep(0.001)  # pacing, not synchronisation
        return 0

    def latest() -> int:
        lines = read_lines(progress)
        return int(lines[-1]["i"]) if lines else 0

    b = open_host(tmp_path, "b", name, server.url, coalesce=False)
    try:
        with forked(writer) as pid:
            poll_until(lambda: latest() > 0, DEADLINE_S, "the writer to run")
            assert b.lookup(f"k{latest()}", LLM) is not None
            server.kill()
            at_kill = latest()
            poll_until(lambda: latest() > at_kill + 40, DEADLINE_S, "writes during the outage")
            server.start()
            at_restart = latest()
            took = poll_until(lambda: latest() > at_restart and b.lookup(
                f"k{latest()}", LLM) is not None, DEADLINE_S, "writes to reach Redis again")
            print(f"writer's updates reached the restarted Redis after {took:.2f} s")
            stop.touch()
            assert wait_exit(pid, DEADLINE_S) == 0  # no exception ever escaped
        a = open_host(tmp_path, "a", name, server.url)
        try:
            assert a.stats().remote_errors >= 1  # the dead writer's counts are there
        finally:
            a.close()
            a.unlink()
    finally:
        b.close()
        b.unlink()
        server.stop()


# -- fork -------------------------------------------------------------------------------------


def test_cache_opened_before_fork_works_in_the_child(
    tmp_path: Path, server: RedisServer, name: str, caches: list[SharedMemoryCache]
) -> None:
    parent = open_host(tmp_path, "a", name, server.url)
    other_host = open_host(tmp_path, "b", name, server.url, coalesce=False)
    caches += [parent, other_host]
    parent.update("before", LLM, text_generations("0"))

    def child() -> int:
        assert parent.lookup("before", LLM) == text_generations("0")
        assert parent.lookup("in child", LLM) is None  # a miss that reaches Redis
        parent.update("in child", LLM, text_generations("1"))
        tier = parent._remote
        assert tier is not None and tier._poller is not None and tier._poller.is_alive()
        parent.close()
        return 0

    with forked(child) as pid:
        assert wait_exit(pid, DEADLINE_S) == 0
    assert other_host.lookup("in child", LLM) == text_generations("1")
    assert parent.lookup("in child", LLM) == text_generations("1")
    assert parent._remote is not None and parent._remote._poller is not None
    assert parent._remote._poller.is_alive()  # the parent's own poller is untouched
