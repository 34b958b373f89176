"""The compiled lookup (``shmcache._speedups``) and its pure-Python twin agree.

``Arena.find`` is the C ``Finder.find`` when the extension is built and
``Arena.find_python`` otherwise.  Both must give the same answer for every state a
record can be in — live, expired, overwritten, evicted, torn by damage to any byte
of the index or the log — and raise the same frequency byte on a hit.  The pure-Python
path also runs whole, in a child process with ``SHMCACHE_PURE_PYTHON=1``, and the
two share one segment.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.outputs import Generation

import shmcache._arena as arena_mod
from shmcache import SharedMemoryCache, _accel
from shmcache._keys import key_digest

LLM = "llm"
REPO = Path(__file__).resolve().parent.parent


def _have_compiler() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_paths().get("include", "")
    return shutil.which(cc) is not None and os.path.exists(os.path.join(include, "Python.h"))


needs_compiled = pytest.mark.skipif(
    not _accel.compiled(),
    reason="the C extension is not built here (test_extension_built says whether it should be)",
)


def test_extension_built_where_a_compiler_is() -> None:
    """A machine with a C compiler and Python's headers gets the compiled lookup.

    The extension is optional at build time, so a broken build would otherwise pass
    unnoticed and every other test would measure only the fallback.
    """
    if os.environ.get(_accel.PURE_PYTHON_ENV, "") not in ("", "0"):
        assert not _accel.compiled()
        return
    if not _have_compiler():
        pytest.skip("no C compiler or Python.h here: the pure-Python paths are the product")
    assert _accel.compiled(), "shmcache._speedups failed to build: see the pip log"


@pytest.fixture()
def cache(tmp_path: Path) -> Iterator[SharedMemoryCache]:
    c = SharedMemoryCache("speed", directory=tmp_path, size_bytes=1 << 20, coalesce=False)
    try:
        yield c
    finally:
        c.close()


def _fill(cache: SharedMemoryCache, n: int, now: float) -> list[bytes]:
    digests = []
    for i in range(n):
        cache.update(f"p{i}", LLM, [Generation(text=f"value {i} " + "x" * (i * 37 % 900))])
        digests.append(key_digest(f"p{i}", LLM))
    # Some keys never stored, some overwritten (their old records stay in the log).
    for i in range(0, n, 3):
        cache.update(f"p{i}", LLM, [Generation(text=f"again {i}")])
    digests += [key_digest(f"absent{i}", LLM) for i in range(10)]
    return digests


def _both(arena: arena_mod.Arena, digest: bytes, now: float) -> tuple[object, object]:
    compiled = arena.find(digest, now)
    python = arena.find_python(digest, now)
    as_bytes = [bytes(x) if isinstance(x, memoryview) else x for x in (compiled, python)]
    return as_bytes[0], as_bytes[1]


@needs_compiled
def test_same_answers_on_a_healthy_segment(cache: SharedMemoryCache) -> None:
    now = time.time()
    digests = _fill(cache, 60, now)
    arena = cache._arena
    hits = 0
    for digest in digests:
        compiled, python = _both(arena, digest, now)
        assert compiled == python
        hits += compiled is not None
    assert hits == 60  # every stored key, none of the absent ones
    # Expiry: a record is a miss at and after its expiry instant, in both.
    later = now + 10_000.0
    for digest in digests:
        assert _both(arena, digest, later) == _both(arena, digest, now)


@needs_compiled
def test_expired_records_miss_in_both(tmp_path: Path) -> None:
    with SharedMemoryCache("ttl", directory=tmp_path, size_bytes=1 << 20, ttl=60) as c:
        c.update("p", LLM, [Generation(text="soon gone")])
        digest = key_digest("p", LLM)
        now = time.time()
        assert _both(c._arena, digest, now)[0] is not None
        assert _both(c._arena, digest, now + 61) == (None, None)


@needs_compiled
def test_a_hit_raises_the_frequency_once_per_read_up_to_the_cap(
    cache: SharedMemoryCache,
) -> None:
    cache.update("p", LLM, [Generation(text="v")])
    digest = key_digest("p", LLM)
    arena = cache._arena
    refs = [
        b * 8 + arena_mod._REFS_AT_BYTE + i
        for b in (bucket for bucket in arena._buckets(digest))
        for i in range(arena_mod.SLOTS_PER_BUCKET)
    ]

    def freqs() -> list[int]:
        return [arena._bytes[r] for r in refs]

    assert sum(freqs()) == 0  # a new record starts unread
    seen = []
    for _ in range(5):
        assert arena.find(digest, time.time()) is not None
        seen.append(sum(freqs()))
    assert seen == [1, 2, 3, 3, 3]


@needs_compiled
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    damage=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=12,
    ),
    region=st.sampled_from(["index", "log", "anywhere"]),
)
def test_same_answers_after_damage(
    tmp_path_factory: pytest.TempPathFactory,
    damage: list[tuple[float, int]],
    region: str,
) -> None:
    """Bytes overwritten anywhere: the two lookups still agree, key by key."""
    directory = tmp_path_factory.mktemp("dmg")
    with SharedMemoryCache("d", directory=directory, size_bytes=1 << 20, coalesce=False) as c:
        now = time.time()
        digests = _fill(c, 40, now)
        arena = c._arena
        g = arena.geometry
        start, stop = {
            "index": (g.index_offset, g.log_offset),
            "log": (g.log_offset, len(arena._mm)),
            "anywhere": (0, len(arena._mm)),
        }[region]
        for where, value in damage:
            arena._mm[start + int(where * (stop - start))] = value
        for digest in digests:
            compiled, python = _both(arena, digest, now)
            assert compiled == python


@needs_compiled
def test_records_pushed_out_of_the_log_miss_in_both(tmp_path: Path) -> None:
    with SharedMemoryCache("ev", directory=tmp_path, size_bytes=1 << 20, coalesce=False) as c:
        now = time.time()
        first = _fill(c, 20, now)
        for i in range(3000):  # ~3 MB through a 1 MiB segment
            c.update(f"churn{i}", LLM, [Generation(text="y" * 1000)])
        arena = c._arena
        results = [_both(arena, d, now) for d in first]
        assert all(a == b for a, b in results)
        assert any(a is None for a, _ in results)


@needs_compiled
def test_the_finder_refuses_bad_input(cache: SharedMemoryCache) -> None:
    arena = cache._arena
    with pytest.raises(TypeError, match="32 bytes"):
        arena.find(b"short", time.time())
    with pytest.raises(TypeError, match="32 bytes"):
        arena.find("x" * 32, time.time())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        arena.find(b"\0" * 32, "now")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="2 arguments"):
        arena.find(b"\0" * 32)  # type: ignore[call-arg]
    g = arena.geometry
    too_many = arena._n_buckets * 1000
    with pytest.raises(ValueError, match="does not fit"):
        _accel.Finder(
            arena._mm, too_many, arena._index_word, arena._main_t, arena._small_t, None
        )
    finder = _accel.Finder(
        arena._mm, g.n_buckets, arena._index_word, arena._main_t, arena._small_t, None
    )
    finder.release()
    with pytest.raises(ValueError, match="released"):
        finder.find(b"\0" * 32, time.time())


@needs_compiled
def test_header_crc_matches_zlib() -> None:
    from shmcache import _speedups

    rng = random.Random(7)
    for n in (0, 1, 7, 64, 65, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        start = rng.randrange(1 << 32)
        assert _speedups.crc32(data) == zlib.crc32(data)
        assert _speedups.crc32(data, start) == zlib.crc32(data, start)


def test_the_mapping_closes_after_close(tmp_path: Path) -> None:
    """The finder's hold on the mapping ends at close: nothing stays mapped."""
    c = SharedMemoryCache("closing", directory=tmp_path, size_bytes=1 << 20)
    c.update("p", LLM, [Generation(text="v")])
    mapping = c._engine._mapped.mapping  # type: ignore[union-attr]
    c.close()
    assert mapping.closed


