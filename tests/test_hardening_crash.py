"""A writer SIGKILLed at any instant never leaves a cache that hangs, crashes or answers
wrong, for the next writer, for lock-free readers, or for ``check``.

Two layers:

* ``test_crash_at_write_step``: a child kills itself (``shmcache._arena.step_hook``)
  at each of the seven write steps, in four kinds of update (a new key, an overwrite,
  an overwrite that wraps the log and evicts, an insert into a full index bucket).
  Other processes then read every key, write again and run ``check``.  The steps of
  eviction have their own tests: re-appending a read record (8, 9) and a record
  leaving the small log, moved to the main log or evicted to a ghost (14-17).
* ``test_random_sigkills_under_load``: hundreds of writers killed at random instants
  (by the parent, or by themselves at a random step) while a reader process checks
  every value it gets and the parent checks the segment after each kill.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _hardening_helpers import (
    BUSY_WORD_BYTE,
    Children,
    Verifier,
    bucket_index,
    cli,
    generations,
    kill_at_step,
    prompt_of,
    read_json_from,
    same_bucket_prompts,
    word,
    write_json_to,
)
from langchain_core.outputs import Generation

import shmcache._arena
from shmcache import SharedMemoryCache

LLM = "llm"
NAME = "crash"
LOCK_TIMEOUT_S = 1.0
# A liveness bound, not a benchmark: "the next writer proceeds" means well within this.
NEXT_WRITER_BOUND_S = LOCK_TIMEOUT_S + 3.0
CHILD_DEADLINE_S = 30.0

Values = list[Generation]


def _value(prompt: str, version: str, size: int) -> Values:
    """A value unique to ``(prompt, version)`` of about ``size`` characters."""
    seed = hashlib.sha256(f"{prompt}/{version}".encode()).hexdigest()
    return [Generation(text=f"{prompt}/{version}/" + (seed * (size // 64 + 1))[:size])]


def _short(found: object) -> str:
    if isinstance(found, list) and found and isinstance(found[0], Generation):
        return f"[{found[0].text[:40]!r}... ({len(found[0].text)} chars)]"
    return repr(found)[:80]


@dataclass
class Scenario:
    """A filled cache and the update that will be interrupted."""

    cache: SharedMemoryCache
    expected: dict[str, Values]
    prompt: str
    old: Values | None
    new: Values
    after: Values
    may_vanish: set[str] = field(default_factory=set)

    def store(self, prompt: str, value: Values) -> None:
        """Write one entry and remember it as the key's latest value."""
        self.cache.update(prompt, LLM, value)
        self.expected[prompt] = value

    def verify(self, crashed_allowed: list[Values | None]) -> list[str]:
        """Look every key up; return what is wrong (nothing: [])."""
        problems = []
        for prompt, value in self.expected.items():
            if prompt == self.prompt:
                continue
            got = self.cache.lookup(prompt, LLM)
            if got != value and not (got is None and prompt in self.may_vanish):
                problems.append(f"{prompt}: got {_short(got)}, want {_short(value)}")
        got = self.cache.lookup(self.prompt, LLM)
        if not any(got == allowed for allowed in crashed_allowed):
            problems.append(
                f"crashed key {self.prompt}: got {_short(got)}, "
                f"allowed {[_short(a) for a in crashed_allowed]}"
            )
        return problems


def _open(directory: Path) -> SharedMemoryCache:
    # The verifiers peek (look keys up without storing them): no coalescing, as the
    # contract says for peeking code; the lease steps have their own crash tests.
    return SharedMemoryCache(
        NAME, directory=directory, size_bytes=1 << 20, lock_timeout=LOCK_TIMEOUT_S,
        coalesce=False,
    )


def _fill_small(sc: Scenario) -> None:
    for i in range(20):
        sc.store(f"p{i}", _value(f"p{i}", "v1", 200 + 97 * i))


def _insert(directory: Path) -> Scenario:
    """The interrupted update stores a new key."""
    sc = Scenario(_open(directory), {}, "fresh", None,
                  _value("fresh", "new", 1500), _value("fresh", "after", 700))
    _fill_small(sc)
    return sc


