"""The compiled first step of a coalesced miss (``Finder.claim``) and the Python one agree.

Where the extension is built, a lookup that misses takes its lease in one C call
(``Coalescer.claim_fast``): try the writer lock once, look the key up, take a free
entry of its lease window.  Everything else — a busy lock, an existing lease, a full
window, a bucket a dead writer left mid-change — must be left untouched to
``Coalescer.step_locked``.  These tests check that the C call writes exactly the
entry the Python step writes, changes nothing in each case it declines, refuses bad
input without taking the lock, and that compiled and pure-Python processes coalesce
on one key in both directions.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from coalesce_apps.coalesce_support import instrument_waits, poll_until
from langchain_core.outputs import Generation

import shmcache._arena as arena_mod
from shmcache import SharedMemoryCache, _accel
from shmcache._coalesce import caller_key
from shmcache._keys import key_digest, split_digest
from shmcache._leases import FIRST_WORD, LEASE_ENTRIES, WINDOW, LeaseTable, owner_word

LLM = "llm"
TESTS = Path(__file__).resolve().parent
DEADLINE_S = 30.0

pytestmark = pytest.mark.skipif(
    not _accel.compiled(),
    reason="the C extension is not built here (test_speedups says whether it should be)",
)


@pytest.fixture()
def cache(tmp_path: Path) -> Iterator[SharedMemoryCache]:
    c = SharedMemoryCache("claim", directory=tmp_path, size_bytes=1 << 20)
    try:
        yield c
    finally:
        c.close()


def _lease_words(cache: SharedMemoryCache) -> bytes:
    """The whole lease table, and the lock-holder word."""
    words = cache._engine._arena_words
    end = FIRST_WORD + LEASE_ENTRIES * 4
    lock_pid = arena_mod.W_LOCK_PID
    return bytes(words[FIRST_WORD:end]) + bytes(words[lock_pid : lock_pid + 1])


def _me(cache: SharedMemoryCache) -> int:
    engine = cache._engine
    counts = engine._counters.slot_view()
    assert counts is not None
    return owner_word(engine._resources.slot, int(counts[arena_mod.SLOT_GENERATION]))


def _claim(cache: SharedMemoryCache, prompt: str, *, fd: int | None = None) -> object:
    """One compiled claim of ``prompt`` by this thread, as ``claim_fast`` makes it."""
    engine = cache._engine
    coalescer = engine._coalescer
    assert coalescer is not None and coalescer._claim is not None
    pid = os.getpid()
    fd = engine._lock.thread_fd(pid) if fd is None else fd
    deadline = time.monotonic_ns() + 10**9
    digest = key_digest(prompt, LLM)
    return coalescer._claim(fd, digest, time.time(), _me(cache), deadline, 12345, pid)


def _lock_is_free(cache: SharedMemoryCache) -> bool:
    fd = os.open(cache.path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock if it was had
    return True


def test_a_compiled_miss_writes_the_entry_the_python_step_writes(tmp_path: Path) -> None:
    """The same miss on two segments, one through the C call and one through the
    Python step: the same entry, owner, caller token, and a deadline of now +
    coalesce_timeout; the lookup misses, holds the lease, and is counted once."""
    results = []
    for compiled in (True, False):
        with SharedMemoryCache(
            f"twin{compiled}", directory=tmp_path, size_bytes=1 << 20, coalesce_timeout=7.0
        ) as c:
            coalescer = c._engine._coalescer
            assert coalescer is not None
            if not compiled:
                coalescer._claim = None  # this instance takes the Python step
            before = time.monotonic_ns()
            assert c.lookup("the prompt", LLM) is None
            after = time.monotonic_ns()
            tag = split_digest(key_digest("the prompt", LLM))[0]
            lease = LeaseTable(c._engine._arena_words).find(tag)
            assert lease is not None
            assert before + 7 * 10**9 <= lease.deadline_ns <= after + 7 * 10**9
            assert coalescer.holds(caller_key(), key_digest("the prompt", LLM))
            assert c._engine._arena_words[arena_mod.W_LOCK_PID] == 0
            assert _lock_is_free(c)
            stats = c.stats()
            results.append((lease.entry, lease.tag, lease.owner == _me(c), lease.caller,
                            stats.misses, stats.uncoalesced))  # fmt: skip
            c.update("the prompt", LLM, [Generation(text="answer")])  # ends the lease
            assert LeaseTable(c._engine._arena_words).find(tag) is None
    assert results[0] == results[1]
    assert results[0][2:] == (True, results[0][3], 1, 0)


def test_a_busy_lock_is_left_to_the_python_step(cache: SharedMemoryCache) -> None:
    before = _lease_words(cache)
    other = os.open(cache.path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert _claim(cache, "while another holds the lock") is None
        assert _lease_words(cache) == before  # nothing written, lock holder untouched
    finally:
        os.close(other)
    assert isinstance(_claim(cache, "while another holds the lock"), int)


def test_a_stored_key_is_a_hit_under_the_lock(cache: SharedMemoryCache) -> None:
    cache.update("stored", LLM, [Generation(text="kept")])
    before = _lease_words(cache)
    found = _claim(cache, "stored")
    assert isinstance(found, memoryview)
    assert bytes(found) == bytes(cache._engine._arena.find_python(key_digest("stored", LLM), 0.0))
    assert _lease_words(cache) == before
    assert _lock_is_free(cache)


def test_an_existing_lease_is_left_to_the_python_step(cache: SharedMemoryCache) -> None:
    first = _claim(cache, "wanted twice")
    assert isinstance(first, int) and 0 <= first < LEASE_ENTRIES
    before = _lease_words(cache)
    assert _claim(cache, "wanted twice") is None  # wait, take over or keep: Python decides
    assert _lease_words(cache) == before
    assert _lock_is_free(cache)


def test_a_full_window_is_left_to_the_python_step(cache: SharedMemoryCache) -> None:
    """Every entry of the key's window taken by other keys (maybe lapsed ones, which
    only the Python step judges): nothing is written."""
    tag = split_digest(key_digest("crowded out", LLM))[0]
    start = (tag >> 1) % (LEASE_ENTRIES - WINDOW + 1)
    words = cache._engine._arena_words
    for i in range(start, start + WINDOW):
        base = FIRST_WORD + i * 4
        words[base + 1] = _me(cache)
        words[base + 2] = 1  # lapsed long ago
        words[base + 3] = 99
        words[base] = (tag + 2 * (i + 1)) | 1  # another key's tag
    before = _lease_words(cache)
    assert _claim(cache, "crowded out") is None
    assert _lease_words(cache) == before
    # The Python step reuses a lapsed entry: the key is still coalesced.
    assert cache.lookup("crowded out", LLM) is None
    assert cache.stats().uncoalesced == 0
    assert LeaseTable(words).find(tag) is not None


def test_a_bucket_left_mid_change_is_left_to_the_python_step(cache: SharedMemoryCache) -> None:
    """A writer killed inside a bucket's seqlock leaves its version odd: the C call
    declines (the Python step repairs and reads it under the lock)."""
    cache.update("mid change", LLM, [Generation(text="still here")])
    arena = cache._engine._arena
    digest = key_digest("mid change", LLM)
    bucket = next(b for b in arena._buckets(digest) if split_digest(digest)[0] in
                  arena.words[b + 1 : b + 9].tolist())  # fmt: skip
    arena.words[bucket] |= 1
    before = _lease_words(cache)
    assert _claim(cache, "mid change") is None
    assert _lease_words(cache) == before
    assert _lock_is_free(cache)
    arena.words[bucket] += 1  # the change "completes"
    assert cache.lookup("mid change", LLM) == [Generation(text="still here")]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, b"short", 1.0, 1, 1, 1, 1), TypeError),
        ((0, "x" * 32, 1.0, 1, 1, 1, 1), TypeError),
        ((0, b"d" * 32, "now", 1, 1, 1, 1), TypeError),
        ((0, b"d" * 32, 1.0, 0, 1, 1, 1), ValueError),  # no owner
        ((0, b"d" * 32, 1.0, 1, 1, 1, 0), ValueError),  # no pid
        ((0, b"d" * 32, 1.0, -1, 1, 1, 1), OverflowError),
        ((0, b"d" * 32, 1.0, 1, 2**64, 1, 1), OverflowError),
        (("0", b"d" * 32, 1.0, 1, 1, 1, 1), TypeError),
        ((0, b"d" * 32, 1.0, 1, 1, 1), TypeError),  # too few
    ],
)
def test_bad_input_is_refused_without_the_lock(
    cache: SharedMemoryCache, args: tuple[object, ...], error: type[Exception]
) -> None:
    cache.update("kept", LLM, [Generation(text="safe")])
    before = _lease_words(cache)
    coalescer = cache._engine._coalescer
    assert coalescer is not None and coalescer._claim is not None
    with pytest.raises(error):
        coalescer._claim(*args)
    assert _lease_words(cache) == before
    assert _lock_is_free(cache)
    assert cache.lookup("kept", LLM) == [Generation(text="safe")]


def test_a_closed_fd_or_a_released_finder(tmp_path: Path) -> None:
    c = SharedMemoryCache("released", directory=tmp_path, size_bytes=1 << 20)
    try:
        assert _claim(c, "no fd", fd=-1) is None  # the Python step says why
        finder = c._engine._arena._finder
        assert finder is not None
        arena = c._engine._arena
        fresh = _accel.Finder(  # no lease layout yet
            arena._mm, arena._n_buckets, arena._index_word, arena._main_t, arena._small_t,
            arena_mod.CONTENDED,
        )  # type: ignore[misc]
        try:
            with pytest.raises(RuntimeError, match="set_leases"):
                fresh.claim(0, b"d" * 32, 1.0, 1, 1, 1, 1)
        finally:
            fresh.release()
        with pytest.raises(ValueError, match="does not fit"):
            finder.set_leases(arena_mod.W_LOCK_PID, FIRST_WORD, 1 << 40, WINDOW)
        with pytest.raises(ValueError, match="does not fit"):
            finder.set_leases(arena_mod.W_LOCK_PID, FIRST_WORD, WINDOW - 1, WINDOW)
    finally:
        c.close()
    with pytest.raises(ValueError, match="released"):
        finder.claim(0, b"d" * 32, 1.0, 1, 1, 1, 1)


_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from coalesce_apps.coalesce_support import append_line, instrument_waits
    from langchain_core.outputs import Generation
    from shmcache import SharedMemoryCache, _accel
    directory, role, _, waits = sys.argv[1:5]
    assert not _accel.compiled()
    c = SharedMemoryCache("mixed", directory=directory, size_bytes=1 << 20)
    if role == "compute":
        assert c.lookup("one prompt", "llm") is None  # the computing caller
        print("own", flush=True)
        assert sys.stdin.readline().strip() == "go"
        c.update("one prompt", "llm", [Generation(text="from pure python")])
        print("stored", flush=True)
    else:
        instrument_waits(c, waits)
        found = c.lookup("one prompt", "llm")
        print(found[0].text if found else "miss", c.stats().coalesced, flush=True)
    c.close()
    """
)