_CHILD = textwrap.dedent(
    """
    import sys
    from langchain_core.outputs import Generation
    from shmcache import SharedMemoryCache, _accel
    c = SharedMemoryCache("mixed", directory=sys.argv[1], size_bytes=1 << 20)
    assert not _accel.compiled(), "SHMCACHE_PURE_PYTHON=1 did not take"
    assert c.lookup("from-parent", "llm") == [Generation(text="parent wrote")]
    c.update("from-child", "llm", [Generation(text="child wrote")])
    c.close()
    print("ok")
    """
)


@pytest.mark.timeout(60)
def test_pure_python_and_compiled_processes_share_a_segment(tmp_path: Path) -> None:
    with SharedMemoryCache("mixed", directory=tmp_path, size_bytes=1 << 20) as c:
        c.update("from-parent", LLM, [Generation(text="parent wrote")])
        env = dict(os.environ, **{_accel.PURE_PYTHON_ENV: "1"})
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=50,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"
        assert c.lookup("from-child", LLM) == [Generation(text="child wrote")]


# The fallback's own run: the modules that exercise the lock-free reader, the lease
# step and the codec's checks hardest (damage, crash recovery, eviction, hostile
# input, coalescing, unstorable values) with the C extension turned off.
_FALLBACK_MODULES = [
    "tests/test_hardening_damage.py",
    "tests/test_hardening_hostile.py",
    "tests/test_eviction.py",
    "tests/test_cache.py",
    "tests/test_coalesce.py",
    "tests/test_codec.py",
]


