"""The remote tier on a Redis Cluster (issue 11): three primaries started from the
same redis-server binary, reached through redis-py's ``RedisCluster``.

Entries spread over the nodes by their key digest (each entry shares its hash tag
with its lease, so the put-and-release script runs on one node); the clear log of
a cache lives on one node (its own tag); ``clear()`` scans every primary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _samples import text_generations
from coalesce_apps.coalesce_support import instrument_waits, poll_until
from langchain_core.outputs import Generation
from redis.cluster import RedisCluster
from test_remote_support import Cluster, unique_name

from shmcache import SharedMemoryCache
from shmcache._keys import key_digest

DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = Cluster().start()
    yield started
    started.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[RedisCluster]:
    rc = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    yield rc
    rc.close()


def local_has(cache: SharedMemoryCache, prompt: str, llm: str) -> bool:
    return cache._arena.find(key_digest(prompt, llm), time.time()) is not None


def test_two_hosts_share_clear_and_coalesce_on_a_cluster(
    cluster: Cluster, client: RedisCluster, tmp_path: Path
) -> None:
    name = unique_name("rc")
    opened = [
        SharedMemoryCache(name, directory=tmp_path / host, size_bytes=1 << 20, remote=client,
                          remote_timeout=0.5)
        for host in ("a", "b")
    ]
    a, b = opened
    try:
        assert a.remote is not None and a.remote.startswith("Redis Cluster")
        n = 30
        for i in range(n):
            a.update(f"p{i}", "L1" if i % 2 else "L2", text_generations(str(i)))
        for i in range(n):
            assert b.lookup(f"p{i}", "L1" if i % 2 else "L2") == text_generations(str(i))
        assert b.stats().remote_hits == n
        per_node = [node.client().dbsize() for node in cluster.nodes]
        assert sum(per_node) >= n and sum(1 for size in per_node if size) >= 2, per_node

        start = time.monotonic()
        a.clear(llm_string="L1")
        poll_until(lambda: not any(local_has(b, f"p{i}", "L1") for i in range(1, n, 2)),
                   1.0, "clear(llm_string=) on host B")
        delay = time.monotonic() - start
        assert all(local_has(b, f"p{i}", "L2") for i in range(0, n, 2))
        a.clear()
        poll_until(lambda: not any(local_has(b, f"p{i}", "L2") for i in range(0, n, 2)),
                   1.0, "clear() on host B")
        assert not list(client.scan_iter(match=f"shmcache:{name}:e:*"))
        print(f"cluster clear(llm_string=) reached host B in {delay * 1000:.0f} ms")

        # A burst on both hosts: one model call.
        waits = [instrument_waits(a), instrument_waits(b)]
        calls: list[int] = []
        barrier = threading.Barrier(4)
        answer = [Generation(text="cluster answer")]

        def caller(cache: SharedMemoryCache) -> list[Generation]:
            barrier.wait(DEADLINE_S)
            got = cache.lookup("burst", "L1")
            if got is not None:
                return got
            calls.append(1)
            poll_until(lambda: sum(w.count for w in waits) >= 2, DEADLINE_S, "waiters")
            cache.update("burst", "L1", answer)
            return answer

        with ThreadPoolExecutor(4) as pool:
            values = [f.result(DEADLINE_S) for f in
                      [pool.submit(caller, c) for c in (a, a, b, b)]]
        assert values == [answer] * 4 and len(calls) == 1
        assert a.stats().remote_errors == b.stats().remote_errors == 0
    finally:
        for cache in opened:
            cache.close()
            cache.unlink()