def _child(tmp_path: Path, role: str, waits: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, **{_accel.PURE_PYTHON_ENV: "1"})
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), role, str(TESTS), str(waits)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_a_pure_python_process_waits_for_a_compiled_claim(tmp_path: Path) -> None:
    waits = tmp_path / "waits.jsonl"
    with SharedMemoryCache("mixed", directory=tmp_path, size_bytes=1 << 20) as c:
        assert c.lookup("one prompt", LLM) is None  # compiled claim: we compute
        child = _child(tmp_path, "wait", waits)
        try:
            poll_until(lambda: waits.exists() and waits.stat().st_size > 0, DEADLINE_S,
                       "the pure-Python lookup to wait")  # fmt: skip
            c.update("one prompt", LLM, [Generation(text="from C")])
            out, err = child.communicate(timeout=DEADLINE_S)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == 0, err
        assert out.split() == ["from", "C", "1"]  # served by our update, coalesced


@pytest.mark.timeout(120)
def test_a_compiled_lookup_waits_for_a_pure_python_claim(tmp_path: Path) -> None:
    with SharedMemoryCache("mixed", directory=tmp_path, size_bytes=1 << 20) as c:
        child = _child(tmp_path, "compute", tmp_path / "unused")
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "own"
            waits = instrument_waits(c)
            result: list[object] = []
            looking = threading.Thread(target=lambda: result.append(c.lookup("one prompt", LLM)))
            looking.start()
            poll_until(lambda: waits.count > 0, DEADLINE_S, "the compiled lookup to wait")
            child.stdin.write("go\n")
            child.stdin.flush()
            looking.join(DEADLINE_S)
            assert not looking.is_alive()
            assert child.stdout.readline().strip() == "stored"
        finally:
            child.kill()
            child.wait()
        assert result == [[Generation(text="from pure python")]]
        assert c.stats().coalesced == 1
        assert c.stats().uncoalesced == 0