def _overwrite(directory: Path) -> Scenario:
    """The interrupted update replaces an existing key (with a value of another size)."""
    sc = Scenario(_open(directory), {}, "p7", None,
                  _value("p7", "new", 2500), _value("p7", "after", 900))
    _fill_small(sc)
    sc.old = sc.expected["p7"]
    return sc


def _wrap(directory: Path) -> Scenario:
    """The interrupted update replaces the newest key with a value that does not fit
    before the end of the main log's lap: it pads the lap and evicts from the tail."""
    cache = _open(directory)
    # Records this big go to the main log (on probation), whose lap this is about.
    log_size = cache._arena.geometry.main_size
    sc = Scenario(cache, {}, "", None, [], [])
    i = 0

    def head() -> int:
        return word(cache.path, shmcache._arena._W_MAIN_HEAD * 8) - (
            shmcache._arena._MAIN_BASE // log_size + 1
        ) * log_size

    # One and a half laps first, so the log is full and every write evicts...
    while head() < log_size * 2.5:
        sc.store(f"w{i}", _value(f"w{i}", "v1", 9000 + 37 * i % 2000))
        i += 1
    # ...then up to the end of a lap, leaving less room than the big update needs.
    while log_size - head() % log_size >= 45_000:
        sc.store(f"w{i}", _value(f"w{i}", "v1", 9000 + 37 * i % 2000))
        i += 1
    sc.prompt = f"w{i - 1}"
    sc.old = sc.expected[sc.prompt]
    sc.new = _value(sc.prompt, "new", 60_000)
    sc.after = _value(sc.prompt, "after", 58_000)
    sc.may_vanish = set(sc.expected) - {sc.prompt}
    room = log_size - head() % log_size
    assert cache._arena.record_bytes(60_000) > room  # the update must wrap
    return sc


def _full_bucket(directory: Path) -> Scenario:
    """The interrupted update inserts a ninth key into a full index bucket (which
    drops its own oldest entry first)."""
    cache = _open(directory)
    n_buckets = cache._arena.geometry.n_buckets
    bucket_keys = same_bucket_prompts("anchor", LLM, n_buckets, 9, prefix="b")
    sc = Scenario(cache, {}, bucket_keys[8], None,
                  _value(bucket_keys[8], "new", 1200), _value(bucket_keys[8], "after", 400))
    target = bucket_index("anchor", LLM, n_buckets)
    for prompt in [f"p{i}" for i in range(12)]:
        if bucket_index(prompt, LLM, n_buckets) != target:
            sc.store(prompt, _value(prompt, "v1", 300))
    for prompt in bucket_keys[:8]:
        sc.store(prompt, _value(prompt, "v1", 300 + len(prompt)))
    sc.may_vanish = {bucket_keys[0]}  # the bucket's oldest entry
    return sc


SCENARIOS: dict[str, Callable[[Path], Scenario]] = {
    "insert": _insert,
    "overwrite": _overwrite,
    "wrap-evict": _wrap,
    "full-bucket": _full_bucket,
}
# Who touches the segment first after the crash: the next writer, a lock-free reader,
# or `shmcache check`.  Rotating by (step + scenario) gives every step all three.
FIRST = ("writer", "reader", "cli")