@pytest.mark.timeout(900)
def test_pure_python_fallback_passes_the_reader_tests() -> None:
    if os.environ.get(_accel.PURE_PYTHON_ENV, "") not in ("", "0"):
        pytest.skip("this whole run is already pure Python")
    env = dict(os.environ, **{_accel.PURE_PYTHON_ENV: "1"})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *_FALLBACK_MODULES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=880,
    )
    tail = "\n".join(out.stdout.splitlines()[-15:])
    assert out.returncode == 0, tail
    assert " passed" in tail


_CLOSE_RACE = textwrap.dedent(
    """
    import sys, threading
    from langchain_core.outputs import Generation
    from shmcache import CacheClosedError, SharedMemoryByteStore, SharedMemoryCache
    from shmcache.langgraph import SharedMemoryNodeCache
    directory, rounds, front_end = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    big_text = "z" * 200_000  # zlib.crc32 lets go of the GIL for it

    def opened(name):
        if front_end == "llm":
            c = SharedMemoryCache(name, directory=directory, size_bytes=4 << 20)
            c.update("p", "llm", [Generation(text=big_text)])
            return c, lambda: c.lookup("p", "llm") is not None
        if front_end == "bytes":
            c = SharedMemoryByteStore(name, directory=directory, size_bytes=4 << 20)
            c.mset([("k", big_text.encode())])
            return c, lambda: c.mget(["k"])[0] is not None
        c = SharedMemoryNodeCache(name, directory=directory, size_bytes=4 << 20)
        c.set({(("ns",), "k"): (big_text, None)})
        return c, lambda: bool(c.get([(("ns",), "k")]))

    for round_ in range(rounds):
        c, hit_once = opened(f"race{round_}")
        hit = threading.Event()
        errors = []
        def reader():
            try:
                while True:
                    if hit_once():
                        hit.set()
            except CacheClosedError:
                pass
            except BaseException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                hit.set()
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert hit.wait(20), "no hit"
        c.close()
        t.join(20)
        assert not t.is_alive(), "the reader did not stop"
        assert not errors, errors
    print("ok")
    """
)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("front_end", ["llm", "bytes", "nodes"])
@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure-python"])
def test_closing_while_another_thread_looks_up(
    tmp_path: Path, pure: bool, front_end: str
) -> None:
    """close() in one thread while another is looking up: the lookup ends with
    CacheClosedError, never another error (a released view's ValueError, before)
    and never a crash (the compiled lookup must not touch the mapping once it was
    released, which its checksum call — run without the GIL — makes possible)."""
    if not pure and not _accel.compiled():
        pytest.skip("the C extension is not built here")
    env = dict(os.environ, **{_accel.PURE_PYTHON_ENV: "1" if pure else "0"})
    out = subprocess.run(
        [sys.executable, "-c", _CLOSE_RACE, str(tmp_path), "100", front_end],
        env=env, capture_output=True, text=True, timeout=220,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "ok"


def test_only_a_close_turns_a_value_error_into_cache_closed(tmp_path: Path) -> None:
    from shmcache import CacheClosedError

    c = SharedMemoryCache("vals", directory=tmp_path, size_bytes=1 << 20)
    engine = c._engine
    engine.raise_if_closed(ValueError("a caller's own bad value"))  # open: goes on as is
    c.close()
    with pytest.raises(CacheClosedError, match="is closed"):
        engine.raise_if_closed(ValueError("operation forbidden on released memoryview"))
    already = CacheClosedError("already the right error")
    engine.raise_if_closed(already)  # the caller re-raises it unchanged