def _crashed_allowed(sc: Scenario, step: int) -> list[Values | None]:
    """What a lookup of the interrupted key may return before anyone writes it again.

    Steps 1-5 come before the index points at the new record (the previous value, or
    nothing, is still there); step 6 leaves the slot half-written (repaired to a miss);
    step 7 comes after the record is indexed.
    """
    if step <= 5:
        return [sc.old]
    if step == 6:
        return [None, sc.new]
    return [sc.new]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", range(1, 8))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_crash_at_write_step(tmp_path: Path, scenario: str, step: int) -> None:
    """SIGKILL at write step ``step``: others read no wrong value, the next writer
    proceeds at once, and ``check`` finds nothing (leftovers are repaired, not damage)."""
    first = FIRST[(step + list(SCENARIOS).index(scenario)) % len(FIRST)]
    sc = SCENARIOS[scenario](tmp_path)
    try:
        assert sc.verify([sc.old]) == []  # sanity: the fill is readable
        with Children() as children:

            def crash() -> int:
                logging.disable(logging.WARNING)
                shmcache._arena.step_hook = kill_at_step(step)
                sc.cache.update(sc.prompt, LLM, sc.new)
                return 3  # not reached: the hook kills the process

            pid = children.spawn(crash)
            assert children.wait(pid, CHILD_DEADLINE_S) == -signal.SIGKILL
            # It died holding the lock with a write in progress.
            assert word(sc.cache.path, BUSY_WORD_BYTE) == pid

            if first == "cli":
                result = cli("check", NAME, "--directory", str(tmp_path))
                assert result.returncode == 0, result.stdout + result.stderr
                assert result.stdout.startswith("ok:")

            read_fd, write_fd = os.pipe()

            def next_process() -> int:
                os.close(read_fd)
                logging.disable(logging.WARNING)
                # Readers see no wrong value, before or after `shmcache check` repaired.
                problems = sc.verify(_crashed_allowed(sc, step)) if first != "writer" else []
                skipped = sc.cache.stats().skipped
                started = time.monotonic()
                sc.cache.update(sc.prompt, LLM, sc.after)
                took = time.monotonic() - started
                if took > NEXT_WRITER_BOUND_S:
                    problems.append(f"the next update took {took:.1f} s")
                if sc.cache.stats().skipped != skipped:
                    problems.append("the next update was skipped")
                problems += sc.verify([sc.after])  # completed: never the older values
                write_json_to(write_fd, problems)
                return 0

            pid = children.spawn(next_process)
            os.close(write_fd)
            try:
                assert read_json_from(read_fd, CHILD_DEADLINE_S) == []
            finally:
                os.close(read_fd)
            assert children.wait(pid, CHILD_DEADLINE_S) == 0
        # And from this process too.
        assert sc.verify([sc.after]) == []
        assert sc.cache.check() == []
        assert word(sc.cache.path, BUSY_WORD_BYTE) == 0
    finally:
        sc.cache.close()
        sc.cache.unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", [8, 9])
@pytest.mark.usefixtures("uncompressed")  # the record sizes drive the logs' moves
def test_crash_while_reappending_a_read_record(tmp_path: Path, step: int) -> None:
    """SIGKILL while an update re-appends a read record at the head (CLOCK): no key
    reads a wrong value, the re-appended key at worst becomes a miss, the next writer
    proceeds, and ``check`` finds nothing."""
    cache = _open(tmp_path)
    log_size = cache._arena.geometry.data_bytes
    expected: dict[str, Values] = {}
    i = 0
    try:
        # Fill past a full lap, then read everything stored: the tails are referenced.
        # (Counted in stores: with no reads the main log's head need not move.)
        while cache.stats().evictions == 0 or i < 2.2 * log_size // 3500:
            expected[f"r{i}"] = _value(f"r{i}", "v1", 3000 + 37 * i % 900)
            cache.update(f"r{i}", LLM, expected[f"r{i}"])
            i += 1
        for _ in range(2):  # twice: the small log's records earn the main log
            for prompt in expected:
                cache.lookup(prompt, LLM)
        with Children() as children:

            def crash() -> int:
                logging.disable(logging.WARNING)
                shmcache._arena.step_hook = kill_at_step(step)
                # New keys go to the small log; once it is full, each one moves a
                # read record to the main log, whose tail is read records too.
                for k in range(200):
                    cache.update(f"fresh {k}", LLM, _value(f"fresh {k}", "new", 3000))
                return 3  # not reached: the hook kills the process

            pid = children.spawn(crash)
            assert children.wait(pid, CHILD_DEADLINE_S) == -signal.SIGKILL
        wrong = [
            p for p, v in expected.items() if cache.lookup(p, LLM) not in (None, v)
        ]
        assert wrong == []
        cache.update("after", LLM, _value("after", "v", 500))  # the next writer
        assert cache.stats().skipped == 0
        assert cache.lookup("after", LLM) == _value("after", "v", 500)
        assert [p for p, v in expected.items() if cache.lookup(p, LLM) not in (None, v)] == []
        assert cache.check() == []
    finally:
        cache.close()
        cache.unlink()


@pytest.fixture
def uncompressed() -> Iterator[None]:
    """Values stored as they are (where the codec compresses, its switch is off), so
    that records fill the logs before the index: the small log's steps are reached."""
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", [14, 15, 16, 17])
@pytest.mark.usefixtures("uncompressed")
def test_crash_while_leaving_the_small_log(tmp_path: Path, step: int) -> None:
    """SIGKILL while a record leaves the small log (S3-FIFO): moved to the main log
    (14 copy published, 15 slot moved) or evicted to a ghost (16 ghost half-written,
    17 ghost written).  No key reads a wrong value (before or after repair), the next
    writer proceeds at once, and ``check`` finds nothing."""
    cache = _open(tmp_path)
    expected: dict[str, Values] = {}
    i = 0
    try:
        # Fill until the data space is full (records move from the small log to the
        # main one meanwhile), then read every other key: the small tail is a mix.
        while cache.stats().evictions == 0:
            expected[f"s{i}"] = _value(f"s{i}", "v1", 1200 + 53 * i % 700)
            cache.update(f"s{i}", LLM, expected[f"s{i}"])
            i += 1
        for prompt in list(expected)[::2]:
            cache.lookup(prompt, LLM)
        with Children() as children:

            def crash() -> int:
                logging.disable(logging.WARNING)
                shmcache._arena.step_hook = kill_at_step(step)
                for k in range(2000):
                    cache.update(f"fresh {k}", LLM, _value(f"fresh {k}", "new", 1500))
                return 3  # not reached: the hook kills the process

            pid = children.spawn(crash)
            assert children.wait(pid, CHILD_DEADLINE_S) == -signal.SIGKILL
            assert word(cache.path, BUSY_WORD_BYTE) == pid

            def reader() -> int:  # lock-free lookups on the crashed segment
                logging.disable(logging.WARNING)
                wrong = [p for p, v in expected.items() if cache.lookup(p, LLM) not in (None, v)]
                return 5 if wrong else 0

            assert children.wait(children.spawn(reader), CHILD_DEADLINE_S) == 0
        result = cli("check", NAME, "--directory", str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert [p for p, v in expected.items() if cache.lookup(p, LLM) not in (None, v)] == []
        started = time.monotonic()
        cache.update("after", LLM, _value("after", "v", 500))  # the next writer
        assert time.monotonic() - started < NEXT_WRITER_BOUND_S
        assert cache.stats().skipped == 0
        assert cache.lookup("after", LLM) == _value("after", "v", 500)
        for k in range(300):  # and the logs keep turning over the repaired state
            cache.update(f"later {k}", LLM, _value(f"later {k}", "v", 1500))
        assert [p for p, v in expected.items() if cache.lookup(p, LLM) not in (None, v)] == []
        assert cache.check() == []
        assert word(cache.path, BUSY_WORD_BYTE) == 0
    finally:
        cache.close()
        cache.unlink()


# -- random kills under load ------------------------------------------------------

KEYS = 120
PROBE = KEYS  # written only by the test process
WRITER_SLOTS = 2
# Runs at least MIN_KILLS kills and at least KILL_SECONDS seconds (env-tunable).
MIN_KILLS = int(os.environ.get("SHMCACHE_HARDENING_KILLS", "200"))
KILL_SECONDS = float(os.environ.get("SHMCACHE_HARDENING_KILL_SECONDS", "20"))
KILL_HARD_CAP_S = max(90.0, KILL_SECONDS * 3)


def _writer(cache: SharedMemoryCache, slot: int, step: int, after: int) -> int:
    """Write this slot's keys (and check other keys) until killed.

    With ``step`` set, the writer SIGKILLs itself at that write step after ``after``
    updates; otherwise the parent kills it at a random instant.  A wrong value read
    exits with code 5 at once, so it cannot be hidden by the kill.
    """
    logging.disable(logging.WARNING)
    if step:
        shmcache._arena.step_hook = kill_at_step(step, after=after)
    rng = random.Random(os.getpid())
    verifier = Verifier()
    while True:
        key = rng.randrange(slot, KEYS, WRITER_SLOTS)
        cache.update(prompt_of(key), LLM, generations(key, slot, time.monotonic_ns()))
        if rng.random() < 0.3:
            other = rng.randrange(KEYS + 1)
            verifier.check(other, cache.lookup(prompt_of(other), LLM))
            if verifier.wrong:
                os.write(2, f"writer saw: {verifier.wrong}\n".encode())
                return 5


def _reader(cache: SharedMemoryCache, stop_fd: int, result_fd: int) -> int:
    """Look random keys up, checking each value, until ``stop_fd`` becomes readable."""
    logging.disable(logging.WARNING)
    rng = random.Random(os.getpid())
    verifier = Verifier()
    while not select.select([stop_fd], [], [], 0)[0]:
        for _ in range(200):
            key = rng.randrange(KEYS + 1)
            verifier.check(key, cache.lookup(prompt_of(key), LLM))
    write_json_to(result_fd, verifier.summary())
    return 0


@pytest.mark.timeout(KILL_HARD_CAP_S + 60)
def test_random_sigkills_under_load(tmp_path: Path) -> None:
    """Writers are SIGKILLed at random instants (>= 200 times) while others read and
    write: every value read is exactly one written for its key and never older than
    one seen before; after every kill the next write lands and ``check`` finds nothing."""
    cache = SharedMemoryCache(  # readers peek: coalesce=False (see _open)
        "kills", directory=tmp_path, size_bytes=1 << 20, lock_timeout=2.0, coalesce=False
    )
    rng = random.Random(20240501)
    kills = mid_write = probes = 0
    started = time.monotonic()
    try:
        with Children() as children:
            stop_r, stop_w = os.pipe()
            result_r, result_w = os.pipe()
            reader = children.spawn(lambda: _reader(cache, stop_r, result_w))
            os.close(result_w)
            # slot -> (pid, kill instant or None when it kills itself)
            live: dict[int, tuple[int, float | None]] = {}
            while True:
                elapsed = time.monotonic() - started
                if kills >= MIN_KILLS and elapsed >= KILL_SECONDS:
                    break
                assert elapsed < KILL_HARD_CAP_S, f"only {kills} kills in {elapsed:.0f} s"
                for slot in range(WRITER_SLOTS):
                    if slot not in live:
                        if rng.random() < 0.5:
                            step, after = rng.randint(1, 7), rng.randint(0, 40)
                            kill_at = None
                        else:
                            step = after = 0
                            kill_at = time.monotonic() + rng.uniform(0, 0.15)
                        pid = children.spawn(
                            lambda s=slot, k=step, a=after: _writer(cache, s, k, a)
                        )
                        live[slot] = (pid, kill_at)
                        continue
                    pid, kill_at = live[slot]
                    if kill_at is None:
                        status = children.poll(pid)
                        if status is None:
                            continue
                        code = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                        assert code == signal.SIGKILL, f"writer ended with status {status}"
                        mid_write += 1
                    elif time.monotonic() >= kill_at:
                        assert children.kill(pid) == -signal.SIGKILL  # not a wrong value
                        mid_write += word(cache.path, BUSY_WORD_BYTE) == pid
                    else:
                        continue
                    del live[slot]
                    kills += 1
                    # The next writer proceeds and its value is the one read back.
                    stamp = time.monotonic_ns()
                    skipped = cache.stats().skipped
                    cache.update(prompt_of(PROBE), LLM, generations(PROBE, 99, stamp))
                    if cache.stats().skipped == skipped:
                        probes += 1
                        got = cache.lookup(prompt_of(PROBE), LLM)
                        assert got == generations(PROBE, 99, stamp)
                    assert cache.check() == []
                time.sleep(0.001)  # pace the polling loop (children are checked by state)
            for pid, _ in live.values():
                assert children.kill(pid) == -signal.SIGKILL
            os.write(stop_w, b"x")
            summary = read_json_from(result_r, 30.0)
            assert children.wait(reader, 30.0) == 0
            os.close(stop_r)
            os.close(stop_w)
            os.close(result_r)
        elapsed = time.monotonic() - started
        print(
            f"\nrandom kills: {kills} SIGKILLs in {elapsed:.1f} s ({mid_write} while "
            f"writing), {probes} probe writes read back, reader verified "
            f"{summary['verified']} values ({summary['misses']} misses), "
            f"wrong values: {summary['wrong']}"
        )
        assert summary["wrong"] == 0, summary["examples"]
        assert kills >= MIN_KILLS
        assert mid_write >= kills // 4
        assert summary["verified"] > 1000
        assert probes >= kills * 0.9
        result = cli("check", "kills", "--directory", str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        cache.close()
        cache.unlink()
